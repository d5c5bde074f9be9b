"""Checkpoint and resume: a run killed with SIGKILL and resumed ends where an uninterrupted run ends."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metatuner import checkpoint as ckpt_module
from metatuner.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from metatuner.testing import optimizer_with_state




def _config(tmp_path, tiny_dir, out):
    cfg = {
        "method": "metatuner", "output_dir": str(out),
        "model": {"name": str(tiny_dir), "device": "cpu"},
        "data": {"task": "rg:chain_sum", "task_options": {"size": 8, "test_size": 2}},
        "train": {"batch_size": 4, "max_steps": 8, "save_every": 2, "mixed_precision": "fp32", "warmup_ratio": 0.25},
        "metatuner": {"share_depth": 2, "rank": 4, "hyper_hidden": 32, "g_lora_r": 4, "max_prompt_tokens": 4,
                      "n_rollouts": 2, "sync_every": 3, "lr_hyper": 1e-2, "lr_generator": 1e-2},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config, *extra, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "metatuner", "train", "--config", str(config), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    return proc


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    _train(_config(tmp_path, tiny_dir, tmp_path / "straight"))

    interrupted = _config(tmp_path, tiny_dir, tmp_path / "killed")
    proc = _train(interrupted, wait=False)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step-00000004").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists()  # it really died before the end
    _train(interrupted, "--resume", "auto")

    # A checkpoint is written at the end too (save_every=2 with 8 steps keeps steps 6 and 8).
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").glob("step-*")) == [
        "step-00000006", "step-00000008"]
    a = load_file(str(tmp_path / "straight" / "model" / "metatuner.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "metatuner.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    d2 = [(tmp_path / run / "model" / "expert_prompts.json").read_text() for run in ("straight", "killed")]
    assert d2[0] == d2[1]


def test_resume_checkpoint_write_killed_midway_leaves_previous_whole(tmp_path, monkeypatch):
    param, optimizer = optimizer_with_state()
    save_checkpoint(tmp_path, 1, tensors={"p": param}, optimizer=optimizer, state={"x": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module, "_write_json", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, 2, tensors={"p": param * 2}, optimizer=optimizer)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    loaded = load_checkpoint(find_checkpoint(tmp_path, "auto"))
    assert loaded.step == 1 and torch.equal(loaded.tensors["p"], param.detach()) and loaded.state == {"x": 1}


def test_resume_restores_optimizer_and_rng_and_keeps_the_newest(tmp_path):
    import random

    import numpy as np

    param, optimizer = optimizer_with_state()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, tensors={"p": param}, optimizer=optimizer, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    _, fresh = optimizer_with_state()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    load_checkpoint(find_checkpoint(tmp_path, "auto")).restore(fresh)
    assert torch.equal(torch.rand(4), expected[0])  # torch, NumPy and Python streams all continue exactly
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.mark.fault
def test_fault_truncated_checkpoint_file_is_named(tmp_path):
    param, optimizer = optimizer_with_state()
    path = save_checkpoint(tmp_path, 1, tensors={"p": param}, optimizer=optimizer)
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        load_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        find_checkpoint(tmp_path, str(Path(tmp_path) / "nope"))


@pytest.mark.fault
def test_fault_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_dir, tmp_path):
    config = _config(tmp_path, tiny_dir, tmp_path / "stopped")
    proc = _train(config, wait=False)
    deadline = time.time() + 300
    while not (tmp_path / "stopped" / "checkpoints" / "step-00000002").is_dir():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-1000:]
    assert b"--resume auto" in err
    step = load_checkpoint(find_checkpoint(tmp_path / "stopped", "auto")).step
    assert 2 <= step < 8
    _train(config, "--resume", "auto")
    assert (tmp_path / "stopped" / "model" / "metatuner.safetensors").is_file()


@pytest.mark.fault
def test_fault_non_finite_losses_skip_updates_then_stop_with_a_checkpoint(tiny_dir, tmp_path, monkeypatch):
    from metatuner.config import load_config
    from metatuner.model import MetaTuner
    from metatuner.train import train_metatuner
    from metatuner.trainer import TrainingStopped

    monkeypatch.setattr(MetaTuner, "task_loss", lambda self, *a, **k: torch.tensor(float("nan"), requires_grad=True))
    cfg = load_config(_config(tmp_path, tiny_dir, tmp_path / "nan"), ["train.max_bad_steps=3",
                                                                      "metatuner.warmup_generator=false"])
    with pytest.raises(TrainingStopped, match="3 non-finite losses"):
        train_metatuner(cfg)
    saved = load_checkpoint(find_checkpoint(tmp_path / "nan", "auto"))
    assert saved.step == 2 and saved.state["history"] == {}


@pytest.mark.fault
def test_fault_non_finite_gradients_skip_updates_and_leave_the_weights_finite(tiny_dir, tmp_path, monkeypatch):
    """A finite loss with an inf/NaN gradient (a bf16 overflow in the backward pass) must not reach the weights."""
    from metatuner.config import load_config
    from metatuner.model import MetaTuner
    from metatuner.train import train_metatuner
    from metatuner.trainer import TrainingStopped

    def finite_loss_bad_gradient(self, *args, **kwargs):
        weight = next(self.hyper.parameters())
        return torch.sqrt((weight * 0).sum())  # value 0, gradient sqrt'(0) = inf

    monkeypatch.setattr(MetaTuner, "task_loss", finite_loss_bad_gradient)
    cfg = load_config(_config(tmp_path, tiny_dir, tmp_path / "grad"), ["train.max_bad_steps=3",
                                                                       "metatuner.warmup_generator=false",
                                                                       "metatuner.use_prompt=false"])
    with pytest.raises(TrainingStopped, match="3 non-finite losses or gradients"):
        train_metatuner(cfg)
    saved = load_checkpoint(find_checkpoint(tmp_path / "grad", "auto"))
    assert saved.step == 2
    assert all(torch.isfinite(t).all() for t in saved.tensors.values())


def test_resume_sft_from_a_mid_run_checkpoint_ends_like_the_uninterrupted_run(tiny_dir, tmp_path):
    """LoRA dropout (torch RNG), gradient accumulation (the data position counts micro-batches) and the scheduler
    all have to come back exactly for the adapters to match."""
    from metatuner.baselines.sft import train_sft
    from metatuner.config import load_config

    def cfg(out, *extra):
        return load_config(None, [
            "method=sft", f"model.name={tiny_dir}", "model.device=cpu", f"output_dir={out}",
            "data.task=rg:chain_sum", "data.task_options={size: 8, test_size: 2}", "lora.r=4", "lora.alpha=8",
            "lora.dropout=0.1", "lora.target_modules=[q_proj,v_proj]", "train.batch_size=3", "train.grad_accum=2",
            "train.max_steps=5", "train.lr=1e-2", "train.warmup_ratio=0.2", "train.mixed_precision=fp32",
            "train.save_every=2", "train.keep_checkpoints=5", *extra])

    straight = train_sft(cfg(tmp_path / "straight"))
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004", "step-00000005"]  # every 2 steps and at the end
    resumed = train_sft(cfg(tmp_path / "resumed", f"train.resume={straight / 'checkpoints' / 'step-00000002'}"))
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    curves = [json.loads((d / "train_metrics.json").read_text())["history"]["train/loss"] for d in (straight, resumed)]
    assert curves[0] == curves[1] and len(curves[0]) == 10  # 5 steps x 2 micro-batches


# ----- RNG states: one JSON format; checkpoints of the old format (torch's part in rng.safetensors) still load ----


def _draws():
    import random

    import numpy as np

    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


def _seed_everything(seed):
    import random

    import numpy as np

    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)


def _rewrite_in_the_old_rng_format(path):
    """Turn a checkpoint into what checkpoint.py wrote before the one RNG format: torch's CPU state (and
    "cuda.<device>" states) as tensors in rng.safetensors, only Python's and NumPy's in state.json, and the
    SHA-256 of rng.safetensors beside the others."""
    from safetensors.torch import save_file

    state = json.loads((path / "state.json").read_text())
    rng = state["rng"]
    tensors = {"torch": torch.tensor(rng.pop("torch"), dtype=torch.uint8)}
    tensors.update({f"cuda.{d}": torch.tensor(s, dtype=torch.uint8) for d, s in rng.pop("cuda").items()})
    save_file(tensors, str(path / "rng.safetensors"))
    state["sha256"]["rng.safetensors"] = ckpt_module._sha256(path / "rng.safetensors")
    (path / "state.json").write_text(json.dumps(state))


def test_rng_states_are_json_in_state_json_and_nothing_else_holds_them(tmp_path):
    param, optimizer = optimizer_with_state()
    _seed_everything(3)
    path = save_checkpoint(tmp_path, 1, tensors={"p": param}, optimizer=optimizer)
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.json", "optimizer.safetensors", "state.json", "weights.safetensors"]
    rng = json.loads((path / "state.json").read_text())["rng"]
    assert rng == ckpt_module.capture_rng_state()  # the same format as every rank's entry under N processes
    assert set(rng) == {"python", "numpy", "torch", "cuda"} and len(rng["torch"]) == torch.get_rng_state().numel()


def test_resume_reads_a_checkpoint_written_in_the_old_rng_format(tmp_path):
    param, optimizer = optimizer_with_state()
    _seed_everything(7)
    path = save_checkpoint(tmp_path, 1, tensors={"p": param}, optimizer=optimizer, state={"x": 1})
    expected = _draws()
    _rewrite_in_the_old_rng_format(path)
    assert "torch" not in json.loads((path / "state.json").read_text())["rng"]

    _seed_everything(0)
    loaded = load_checkpoint(path)
    loaded.restore(optimizer_with_state()[1])
    assert loaded.state == {"x": 1} and _draws() == expected  # torch's stream too, read from rng.safetensors


@pytest.mark.fault
@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_fault_old_format_checkpoint_with_a_damaged_rng_file_is_named(tmp_path, damage):
    param, optimizer = optimizer_with_state()
    path = save_checkpoint(tmp_path, 1, tensors={"p": param}, optimizer=optimizer)
    _rewrite_in_the_old_rng_format(path)
    rng_file = path / "rng.safetensors"
    if damage == "missing":
        rng_file.unlink()
    else:  # a byte of tensor data: safetensors reads it without complaint, the checksum does not
        data = bytearray(rng_file.read_bytes())
        data[-5] ^= 0xFF
        rng_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(rng_file))):
        load_checkpoint(path)
