"""`metatuner compare` on a tiny model: every listed method runs once, results carry paired intervals."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml

from metatuner.compare import compare, load_compare_config, method_config
from metatuner.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, tiny_dir, methods, **extra):
    base = {
        "model": {"name": str(tiny_dir), "device": "cpu"},
        "data": {"task": "rg:chain_sum", "task_options": {"size": 8, "test_size": 6}},
        "train": {"batch_size": 4, "max_steps": 2, "mixed_precision": "fp32"},
        "eval": {"batch_size": 8, "max_new_tokens": 4},
        "metatuner": {"share_depth": 2, "rank": 4, "hyper_hidden": 32, "g_lora_r": 4, "max_prompt_tokens": 4,
                      "n_rollouts": 2, "warmup_generator": False},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"name": "toy", "results_dir": str(tmp_path / "results"),
                                    "runs_dir": str(tmp_path / "runs"), "base": base, "methods": methods,
                                    **extra}))
    return path


def test_compare_runs_each_method_once_and_reports_intervals(tiny_dir, tmp_path, capsys):
    path = _config(tmp_path, tiny_dir, {"zero_shot": {}, "sft": {}, "metatuner_j": {},
                                        "params_only": {"metatuner.use_prompt": False},
                                        "opro": {"search.rounds": 1, "search.proposals_per_round": 1,
                                                 "search.dev_size": 2},
                                        "dpo": {"dpo.samples_per_question": 2, "dpo.gold_fallback": True}})
    results = compare(path)
    assert set(results["methods"]) == {"zero_shot", "sft", "metatuner_j", "params_only", "opro", "dpo"}
    for name, entry in results["methods"].items():
        assert entry["n_eval"] == 6 and entry["eval_command"] and entry["command"].endswith(entry["eval_command"])
        assert ("ci_vs_metatuner_j" in entry) == (name != "metatuner_j")
    for name in ("metatuner_j", "dpo"):  # both start from the SFT run's adapter, counted in their budget
        assert results["methods"][name]["warmup_train_examples"] == results["methods"]["sft"]["train_examples"]
    assert str(tmp_path / "runs" / "sft" / "adapter") in (tmp_path / "runs" / "dpo" / "config.yaml").read_text()
    assert json.loads((tmp_path / "results" / "toy.json").read_text()) == results
    assert (tmp_path / "results" / "toy.png").is_file() and (tmp_path / "results" / "toy.md").is_file()
    capsys.readouterr()
    compare(path)
    assert capsys.readouterr().out.count("skipping") == 6
    (tmp_path / "results" / "toy.json").unlink()
    assert compare(path, report_only=True) == results  # nothing runs, the same results come back
    assert "skipping" not in capsys.readouterr().out
    (tmp_path / "results" / "toy.json").unlink()
    assert compare(path, report_only=True) == results  # nothing runs, the same results come back


def test_each_method_reports_its_own_peak_memory_not_an_earlier_ones(tiny_dir, tmp_path, monkeypatch):
    """Methods run one after another in compare's process: a method's peak_rss_mb must not be the peak of one run
    before it (here SFT, made to hold 400 MB for a moment)."""
    from metatuner import compare as compare_module

    real = compare_module.run_method

    def sft_holds_memory(cfg, name, full=False):
        if name == "sft":
            bytearray(400 * 2**20)  # allocated, written and freed: the process's peak grows by 400 MB
        return real(cfg, name, full)

    monkeypatch.setattr(compare_module, "run_method", sft_holds_memory)
    results = compare(_config(tmp_path, tiny_dir, {"sft": {}, "params_only": {"metatuner.use_prompt": False}}))
    peaks = {name: entry["peak_rss_mb"] for name, entry in results["methods"].items()}
    assert peaks["params_only"] < peaks["sft"] - 300, peaks


def test_compare_seeded_sample_full_split_and_overrides(tiny_dir, tmp_path):
    path = _config(tmp_path, tiny_dir, {"zero_shot": {}, "sft": {}}, eval_sample=4, eval_sample_seed=3,
                   full_test_methods=["zero_shot"])
    results = compare(path, overrides=["eval.max_new_tokens=2"])
    ids = results["eval_ids"]
    assert len(ids) == 4 and len(set(ids)) == 4
    for name in ("zero_shot", "sft"):  # every method scored on the same sampled items
        samples = (tmp_path / "runs" / name / "eval" / "samples.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in samples] == ids
    full = json.loads((tmp_path / "results" / "toy-full.json").read_text())
    assert list(full["methods"]) == ["zero_shot"] and full["methods"]["zero_shot"]["n_eval"] == 6
    # Rows record their own commands; which items were scored is said, not copied from the config's notes.
    assert "overrides" not in results
    assert results["eval_items"] == "4 test items, a seeded sample (eval_sample_seed 3)"
    assert full["eval_items"] == "6 test items"
    assert (tmp_path / "results" / "toy-training.png").is_file()  # SFT's loss curve
    with gzip.open(tmp_path / "results" / "samples" / "toy" / "sft.jsonl.gz", "rt") as f:
        assert [json.loads(line)["id"] for line in f] == ids
    # Another seed draws other items (the sample is seeded, not the first N).
    (tmp_path / "other").mkdir()
    other = _config(tmp_path / "other", tiny_dir, {"zero_shot": {}}, eval_sample=4, eval_sample_seed=4)
    assert compare(other)["eval_ids"] != ids


@pytest.mark.bad_input
def test_bad_input_compare_full_test_methods_must_be_methods(tiny_dir, tmp_path):
    path = _config(tmp_path, tiny_dir, {"zero_shot": {}}, eval_sample=2, full_test_methods=["sft"])
    with pytest.raises(ConfigError, match="full_test_methods.*sft"):
        load_compare_config(path)


@pytest.mark.bad_input
def test_bad_input_compare_config_names_the_method(tiny_dir, tmp_path):
    path = _config(tmp_path, tiny_dir, {"metatuner_j": {"metatuner.rank": 0}})
    with pytest.raises(ConfigError, match="metatuner_j.*metatuner.rank"):
        load_compare_config(path)


@pytest.mark.trust
def test_trust_method_names_cannot_escape_the_runs_folder(tiny_dir, tmp_path):
    path = _config(tmp_path, tiny_dir, {"../../etc": {}})
    with pytest.raises(ConfigError, match="method name"):
        load_compare_config(path)


def test_compare_keeps_published_rows_whose_run_folders_are_gone(tiny_dir, tmp_path, capsys):
    import shutil

    methods = {"zero_shot": {}, "sft": {}, "metatuner_j": {}}
    path = _config(tmp_path, tiny_dir, methods)
    first = compare(path)
    capsys.readouterr()
    # Another machine: the run folders are gone, only the published results remain; a new method is added, and
    # the SFT adapter it starts from is trained again (not evaluated: the published SFT row stays).
    shutil.rmtree(tmp_path / "runs")
    # A row published before `answers_in_prompts` existed gets it from its per-item outputs.
    published = tmp_path / "results" / "toy.json"
    assert first["methods"]["metatuner_j"]["diagnostics"]["answers_in_prompts"]["items"] == 6
    old = json.loads(published.read_text())
    del old["methods"]["metatuner_j"]["diagnostics"]["answers_in_prompts"]
    published.write_text(json.dumps(old))
    path = _config(tmp_path, tiny_dir, {**methods, "params_only": {"metatuner.use_prompt": False}})
    results = compare(path, only=["params_only"])
    out = capsys.readouterr().out
    assert "params_only starts from the SFT adapter" in out and not (tmp_path / "runs" / "sft" / "eval").exists()
    assert "kept the published rows of metatuner_j, sft, zero_shot" in out
    assert list(results["methods"]) == ["metatuner_j", "params_only", "sft", "zero_shot"]  # the config's order
    for name in methods:
        assert results["methods"][name] == first["methods"][name]  # kept as published, intervals recomputed alike
    new = results["methods"]["params_only"]
    assert new["ci_vs_metatuner_j"] and new["warmup_train_examples"] == first["methods"]["sft"]["train_examples"]
    assert results["eval_ids"] == first["eval_ids"]
    curves = tmp_path / "results" / "samples" / "toy"
    assert {p.name for p in curves.glob("*.curves.json")} == {"sft.curves.json", "metatuner_j.curves.json",
                                                            "params_only.curves.json"}
    plot = tmp_path / "results" / "toy-training.png"
    (curves / "metatuner_j.curves.json").unlink()  # as for rows published before curves were saved
    plot.write_bytes(b"published")
    compare(path, report_only=True)
    assert plot.read_bytes() == b"published" and "no saved training curves for metatuner_j" in capsys.readouterr().out
    # Results scored on other items are not mixed with these: their rows are dropped, and the command says so.
    shutil.rmtree(tmp_path / "runs")
    path = _config(tmp_path, tiny_dir, methods, eval_sample=3)
    results = compare(path, only=["zero_shot"])
    assert "scored on other items" in capsys.readouterr().out
    assert list(results["methods"]) == ["zero_shot"]


@pytest.mark.fault
def test_fault_compare_stopped_mid_method_says_how_to_continue_and_keeps_finished_methods(tiny_dir, tmp_path,
                                                                                          monkeypatch):
    """A method whose training stops (here: losses that stay non-finite) ends the command with its exit code and the
    override that continues it; the methods finished before it are skipped on the rerun, not run again."""
    import torch
    from typer.testing import CliRunner

    from metatuner.cli import app
    from metatuner.model import MetaTuner

    path = _config(tmp_path, tiny_dir, {"sft": {}, "metatuner_j": {}})
    nan = lambda self, *a, **k: torch.tensor(float("nan"), requires_grad=True)  # noqa: E731
    with monkeypatch.context() as patch:
        patch.setattr(MetaTuner, "task_loss", nan)
        stopped = CliRunner().invoke(app, ["compare", "-c", str(path), "train.max_bad_steps=1",
                                           "train.save_every=1"])
    assert stopped.exit_code == 1, stopped.output
    assert "non-finite" in stopped.output and "train.resume=auto" in stopped.output
    assert (tmp_path / "runs" / "sft" / "eval" / "metrics.json").is_file()
    resumed = CliRunner().invoke(app, ["compare", "-c", str(path), "train.resume=auto"])
    assert resumed.exit_code == 0, resumed.output
    assert "sft: finished earlier, skipping" in resumed.output
    assert set(json.loads((tmp_path / "results" / "toy.json").read_text())["methods"]) == {"sft", "metatuner_j"}


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                           if "methods:" in p.read_text()))
def test_every_shipped_comparison_config_loads(config):
    """Every method of every comparison config in configs/ becomes a valid run config (no model is loaded)."""
    cfg = load_compare_config(REPO / "configs" / config)
    assert cfg.methods and all(method_config(cfg, name).output_dir for name in cfg.methods)


def test_method_string_overrides_reach_the_run_config_unchanged(tiny_dir, tmp_path):
    """A method's override is passed on as a dotlist value, which OmegaConf parses as YAML: a string with a colon
    and a newline (a rewrite template) failed to parse, and one reading as a number or `true` changed type."""
    template = "Rewrite it: name the steps.\nInstruction: {instruction}\nQuestion: {question}"
    path = _config(tmp_path, tiny_dir, {"metatuner_j": {"metatuner.rewrite_template": template,
                                                        "data.prompt": "true"}})
    run = method_config(load_compare_config(path), "metatuner_j")
    assert run.metatuner.rewrite_template == template and run.data.prompt == "true"


@pytest.mark.bad_input
def test_bad_input_only_checks_the_models_of_the_methods_that_run(tiny_dir, tmp_path):
    """The architecture checks read each method's config.json before anything trains, but only for the methods that
    run now: `--only sft` must not need the model of another method (an optional one this machine lacks)."""
    from typer.testing import CliRunner

    from metatuner.cli import app

    path = _config(tmp_path, tiny_dir, {"sft": {}, "other_g": {"model.name": str(tmp_path / "absent-model")}})
    everything = CliRunner().invoke(app, ["compare", "-c", str(path)])
    assert everything.exit_code != 0 and "method `other_g`" in everything.output
    assert not (tmp_path / "runs" / "sft").exists()  # refused before anything trained
    only_sft = CliRunner().invoke(app, ["compare", "-c", str(path), "--only", "sft"])
    assert only_sft.exit_code == 0, only_sft.output
    assert (tmp_path / "runs" / "sft" / "eval" / "metrics.json").is_file()


def test_compare_with_seeds_pairs_each_seed_with_the_same_seed_of_metatuner_j(tiny_dir, tmp_path):
    """Each seed's MetaTuner-J starts from that seed's SFT adapter; the interval pools (seed, item) pairs. Fails if
    seeds share run folders or adapters, or if the bootstrap pairs items across seeds."""
    from metatuner.evaluate import paired_bootstrap
    from metatuner.report import per_item_scores

    path = _config(tmp_path, tiny_dir, {"sft": {}, "metatuner_j": {}}, seeds=[0, 1])
    results = compare(path)
    runs = tmp_path / "runs"
    for seed in (0, 1):
        config = (runs / f"seed-{seed}" / "metatuner_j" / "config.yaml").read_text()
        assert f"seed: {seed}\n" in config and str(runs / f"seed-{seed}" / "sft" / "adapter") in config
    sft, j = results["methods"]["sft"], results["methods"]["metatuner_j"]
    assert sft["seeds"] == [0, 1] and len(sft["scores"]) == 2 and sft["n_eval"] == 6
    assert sft["mean"] == pytest.approx(sum(sft["scores"]) / 2, abs=1e-4)
    assert "diagnostics" in j and "p0_share" in j["diagnostics"] and len(j["diagnostics_per_seed"]) == 2
    pairs = {name: {f"{s}:{i}": v for s in (0, 1) for i, v in per_item_scores(
        runs / f"seed-{s}" / name / "eval" / "samples.jsonl", sft["metric"]).items()} for name in ("sft", "metatuner_j")}
    keys = sorted(pairs["sft"])
    assert len(keys) == 12
    expected = paired_bootstrap([pairs["metatuner_j"][k] for k in keys], [pairs["sft"][k] for k in keys])
    assert sft["ci_vs_metatuner_j"] == [round(expected[0], 4), round(expected[1], 4)]
    assert (tmp_path / "results" / "samples" / "toy" / "metatuner_j-seed1.jsonl.gz").is_file()
    assert json.loads((tmp_path / "results" / "toy.json").read_text()) == results


def test_compare_seeds_can_run_apart_and_keep_the_published_seeds(tiny_dir, tmp_path, capsys):
    """`--seeds` runs some of the config's seeds; a seed whose run folder is gone (another machine, another sitting)
    keeps its published score, seconds and per-item outputs, and the interval still pools every seed. Fails if the
    report drops a published seed, mixes up which seed a score belongs to, or runs seeds it was not asked to."""
    from metatuner.report import per_item_scores

    path = _config(tmp_path, tiny_dir, {"sft": {}, "metatuner_j": {}}, seeds=[0, 1])
    runs, samples = tmp_path / "runs", tmp_path / "results" / "samples" / "toy"
    first = compare(path, only_seeds=[0])
    assert first["methods"]["sft"]["seeds"] == [0] and not (runs / "seed-1").exists()
    shutil.rmtree(runs / "seed-0")  # seed 0 ran elsewhere: only its published results are here
    published = json.loads((tmp_path / "results" / "toy.json").read_text())  # as before `answers_in_prompts`
    del published["methods"]["metatuner_j"]["diagnostics_per_seed"][0]["answers_in_prompts"]
    (tmp_path / "results" / "toy.json").write_text(json.dumps(published))
    both = compare(path, only_seeds=[1])
    kept = next(line for line in capsys.readouterr().out.splitlines() if "kept the published rows" in line)
    assert "sft (seed 0)" in kept and "metatuner_j (seed 0)" in kept and "seed 1" not in kept
    assert not (runs / "seed-0").exists()
    for name in ("sft", "metatuner_j"):
        row = both["methods"][name]
        assert row["seeds"] == [0, 1] and row["scores"][0] == first["methods"][name]["scores"][0]
        assert row["train_seconds"][0] == first["methods"][name]["train_seconds"][0]
        seed1 = per_item_scores(runs / "seed-1" / name / "eval" / "samples.jsonl", row["metric"])
        assert row["scores"][1] == pytest.approx(sum(seed1.values()) / len(seed1))
    j_seeds = both["methods"]["metatuner_j"]["diagnostics_per_seed"]
    assert len(j_seeds) == 2 and j_seeds[0] == first["methods"]["metatuner_j"]["diagnostics_per_seed"][0]
    assert both["methods"]["sft"]["ci_vs_metatuner_j"] is not None
    assert {p.name for p in samples.glob("*.jsonl.gz")} == {f"{n}-seed{s}.jsonl.gz" for n in ("sft", "metatuner_j")
                                                            for s in (0, 1)}
    with pytest.raises(ConfigError, match=r"--seeds names seeds not in the config's `seeds` \(\[0, 1\]\): \[5\]"):
        compare(path, only_seeds=[5])


def test_a_method_can_set_an_option_to_null(tiny_dir, tmp_path):
    """`warmup_actor_adapter: null` (a variant that trains its own warm-up of M) reached the run as the string
    'None' and failed when the run loaded an adapter from a folder called None."""
    from metatuner.compare import method_config

    path = _config(tmp_path, tiny_dir, {"sft": {}, "own_warmup": {"metatuner.warmup_actor_adapter": None,
                                                                  "metatuner.warmup_actor_steps": 2}})
    cfg = method_config(load_compare_config(path), "own_warmup")
    assert cfg.metatuner.warmup_actor_adapter is None and cfg.metatuner.warmup_actor_steps == 2


def test_only_runs_started_from_the_sft_adapter_count_its_budget(tiny_dir, tmp_path):
    """A variant that trains its own warm-up of M (`warmup_actor_adapter: null`) never used the SFT adapter: its
    budget is its own run's, not SFT's added on top; MetaTuner-J, started from the adapter, counts SFT's."""
    path = _config(tmp_path, tiny_dir, {"sft": {}, "metatuner_j": {},
                                        "own_warmup": {"metatuner.warmup_actor_adapter": None,
                                                       "metatuner.warmup_actor_steps": 1}})
    results = compare(path)
    sft, runs = results["methods"]["sft"], tmp_path / "runs"
    own = results["methods"]["own_warmup"]
    assert "warmup_train_examples" not in own
    assert own["train_examples"] == json.loads((runs / "own_warmup" / "train_metrics.json").read_text())["train_examples"]
    j = results["methods"]["metatuner_j"]
    j_run = json.loads((runs / "metatuner_j" / "train_metrics.json").read_text())
    assert j["warmup_train_examples"] == sft["train_examples"]
    assert j["train_examples"] == j_run["train_examples"] + sft["train_examples"]
    (tmp_path / "results" / "toy.json").unlink()
    assert compare(path, report_only=True) == results  # read from the run folders alike
    (tmp_path / "results" / "toy.json").unlink()
    from typer.testing import CliRunner

    from metatuner.cli import app

    reported = CliRunner().invoke(app, ["compare", "-c", str(path), "--report-only"])
    assert reported.exit_code == 0, reported.output
    assert json.loads((tmp_path / "results" / "toy.json").read_text()) == results
    # Its run folder gone (another machine), the published row is kept as it is, with SFT's run folder still here:
    # going by the method's name, the report added SFT's budget to it a second time.
    shutil.rmtree(runs / "own_warmup")
    assert compare(path, report_only=True)["methods"]["own_warmup"] == own


