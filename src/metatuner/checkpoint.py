"""Checkpoints that survive crashes: written atomically, verified on load, resumable exactly.

    save_checkpoint(run_dir, step, tensors={...}, optimizer=opt, scheduler=sched, state={...}, keep=2)
    path = find_checkpoint(run_dir, "auto")          # the newest complete checkpoint, or None
    ckpt = load_checkpoint(path)                     # .step, .tensors, .state; then .restore(opt, sched)

A checkpoint is a folder `checkpoints/step-00000040/` holding `weights.safetensors` (the caller's trainable
tensors), `optimizer.safetensors` + `optimizer.json` (the optimizer's tensors and the rest of its state),
`state.json` (step, scheduler, Python/NumPy RNG states, anything else the trainer wants back) and `rng.safetensors`
(torch's RNG state). Nothing is pickled. The folder is written under a temporary name, flushed to disk and renamed
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
FILES = ("weights.safetensors", "optimizer.safetensors", "optimizer.json", "state.json", "rng.safetensors")


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


def host_rng_state() -> dict:
    """Python's and NumPy's RNG states as JSON lists (checkpoints, and each rank's states under N processes)."""
    python, np_state = random.getstate(), np.random.get_state()
    return {"python": [python[0], list(python[1]), python[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_host_rng_state(state: dict) -> None:
    """Restore what `host_rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    state = host_rng_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return state, tensors


def _set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    set_host_rng_state(state)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


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
        rng_json, rng_tensors = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        for name in FILES[:-1]:
            if name.endswith(".safetensors"):
                _fsync(tmp / name)
        _write_json(tmp / "state.json", {
            "step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_json, "trainer": state or {},
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
    _rng: tuple[dict, dict]

    def restore(self, optimizer, scheduler=None) -> None:
        """Load the optimizer and scheduler states and the RNG states (call after the model's tensors)."""
        optimizer.load_state_dict(self._optimizer)
        if scheduler is not None and self._scheduler is not None:
            scheduler.load_state_dict(self._scheduler)
        _set_rng_state(*self._rng)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    for name in FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"incomplete checkpoint: {path / name} is missing")

    def read(name, reader):
        try:
            return reader(str(path / name))
        except Exception as err:  # truncated or corrupted: name the file, never guess
            raise CheckpointError(f"cannot read checkpoint file {path / name}: {err}") from err

    def read_json(p):
        with open(p) as f:
            return json.load(f)

    state = read("state.json", read_json)
    keys = state if isinstance(state, dict) else {}
    missing = [key for key in ("step", "scheduler", "rng", "trainer") if key not in keys]
    if missing:
        raise CheckpointError(f"checkpoint file {path / 'state.json'} is damaged: it lacks {', '.join(missing)}")
    for name, expected in (state.get("sha256") or {}).items():  # checkpoints from before checksums have none
        if name in FILES and _sha256(path / name) != expected:
            raise CheckpointError(f"checkpoint file {path / name} is corrupted (its SHA-256 differs from the one "
                                  "recorded when it was saved)")
    try:
        optimizer = _join_optimizer(read("optimizer.safetensors", load_file), read("optimizer.json", read_json))
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint file {path / 'optimizer.json'} does not match "
                              f"{path / 'optimizer.safetensors'}: {err!r}") from err
    return Checkpoint(path, int(state["step"]), read("weights.safetensors", load_file), state["trainer"], optimizer,
                      state["scheduler"], (state["rng"], read("rng.safetensors", load_file)))
