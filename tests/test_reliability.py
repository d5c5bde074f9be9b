"""Reliability and trust: bad configs and models caught before weights load, faults that lose nothing, and nothing
that MetaTuner loads or reads from a model is ever run. Select with `pytest -k "bad_input or fault or trust"`;
docs/reliability.md lists every case with its test.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

import pytest

from metatuner.tasks import get_task
from metatuner.testing import optimizer_with_state
from metatuner.tasks.reasoning_gym_task import EVAL_SCORERS, SYMPY_SCORERS, is_plain_math

# ----- model output is never executed ------------------------------------------------------------------------


@pytest.mark.trust
@pytest.mark.parametrize("dataset", sorted(EVAL_SCORERS | SYMPY_SCORERS))
def test_trust_reasoning_gym_scorers_never_run_model_output(dataset, tmp_path):
    task = get_task(f"rg:{dataset}", size=2, test_size=1)
    example = task.load("train", limit=1)[0]
    marker = tmp_path / "ran"
    attack = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    for output in (f"The answer is {attack}", f"The answer is {attack}!", f"The answer is [{attack}]"):
        assert task.score(output, example)["accuracy"] == 0.0
    assert not marker.exists()
    # ...while the gold answer still scores, so the guard does not just switch the scorer off.
    assert task.score(example.target, example)["accuracy"] == 1.0


@pytest.mark.trust
def test_trust_literal_answers_still_read_without_eval():
    task = get_task("rg:string_insertion", size=2, test_size=1)
    example = task.load("train", limit=1)[0]
    # The scorer gives partial credit to the answer written as a Python list of characters.
    assert task.score(f"The answer is {list(example.answer)}", example)["score"] == pytest.approx(0.1)
    import reasoning_gym.algorithmic.string_insertion as module

    assert "eval" not in vars(module)  # the replacement is undone after the call


@pytest.mark.trust
@pytest.mark.parametrize("text, plain", [
    ("-5*X**9 - 2*X**6/3 + 4*X**3 + C", True), ("6*(98 - 54) - 34 - 66", True), ("sqrt(2)*pi + x**y", True),
    ("9**9**9", False), ("(9**99)**99", False), ("2**(10**10)", False), ("__import__('os')", False),
    ("x.real", False), ("'a'*10", False), ("f'{1}'", False), ("S('1')", False), ("x!", False), ("1" * 2000, False),
])
def test_trust_sympy_answers_must_be_plain_math(text, plain):
    assert is_plain_math(text) is plain


@pytest.mark.trust
def test_trust_every_evaluating_reasoning_gym_scorer_is_guarded():
    """A reasoning-gym upgrade that adds a scorer calling eval/parse_expr fails here instead of running answers."""
    import reasoning_gym

    # Reviewed: they evaluate the generator's own expressions (or, for codeio, its shipped code) while building
    # items, and propositional_logic's parse_expr is its own parser, not Python's.
    reviewed = {"basic_arithmetic", "bitwise_arithmetic", "codeio", "propositional_logic"}
    calls = re.compile(r"(?<![\w.])(eval|exec|parse_expr|sympify)\s*\(|\.(parse_expr|sympify)\s*\(")
    unguarded = []
    for name, (cls, _) in reasoning_gym.factory.DATASETS.items():
        modules = {sys.modules[c.__module__] for c in cls.__mro__ if c.__module__.startswith("reasoning_gym")}
        if any(calls.search(inspect.getsource(m)) for m in modules):
            if name not in EVAL_SCORERS | SYMPY_SCORERS | reviewed:
                unguarded.append(name)
    assert not unguarded


@pytest.mark.trust
def test_trust_math_verify_runs_under_a_timeout():
    import time

    from metatuner.tasks.math import math_equal

    start = time.perf_counter()
    for found in ("9^{9^{9^{9}}}", "2^{2^{2^{2^{2^{2}}}}}", "(" * 25 + "x" + ")" * 25):
        assert math_equal(found, "3", timeout_s=1) is False
    assert time.perf_counter() - start < 15  # about 1 s each; without the timeout the first one never returns


# ----- bad data ------------------------------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _counter(text):
    return len(text.split())


@pytest.mark.bad_input
def test_bad_input_example_longer_than_the_context_names_file_line_and_field(tmp_path):
    from metatuner.tasks import DataError, DataWarning, check_lengths

    path = _jsonl(tmp_path / "d.jsonl", [{"q": "one two", "a": "1"}, {"q": "word " * 50, "a": "2"},
                                         {"q": "three", "a": "3"}])
    task = get_task("custom", path=str(path), question_field="q", answer_field="a")
    examples = task.load("train")
    with pytest.raises(DataError) as info:
        check_lengths(examples, _counter, max_tokens=20)
    assert (info.value.source, info.value.line, info.value.field) == (str(path), 2, "question")
    assert "longer than the context of 20" in str(info.value)
    with pytest.warns(DataWarning, match=r"Skipped 1 bad row\(s\) .*line 2"):
        kept = check_lengths(examples, _counter, max_tokens=20, on_bad_row="skip")
    assert [ex.answer for ex in kept] == ["1", "3"]


@pytest.mark.bad_input
@pytest.mark.parametrize("task_name, options, content, line, field", [
    ("cosmosqa", {"train_rows": None}, "id,context,question,answer0,answer1,answer2,answer3,label\n"
     "a,c,q,w,x,y,z,1\nb,c,q,w,x,y,z,4\n", 3, "label"),
    ("custom", {"id_field": "id"}, '{"id": "x", "question": "q", "answer": "1"}\n'
     '{"id": "x", "question": "r", "answer": "2"}\n', 2, "id"),
    ("gsm8k", {}, '{"question": "q", "answer": "no final line"}\n', 1, "answer"),
])
def test_bad_input_task_files_name_file_line_and_field(tmp_path, task_name, options, content, line, field):
    from metatuner.tasks import DataError

    path = tmp_path / ("d.csv" if task_name == "cosmosqa" else "d.jsonl")
    path.write_text(content)
    with pytest.raises(DataError) as info:
        get_task(task_name, **options).load("test", path=str(path))
    assert (info.value.source, info.value.line, info.value.field) == (str(path), line, field)


@pytest.mark.bad_input
def test_bad_input_data_on_bad_row_skip_reaches_the_task(tmp_path):
    from metatuner.config import load_config
    from metatuner.tasks import DataWarning

    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}, {"question": "", "answer": "2"}])
    cfg = load_config(None, ["data.task=custom", f"data.task_options={{path: {path}}}", "data.on_bad_row=skip"])
    with pytest.warns(DataWarning, match="line 2"):
        assert len(get_task(cfg.data.task, **cfg.data.task_kwargs()).load("train")) == 1


@pytest.mark.bad_input
def test_bad_input_on_bad_row_flag_of_eval_and_train(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from metatuner.cli import app
    from metatuner.tasks import DataWarning

    path = _jsonl(tmp_path / "d.jsonl", [{"question": "1 + 1", "answer": "2"}, {"question": "x", "answer": ""},
                                         {"question": "word " * 600, "answer": "3"}])
    args = ["eval", "--model", str(tiny_dir), "--task", "custom", "--task-option", f"path={path}", "--device", "cpu",
            "--max-new-tokens", "2", "--out", str(tmp_path / "ev")]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and f"{path}, line 2, field 'answer': empty value" in result.output
    with pytest.warns(DataWarning) as record:
        result = runner.invoke(app, [*args, "--on-bad-row", "skip"])
    assert result.exit_code == 0, result.output
    messages = " ".join(str(w.message) for w in record)
    assert "line 2, field 'answer'" in messages and "line 3, field 'question'" in messages  # the 1,800-token row
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_eval"] == 1

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {tiny_dir}, device: cpu}}\noutput_dir: {tmp_path / 'run'}\n"
                      f"data: {{task: custom, task_options: {{path: {path}}}}}\n"
                      "metatuner: {share_depth: 2, target_modules: [q_proj]}\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and f"{path}, line 2, field 'answer'" in result.output
    _jsonl(path, [{"question": "1 + 1", "answer": "2"}, {"question": "word " * 40, "answer": "3"}])
    result = runner.invoke(app, ["train", "--config", str(config), "train.max_length=64"])
    assert result.exit_code == 2 and f"{path}, line 2, field 'question'" in result.output
    assert "longer than the context of 64" in result.output
    assert not (tmp_path / "run").exists()  # all of this before any model loads or any run folder is made


@pytest.mark.bad_input
def test_bad_input_skip_leaves_over_long_examples_out_of_training(tiny_dir, tmp_path):
    from metatuner.baselines.sft import train_sft
    from metatuner.config import load_config
    from metatuner.tasks import DataWarning

    path = _jsonl(tmp_path / "d.jsonl", [{"question": "1 + 1", "answer": "2"}, {"question": "word " * 200, "answer": "3"},
                                         {"question": "2 + 2", "answer": "4"}])
    cfg = load_config(None, ["method=sft", f"model.name={tiny_dir}", "model.device=cpu", f"output_dir={tmp_path / 'run'}",
                             "data.task=custom", f"data.task_options={{path: {path}}}", "data.on_bad_row=skip",
                             "train.max_length=128", "train.batch_size=2", "train.mixed_precision=fp32",
                             "lora.target_modules=[q_proj]"])
    with pytest.warns(DataWarning, match="line 2"):
        out = train_sft(cfg)
    assert json.loads((out / "train_metrics.json").read_text())["unique_train_examples"] == 2


@pytest.mark.bad_input
def test_bad_input_cli_skip_reports_each_over_long_example_once(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from metatuner.cli import app
    from metatuner.tasks import DataWarning

    path = _jsonl(tmp_path / "d.jsonl", [{"question": "1 + 1", "answer": "2"}, {"question": "word " * 200, "answer": "3"},
                                         {"question": "2 + 2", "answer": "4"}])
    config = tmp_path / "run.yaml"
    config.write_text(f"method: sft\nmodel: {{name: {tiny_dir}, device: cpu}}\noutput_dir: {tmp_path / 'run'}\n"
                      f"data: {{task: custom, task_options: {{path: {path}}}}}\n"
                      "train: {max_length: 128, batch_size: 2, mixed_precision: fp32}\nlora: {target_modules: [q_proj]}\n")
    with pytest.warns(DataWarning) as record:
        result = CliRunner().invoke(app, ["train", "--config", str(config), "--on-bad-row", "skip"])
    assert result.exit_code == 0, result.output
    reports = sum("line 2" in str(w.message) for w in record) + result.output.count("line 2")
    assert reports == 1  # not once by the CLI and again by the trainer


# ----- bad configs: checked against the models' config.json before weights load ---------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize("override, key", [
    ("metatuner.share_depth=4", "metatuner.share_depth"),          # the tiny generator has 4 layers
    ("metatuner.share_depth=0.1", "metatuner.share_depth"),        # rounds to 0 layers
    ("metatuner.target_modules=[q_proj,c_attn]", "metatuner.target_modules"),
    ("metatuner.g_target_modules=[query]", "metatuner.g_target_modules"),
    ("metatuner.warmup_actor_steps=2 lora.target_modules=[wq]", "lora.target_modules"),
    ("model.actor=/nonexistent/model", "model.actor"),
])
def test_bad_input_config_checked_against_the_model_before_weights_load(tiny_dir, override, key, monkeypatch):
    from transformers import AutoModelForCausalLM

    from metatuner.config import ConfigError, load_config
    from metatuner.models import check_model_settings

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    cfg = load_config(None, [f"model.name={tiny_dir}", "metatuner.share_depth=2", *override.split()])
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_model_settings(cfg)
    check_model_settings(load_config(None, [f"model.name={tiny_dir}", "metatuner.share_depth=2"]))  # the good one


@pytest.mark.bad_input
@pytest.mark.parametrize("override, key", [
    ("metatuner.rank=0", "metatuner.rank"), ("metatuner.n_rollouts=0", "metatuner.n_rollouts"),
    ("train.batch_size=0", "train.batch_size"), ("metatuner.rewrite_template=x", "metatuner.rewrite_template"),
    ("data.on_bad_row=ignore", "data.on_bad_row"), ("model.trust_remote_code=maybe", "model.trust_remote_code"),
    ("metatuner.shared_depth=2", "metatuner.shared_depth"),
])
def test_bad_input_config_values_name_their_key(override, key):
    from metatuner.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


@pytest.mark.bad_input
@pytest.mark.parametrize("content, reason", [
    ("train:\n  lr: [1,\n", "cannot read config file"),
    ("- 1\n- 2\n", "expected keys and values"),
    (b"train: \xff\n", "cannot read config file"),
])
def test_bad_input_unreadable_config_file_is_named(tmp_path, content, reason):
    from metatuner.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=reason) as info:
        load_config(path)
    assert str(path) in str(info.value)


# ----- trust: what MetaTuner loads is never run --------------------------------------------------------------


@pytest.mark.trust
def test_trust_yaml_python_tags_are_refused(tmp_path):
    from metatuner.config import ConfigError, load_config

    marker = tmp_path / "ran"
    path = tmp_path / "run.yaml"
    path.write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="python/object"):
        load_config(path)
    assert not marker.exists()


class _Payload:
    """Unpickling this runs `touch`: the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