def test_paired_bootstrap_against_hand_computed_intervals():
    """Cases whose 95% interval follows from the resampling distribution by hand. Fails on a sign flip (b - a),
    on resampling a and b independently (identical systems would get a wide interval, not [0, 0]) and on other
    quantiles than 2.5% and 97.5%."""
    from metatuner.evaluate import paired_bootstrap

    # Identical per-item scores: every paired difference is 0, whatever the resample.
    assert paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0]) == [0.0, 0.0]
    # One item, a beats b by 1: every resample's mean difference is 1.
    assert paired_bootstrap([1.0], [0.0]) == [1.0, 1.0]
    # Differences (1, 0, 0, 0): a resample's mean is k/4 with k ~ Binomial(4, 1/4); P(k=0) = 0.316 > 2.5%, and
    # P(k <= 2) = 0.949 < 97.5% <= P(k <= 3) = 0.996, so the interval is [0, 3/4].
    assert paired_bootstrap([1, 1, 0, 1], [0, 1, 0, 1]) == [0.0, 0.75]
    assert paired_bootstrap([0, 1, 0, 1], [1, 1, 0, 1]) == [-0.75, 0.0]
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_add_intervals_pairs_the_shared_items_and_subtracts_the_method_from_metatuner_j():
    """The interval is MetaTuner-J minus the method, over the items both scored. Fails on the sign, on pairing by
    position instead of item id, and on counting items only one of them scored."""
    from metatuner.report import add_intervals

    results = {"methods": {"metatuner_j": {}, "sft": {}, "zero_shot": {}}}
    items = {"metatuner_j": {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0},
             "sft": {"d": 1.0, "c": 0.0, "b": 1.0, "a": 0.0, "extra": 1.0},  # differences (1, 0, 0, 0) by id
             "zero_shot": {"a": 1.0, "b": 1.0}}  # only a and b shared, both equal
    add_intervals(results, items)
    assert results["methods"]["sft"]["ci_vs_metatuner_j"] == [0.0, 0.75]
    assert results["methods"]["zero_shot"]["ci_vs_metatuner_j"] == [0.0, 0.0]
    assert "ci_vs_metatuner_j" not in results["methods"]["metatuner_j"]


@pytest.mark.fault
def test_fault_a_run_stopped_before_its_metrics_resumes_and_writes_them(tiny_dir, tmp_path):
    """Fails if a run whose model was saved but whose train_metrics.json was not (the process stopped between the two)
    counts as trained: its row would then lack its training budget, or it would be retrained from scratch."""
    path = _config(tmp_path, tiny_dir, {"metatuner_j": {"train.save_every": 1, "train.resume": "auto"}})
    compare(path)
    run = tmp_path / "runs" / "metatuner_j"
    weights = (run / "model" / "metatuner.safetensors").read_bytes()
    (run / "train_metrics.json").unlink()
    shutil.rmtree(run / "eval")
    results = compare(path)
    assert (run / "train_metrics.json").is_file() and results["methods"]["metatuner_j"]["train_examples"] > 0
    assert (run / "model" / "metatuner.safetensors").read_bytes() == weights  # resumed at the end, not retrained
