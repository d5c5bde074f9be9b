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
    with pytest.raises(ConfigError, match="not valid YAML; quote it"):  # was yaml's own ScannerError
        load_config(None, ["data.prompt=Answer: briefly: now"])


@pytest.mark.bad_input
def test_bad_input_conflicting_keys_are_rejected_by_name():
    """warmup_actor_adapter used to win silently over warmup_actor_steps: the steps asked for were never run."""
    with pytest.raises(ConfigError, match="metatuner.warmup_actor_adapter.*metatuner.warmup_actor_steps"):
        load_config(None, ["metatuner.warmup_actor_adapter=runs/sft/adapter", "metatuner.warmup_actor_steps=10"])
    with pytest.raises(ConfigError, match="metatuner.g_finetune"):
        load_config(None, ["metatuner.g_finetune=full"])  # full fine-tuning of G needs its own M
    with pytest.raises(ConfigError, match="data.on_bad_row.*contradicts.*data.task_options.on_bad_row"):
        load_config(None, ["data.on_bad_row=skip", "data.task_options={on_bad_row: error}"])


@pytest.mark.bad_input
@pytest.mark.parametrize("override, key, choices", [
    ("metatuner.schedule=K", "metatuner.schedule", "'J', 'I'"),
    ("train.mixed_precision=fp8", "train.mixed_precision", "'auto', 'fp32', 'bf16', 'fp16'"),
    ("search.scorer=vibes", "search.scorer", "'likelihood', 'accuracy'"),
    ("method=lora", "method", "'sft', 'metatuner'"),
])
def test_bad_input_choice_fields_list_their_choices(override, key, choices):
    with pytest.raises(ConfigError, match=f"`{key}`.*{choices}"):
        load_config(None, [override])


@pytest.mark.bad_input
def test_bad_input_sections_check_their_values_when_built_in_code():
    """The checks live in each section's __post_init__, so a config changed in code (dataclasses.replace, as the
    demo and BetterTogether do) is checked too, not only one read by load_config."""
    import dataclasses

    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match="`train.batch_size` must be at least 1"):
        dataclasses.replace(cfg.train, batch_size=0)
    with pytest.raises(ConfigError, match="`metatuner.g_finetune`"):
        dataclasses.replace(cfg, metatuner=dataclasses.replace(cfg.metatuner, g_finetune="full"))


def test_old_task_options_on_bad_row_is_read_as_data_on_bad_row(tmp_path):
    """Run folders written before data.on_bad_row was the one setting carry `task_options: {on_bad_row: skip}` in
    their config.yaml; they still load, with the value moved (documented in metatuner.config)."""
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  on_bad_row: skip\n  task_options:\n    on_bad_row: skip\n")
    cfg = load_config(path)
    assert cfg.data.on_bad_row == "skip" and "on_bad_row" not in cfg.data.task_options
    assert cfg.data.task_kwargs() == {"on_bad_row": "skip"}
    only_old = load_config(None, ["data.task_options={on_bad_row: skip}"])
    assert only_old.data.on_bad_row == "skip" and only_old.data.task_options == {}