@pytest.mark.trust
def test_trust_pickled_model_weights_are_never_loaded(tiny_dir, tmp_path):
    import pickle
    import shutil

    from metatuner.models import ModelLoadError, load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        load_model(str(folder), device="cpu")
    assert not marker.exists()


@pytest.mark.trust
def test_trust_pickled_adapter_is_never_loaded(tiny_dir, tmp_path):
    import pickle

    from typer.testing import CliRunner

    from metatuner.cli import app

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    marker = tmp_path / "ran"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--task", "rg:chain_sum", "--limit", "1",
                                      "--task-option", "size=2", "--task-option", "test_size=1", "--adapter",
                                      str(adapter), "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 2 and "no adapter_model.safetensors" in result.output
    assert not marker.exists()


@pytest.mark.trust
def test_trust_remote_code_is_off_unless_asked(tiny_dir, tmp_path, monkeypatch):
    import shutil

    import transformers

    from metatuner import models

    # A model folder that ships its own Python code: loading it must not import that code.
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    marker = tmp_path / "ran"
    (folder / "custom_llama.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                            "from transformers import LlamaConfig as C, LlamaForCausalLM as M\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_llama.C", "AutoModelForCausalLM": "custom_llama.M"}
    (folder / "config.json").write_text(json.dumps(config))
    models.load_model(str(folder), device="cpu")
    assert not marker.exists()

    # Every loader call gets trust_remote_code=False by default, and True only when asked.
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    models.load_model(str(tiny_dir), device="cpu")
    assert seen and set(seen) == {False}
    seen.clear()
    models.load_model(str(tiny_dir), device="cpu", trust_remote_code=True)
    assert seen and set(seen) == {True}
    from metatuner.config import load_config

    assert load_config(None).model.trust_remote_code is False


@pytest.mark.trust
def test_trust_no_pickle_eval_or_exec_in_the_package():
    """Nothing in MetaTuner unpickles, evaluates or executes text; weights and states go through safetensors/JSON."""
    from pathlib import Path

    import metatuner

    forbidden = re.compile(r"\b(pickle|torch\.load|yaml\.load|yaml\.unsafe_load|marshal|shelve)\b|(?<![\w.])(eval|exec)\(")
    hits = [f"{path.name}:{n}: {line.strip()}"
            for path in Path(metatuner.__file__).parent.rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if forbidden.search(line.split("#")[0]) and not line.lstrip().startswith(('"', "'"))]
    assert not hits


@pytest.mark.trust
@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/abs", "x..y"])
def test_trust_custom_task_names_cannot_escape_their_folder(name):
    with pytest.raises(ValueError, match="task name"):
        get_task("custom", path="d.jsonl", name=name)


@pytest.mark.trust
def test_trust_export_writes_only_into_an_adapter_folder(tmp_path):
    from typer.testing import CliRunner

    from metatuner.cli import app

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    for out in (busy, tmp_path / "notes.txt"):
        (tmp_path / "notes.txt").write_text("keep me")
        # The run folder does not even exist: the destination is refused before anything loads.
        result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "no-run"), "--query", "q", "--out",
                                          str(out)])
        assert result.exit_code == 2 and "not an adapter folder" in result.output
    assert (busy / "notes.txt").read_text() == "keep me" and sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


