"""Checkpoints that survive crashes: written atomically, verified on load, resumable exactly.

    save_checkpoint(run_dir, step, tensors={...}, optimizer=opt, scheduler=sched, state={...}, keep=2)
    path = find_checkpoint(run_dir, "auto")          # the newest complete checkpoint, or None
    ckpt = load_checkpoint(path)                     # .step, .tensors, .state; then .restore(opt, sched)

A checkpoint is a folder `checkpoints/step-00000040/` holding `weights.safetensors` (the caller's trainable
tensors), `optimizer.safetensors` + `optimizer.json` (the optimizer's tensors and the rest of its state) and
`state.json` (step, scheduler, the RNG states, anything else the trainer wants back). Nothing is pickled: loading a
checkpoint someone else wrote never runs code. RNG states have one format, `capture_rng_state`'s JSON (Python,
NumPy, torch CPU and CUDA), in state.json's `rng` and, under N processes, in each rank's entry of the trainer's
`rank_rng` (`distributed.rank_rng_states`); checkpoints written before it kept torch's part in `rng.safetensors`,
which `load_checkpoint` still reads. The folder is written under a temporary name, flushed to disk and renamed
when complete, so a crash or a full disk mid-save leaves the previous checkpoint whole and never a half-written
one. state.json, written last, records the SHA-256 of every other file: a truncated or corrupted file (even one
whose damage the safetensors header does not show) is reported by name on load instead of being trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
FILES = ("weights.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")
OLD_RNG_FILE = "rng.safetensors"  # torch's RNG state in checkpoints written before the one RNG format


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for index, entries in state_dict["state"].items():
        rest["state"][str(index)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                rest["state"][str(index)][name] = value
    return tensors, rest


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in rest["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def capture_rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and CUDA (every visible device) RNG states as JSON lists: the one
    format of every RNG state a checkpoint holds. Plain JSON, so reading one back runs no code."""
    python, np_state = random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": [python[0], list(python[1]), python[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist(),
            "cuda": {str(device): state.tolist() for device, state in enumerate(cuda)}}


def restore_rng_state(state: dict) -> None:
    """Restore what `capture_rng_state` captured (CUDA states only onto devices this machine has)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available():
        for device, cuda in state.get("cuda", {}).items():
            if int(device) < torch.cuda.device_count():
                torch.cuda.set_rng_state(torch.tensor(cuda, dtype=torch.uint8), int(device))


def _write_json(path: Path, payload: Any) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    # safetensors does not fsync; without it a power cut after the rename could leave an empty file in place.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors' `save_file`, except that the file appears whole or not at all: a crash or a full disk midway
    leaves the previous file at `path` as it was."""
    _atomic(Path(path), lambda tmp: save_file(tensors, str(tmp)))


def atomic_write_text(path: str | Path, text: str) -> None:
    """`Path.write_text` (UTF-8) that leaves the previous file whole if the write fails."""
    _atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _atomic(path: Path, write) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: str | Path, step: int, *, tensors: dict[str, torch.Tensor], optimizer, scheduler=None,
                    state: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`; returns its folder."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
        opt_tensors, opt_rest = _split_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", opt_rest)
        for name in FILES:
            if name.endswith(".safetensors"):
                _fsync(tmp / name)
        _write_json(tmp / "state.json", {
            "step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": capture_rng_state(), "trainer": state or {},
            "sha256": {name: _sha256(tmp / name) for name in FILES if name != "state.json"},
        })
        _fsync(tmp)
        replaced = None
        if final.exists():  # saving a step again: move the old copy aside rather than delete it before the rename
            replaced = root / f".replaced-{final.name}-{os.getpid()}"
            os.replace(final, replaced)
        os.replace(tmp, final)  # the checkpoint exists only once every file is complete
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """`auto`: the newest checkpoint under run_dir (None if there is none); otherwise the path given."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint not found: {path}")
        return path
    found = sorted((Path(run_dir) / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict  # the trainer's own state
    _optimizer: dict
    _scheduler: dict | None
    _rng: dict  # capture_rng_state's format

    def restore(self, optimizer, scheduler=None) -> None:
        """Load the optimizer and scheduler states and the RNG states (call after the model's tensors)."""
        optimizer.load_state_dict(self._optimizer)
        if scheduler is not None and self._scheduler is not None:
            scheduler.load_state_dict(self._scheduler)
        restore_rng_state(self._rng)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint in folder `path`, its files verified against the checksums saved with it; a missing, damaged
    or corrupted file is a CheckpointError that names it."""
    path = Path(path)
    _require(path, FILES)
    state = _read(path, "state.json", _read_json)
    keys = state if isinstance(state, dict) else {}
    missing = [key for key in ("step", "scheduler", "rng", "trainer") if key not in keys]
    if missing or not isinstance(state["rng"], dict):
        raise CheckpointError(f"checkpoint file {path / 'state.json'} is damaged: it lacks "
                              f"{', '.join(missing) or 'a readable rng'}")
    _verify_checksums(path, state.get("sha256") or {})  # checkpoints from before checksums have none
    try:
        optimizer = _join_optimizer(_read(path, "optimizer.safetensors", load_file),
                                    _read(path, "optimizer.json", _read_json))
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint file {path / 'optimizer.json'} does not match "
                              f"{path / 'optimizer.safetensors'}: {err!r}") from err
    rng = state["rng"] if "torch" in state["rng"] else _rng_of_old_checkpoint(path, state["rng"])
    return Checkpoint(path, int(state["step"]), _read(path, "weights.safetensors", load_file), state["trainer"],
                      optimizer, state["scheduler"], rng)


def _rng_of_old_checkpoint(path: Path, host_rng: dict) -> dict:
    """Compatibility with checkpoints written before the one RNG format: their state.json's `rng` held Python's
    and NumPy's states only, and torch's were tensors in rng.safetensors ("torch", and "cuda.<device>" per GPU).
    Read as safetensors (nothing unpickled) and returned in `capture_rng_state`'s format."""
    _require(path, (OLD_RNG_FILE,))
    tensors = _read(path, OLD_RNG_FILE, load_file)
    if "torch" not in tensors:
        raise CheckpointError(f"checkpoint file {path / OLD_RNG_FILE} is damaged: it lacks torch's RNG state")
    cuda = {key.removeprefix("cuda."): value.tolist() for key, value in tensors.items() if key.startswith("cuda.")}
    return {**host_rng, "torch": tensors["torch"].tolist(), "cuda": cuda}


def _require(path: Path, names) -> None:
    for name in names:
        if not (path / name).is_file():
            raise CheckpointError(f"incomplete checkpoint: {path / name} is missing")


def _read(path: Path, name: str, reader):
    try:
        return reader(str(path / name))
    except Exception as err:  # truncated or corrupted: name the file, never guess
        raise CheckpointError(f"cannot read checkpoint file {path / name}: {err}") from err


def _read_json(file: str):
    with open(file) as f:
        return json.load(f)


def _verify_checksums(path: Path, sha256: dict[str, str]) -> None:
    for name, expected in sha256.items():
        if name in (*FILES, OLD_RNG_FILE):
            _require(path, (name,))
            if _sha256(path / name) != expected:
                raise CheckpointError(f"checkpoint file {path / name} is corrupted (its SHA-256 differs from the "
                                      "one recorded when it was saved)")
