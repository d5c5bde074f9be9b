import pytest

from metatuner.config import ConfigError, load_config


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  task: rg:chain_sum\ntrain:\n  lr: 0.001\n  batch_size: 4\n")
    cfg = load_config(path, ["train.lr=5e-5", "data.train_limit=100"])
    assert cfg.data.task == "rg:chain_sum"
    assert cfg.train.lr == pytest.approx(5e-5)
    assert cfg.train.batch_size == 4
    assert cfg.data.train_limit == 100
    assert cfg.output_dir == "runs/metatuner-rg:chain_sum"


@pytest.mark.bad_input
def test_bad_input_unknown_key_names_its_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(path)


@pytest.mark.bad_input
def test_bad_input_wrong_type_names_its_path():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=many"])


@pytest.mark.bad_input
@pytest.mark.parametrize("override,key", [("lora.r=0", "lora.r"), ("train.lr=-1", "train.lr"),
                                          ("eval.mc_mode=vote", "eval.mc_mode")])
def test_bad_input_impossible_values_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.bad_input
def test_bad_input_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