@pytest.mark.trust
def test_trust_expert_prompts_file_is_validated(tmp_path):
    from metatuner.rollouts import ExpertPromptStore

    path = tmp_path / "expert_prompts.json"
    for content in ("{not json", '["a"]', '{"q1": {"prompt": 3, "score": 1}}', '{"q1": {"prompt": "p"}}'):
        path.write_text(content)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            ExpertPromptStore.load(path)
    path.write_bytes(b'{"q1": {"prompt": "\xff", "score": 1}}')
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ExpertPromptStore.load(path)


# ----- faults: nothing saved is lost, damage is named ---------------------------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize("fail_at", ["optimizer.safetensors", "state.json"])
def test_fault_full_disk_mid_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, fail_at):
    import errno

    import torch

    from metatuner import checkpoint as ckpt
    from metatuner.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    param, optimizer = optimizer_with_state()
    save_checkpoint(tmp_path, 1, tensors={"p": param}, optimizer=optimizer, state={"x": 1})
    real_save_file, real_write_json = ckpt.save_file, ckpt._write_json

    def disk_fills(path):
        # Half the file reaches the disk, then the write fails as a full disk does.
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def save_file(tensors, path, *args, **kwargs):
        return disk_fills(path) if Path(path).name == fail_at else real_save_file(tensors, path, *args, **kwargs)

    def write_json(path, payload):
        return disk_fills(path) if Path(path).name == fail_at else real_write_json(path, payload)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt, "_write_json", write_json)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, tensors={"p": param * 2}, optimizer=optimizer, state={"x": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]  # no temp left over
    loaded = load_checkpoint(find_checkpoint(tmp_path, "auto"))
    assert loaded.step == 1 and torch.equal(loaded.tensors["p"], param.detach()) and loaded.state == {"x": 1}
    # Saving the same step again after a failure replaces it whole.
    monkeypatch.undo()
    save_checkpoint(tmp_path, 1, tensors={"p": param * 3}, optimizer=optimizer, state={"x": 3})
    assert load_checkpoint(find_checkpoint(tmp_path, "auto")).state == {"x": 3}


