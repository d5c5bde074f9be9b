"""The README's commands, as written, on a fresh clone: each `metatuner` command in its shell blocks runs (on the
tiny test model in place of the embedded one, on tiny runs in place of trained ones, with small limits), and each
config a `train` or `compare` command names loads with its overrides. Fails when the README shows a flag, a path
or an option syntax the CLI does not accept, or data that is not in the repository."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metatuner.baselines.sft import train_sft
from metatuner.cli import app
from metatuner.compare import load_compare_config
from metatuner.config import load_config
from metatuner.train import train_metatuner

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("metatuner "):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.fixture(scope="module")
def tiny_runs(tiny_dir_2layers, tmp_path_factory):
    """A MetaTuner run and an SFT adapter trained for one step on the shipped GSM8K file."""
    root = tmp_path_factory.mktemp("readme")
    common = [f"model.name={tiny_dir_2layers}", "model.device=cpu", "data.task=gsm8k",
              f"data.train_path={REPO / 'data/gsm8k/train.jsonl'}", "data.train_limit=4", "train.batch_size=4",
              "train.max_steps=1", "train.mixed_precision=fp32"]
    run = train_metatuner(load_config(None, [*common, f"output_dir={root / 'mt'}", "metatuner.share_depth=1",
                                             "metatuner.rank=2", "metatuner.hyper_hidden=8", "metatuner.g_lora_r=2",
                                             "metatuner.max_prompt_tokens=3", "metatuner.warmup_generator=false",
                                             "metatuner.rollout_every=100"]))
    sft = train_sft(load_config(None, [*common, "method=sft", f"output_dir={root / 'sft'}", "lora.r=2"]))
    return {"run": str(run), "adapter": str(sft / "adapter"), "root": root}


def _localise(args: list[str], tiny_dir, runs) -> list[str]:
    out = []
    for arg in args:
        if arg == "embedded:smollm2-135m-instruct":
            arg = str(tiny_dir)
        elif arg.startswith("runs/") and arg.endswith("/adapter"):
            arg = runs["adapter"]
        elif arg.startswith("runs/"):
            arg = runs["run"]
        elif arg.startswith("adapters/"):
            arg = str(runs["root"] / arg)
        out.append(arg)
    return out


def test_readme_has_the_commands_this_test_checks():
    commands = readme_commands()
    assert sum(c[0] == "eval" for c in commands) >= 5 and any(c[0] == "export" for c in commands)
    assert any(c[0] == "serve" and "--run" in c for c in commands) and any(c[0] == "serve" and "--model" in c
                                                                         for c in commands)
    assert not [c for c in commands if any("../shared" in a for a in c)]


def test_readme_commands_run_as_written(tiny_dir_2layers, tiny_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository root
    # `serve` loads what it serves and builds its app, but does not block listening: tests/test_serve.py serves
    served = []
    monkeypatch.setattr("metatuner.serve.app.run_server", lambda app, settings: served.append(app.state.backend))
    runner = CliRunner()
    for raw in readme_commands():
        args = _localise(raw, tiny_dir_2layers, tiny_runs)
        command = " ".join(raw)
        if args[0] in ("train", "compare"):
            config = args[args.index("--config") + 1]
            overrides = [a for a in args[1:] if "=" in a and not a.startswith("-")]
            (load_compare_config if args[0] == "compare" else load_config)(config, overrides)
            continue
        if args[0] == "eval":
            if "--run" not in args and "--model" not in args:
                args += ["--model", str(tiny_dir_2layers)]
            if "--limit" in args:
                del args[args.index("--limit"): args.index("--limit") + 2]
            args += ["--limit", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "eval"), "--device", "cpu"]
        if args[0] == "infer":
            args += ["--max-new-tokens", "2"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{command}\n{result.output}"
        if args[0] == "serve":
            assert served and served.pop().name, command
