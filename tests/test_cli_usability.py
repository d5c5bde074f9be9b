"""What a new user trips over: evaluating a run on other data, task options and override typos, fast errors, and
the exported adapter's model card. Each test names the mistake it guards against."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metatuner.cli import app
from metatuner.config import ConfigError, load_config
from metatuner.train import train_metatuner

REPO = Path(__file__).resolve().parents[1]
NUMBERS = REPO / "data" / "examples" / "arithmetic.jsonl"


@pytest.fixture(scope="module")
def chain_sum_run(tiny_dir_2layers, tmp_path_factory):
    out = tmp_path_factory.mktemp("usability") / "run"
    return train_metatuner(load_config(None, [
        f"model.name={tiny_dir_2layers}", "model.device=cpu", f"output_dir={out}", "data.task=rg:chain_sum",
        "data.task_options={size: 4, test_size: 4}", "train.batch_size=4", "train.max_steps=1",
        "train.mixed_precision=fp32", "metatuner.share_depth=1", "metatuner.rank=2", "metatuner.hyper_hidden=8",
        "metatuner.g_lora_r=2", "metatuner.max_prompt_tokens=3", "metatuner.warmup_generator=false"]))


def test_eval_run_on_a_users_own_file_with_another_task_and_metric(chain_sum_run, tmp_path):
    """`--task`/`--task-option` with `--run` were silently ignored: the run's own chain_sum items were scored."""
    result = CliRunner().invoke(app, [
        "eval", "--run", str(chain_sum_run), "--task", "custom", "--task-option", f"path={NUMBERS}",
        "--task-option", "question_field=q", "--task-option", "answer_field=a", "--task-option", "metric=numeric",
        "--limit", "3", "--max-new-tokens", "2", "--out", str(tmp_path / "ev"), "--prompt", "Add them up."])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["task"] == "custom" and metrics["n_eval"] == 3 and metrics["p0"] == "Add them up."
    questions = [json.loads(line)["q"] for line in NUMBERS.read_text().splitlines()[:3]]
    samples = [json.loads(line) for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert [s["input"] for s in samples] == questions


def test_eval_run_task_options_apply_over_the_runs_own(chain_sum_run, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--run", str(chain_sum_run), "--task-option", "test_size=2",
                                      "--max-new-tokens", "2", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_eval"] == 2


@pytest.mark.bad_input
@pytest.mark.parametrize("flag", [["--model", "other-model"], ["--adapter", "."]])
def test_bad_input_eval_run_rejects_what_it_cannot_apply(chain_sum_run, flag):
    result = CliRunner().invoke(app, ["eval", "--run", str(chain_sum_run), *flag])
    assert result.exit_code == 2 and flag[0] in result.output


@pytest.mark.bad_input
def test_bad_input_task_option_typo_is_named_with_a_suggestion_before_anything_loads(chain_sum_run):
    """A misspelt key ended in a TypeError traceback from the task's constructor."""
    runner = CliRunner()
    for args in (["eval", "--task", "custom", "--task-option", f"path={NUMBERS}", "--task-option", "question_feild=q"],
                 ["eval", "--run", str(chain_sum_run), "--task-option", "min_term=2"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "did you mean" in result.output and "Traceback" not in result.output
    with pytest.raises(ConfigError, match="data.task_options.*question_feild.*did you mean `question_field`"):
        load_config(None, ["data.task=custom", "data.task_options={path: x.jsonl, question_feild: q}"])


@pytest.mark.bad_input
def test_bad_input_override_typo_is_blamed_on_the_command_line_with_a_suggestion():
    """It blamed the config file and printed OmegaConf's internal full_key/object_type lines."""
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "demo-arithmetic.yaml", ["train.learnig_rate=1e-4"])
    message = str(err.value)
    assert "on the command line" in message and "did you mean `train.lr`" in message
    assert "demo-arithmetic.yaml" not in message and "full_key" not in message and "object_type" not in message


def test_make_demo_passes_its_overrides():
    shown = subprocess.run(["make", "-n", "demo", "ARGS=train.max_steps=2 data.eval_limit=5"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert "metatuner.demo train.max_steps=2 data.eval_limit=5" in shown


@pytest.mark.bad_input
def test_bad_input_cli_errors_come_before_the_heavy_imports(tmp_path):
    """Every error took 10-14 s because torch and transformers loaded before the arguments were checked."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom metatuner.cli import app\n"
            "for args in (['eval', '--task', 'gsm8k', '--data-path', 'missing.jsonl'], ['eval', '--run', 'nowhere'],"
            " ['infer', '--run', 'nowhere', 'q'], ['train', '-c', 'configs/demo-arithmetic.yaml', 'train.lrr=1']):\n"
            "    r = CliRunner().invoke(app, args)\n    assert r.exit_code == 2, r.output\n"
            "assert 'torch' not in sys.modules, 'torch was imported before the error'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_peft_on_a_loaded_model_raises_no_future_warning(tiny_dir_2layers):
    """Every model load printed transformers' FutureWarning about PEFT reading `is_gradient_checkpointing`."""
    code = ("from peft import LoraConfig, get_peft_model\nfrom metatuner.models import load_model\n"
            f"model, _ = load_model({str(tiny_dir_2layers)!r}, device='cpu')\n"
            "get_peft_model(model, LoraConfig(r=2, target_modules=['q_proj']))\n")
    subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], cwd=REPO, check=True)