def _flip_a_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.fault
@pytest.mark.parametrize("name, damage", [
    ("weights.safetensors", "flip"),        # the header still reads: only the checksum shows it
    ("optimizer.safetensors", "truncate"),
    ("optimizer.json", "garbage"),
    ("state.json", "garbage"),
    ("state.json", "empty-object"),
    ("weights.safetensors", "missing"),
])
def test_fault_corrupted_checkpoint_names_the_file(tmp_path, name, damage):
    from metatuner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    param, optimizer = optimizer_with_state()
    path = save_checkpoint(tmp_path, 1, tensors={"p": param}, optimizer=optimizer)
    target = path / name
    if damage == "flip":
        _flip_a_byte(target)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:30])
    elif damage == "garbage":
        target.write_text('{"step": 1, "rng"')
    elif damage == "empty-object":
        target.write_text("{}")
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(target))):
        load_checkpoint(path)


@pytest.mark.fault
def test_fault_corrupted_run_folder_names_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from metatuner.model import MetaTuner

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    weights = model_dir / "metatuner.safetensors"
    save_file({"hyper.x": torch.ones(4)}, str(weights))
    weights.write_bytes(weights.read_bytes()[:40])
    (model_dir / "metatuner.json").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        MetaTuner.load(object.__new__(MetaTuner), model_dir)


@pytest.mark.fault
def test_fault_sigint_and_sigterm_are_recorded_not_fatal():
    import os
    import signal

    from metatuner.trainer import StepControl

    for sig in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(sig)
        with StepControl(0, None, save=lambda step: None) as control:
            os.kill(os.getpid(), sig)  # without the handler: KeyboardInterrupt / the process ends
            assert control.signal == sig
        assert signal.getsignal(sig) == before


@pytest.mark.bad_input
def test_bad_input_compare_checks_every_method_against_the_model(tiny_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from metatuner.cli import app

    base = {"model": {"name": str(tiny_dir), "device": "cpu"}, "data": {"task": "rg:chain_sum"},
            "metatuner": {"share_depth": 2}}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
                                    "base": base, "methods": {"metatuner_j": {}, "deep": {"metatuner.share_depth": 9}}}))
    result = CliRunner().invoke(app, ["compare", "--config", str(path)])
    assert result.exit_code == 2 and "method `deep`" in result.output and "metatuner.share_depth" in result.output
    assert not (tmp_path / "runs" / "metatuner_j").exists()  # nothing ran


@pytest.mark.fault
def test_fault_checkpoint_of_another_model_is_refused_by_name(tokenizer):
    from metatuner.config import MetaTunerSettings
    from metatuner.model import MetaTuner
    from metatuner.testing import tiny_model

    def build(rank):
        settings = MetaTunerSettings(share_depth=2, rank=rank, hyper_hidden=16, g_lora_r=2)
        return MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, settings)

    saved = build(rank=4)
    with pytest.raises(ValueError, match="runs/x/checkpoints/step-00000002"):
        build(rank=2).load_state(saved.trainable_state(), saved.meta(), source="runs/x/checkpoints/step-00000002")


@pytest.mark.fault
def test_fault_full_disk_while_saving_the_model_keeps_the_earlier_one(tmp_path, monkeypatch, tokenizer):
    import errno

    import torch
    from safetensors.torch import load_file

    from metatuner import checkpoint as ckpt
    from metatuner.config import MetaTunerSettings
    from metatuner.model import MetaTuner
    from metatuner.testing import tiny_model

    mt = MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer,
                   MetaTunerSettings(share_depth=2, rank=2, hyper_hidden=8, g_lora_r=2))
    mt.save(tmp_path / "model")
    before = load_file(str(tmp_path / "model" / "metatuner.safetensors"))
    with torch.no_grad():
        for p in mt.hyper.parameters():
            p.add_(1.0)

    def disk_fills(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "save_file", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        mt.save(tmp_path / "model")
    after = load_file(str(tmp_path / "model" / "metatuner.safetensors"))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["metatuner.json", "metatuner.safetensors"]
