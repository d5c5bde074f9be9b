"""What every training method shares: the run folder, seeding, resume, periodic checkpoints, signals and metrics.

    out = open_run_folder(cfg)
    accelerator, precision = make_accelerator(cfg, out)               # MetaTuner and SFT
    run = start_run(cfg, out, accelerator.is_main_process, precision)  # config.yaml, the seed, the task, p0
    ckpt = find_resume(cfg, out)                                       # None unless train.resume finds one
    with StepControl(cfg.train.save_every, accelerator, save=save_checkpoint_at) as control:
        for step in range(first, total_steps + 1):
            ...                                                        # one optimiser step
            control.after_step(step, total_steps)   # periodic checkpoint; SIGINT/SIGTERM: save, then stop
    write_metrics(out, metrics, accelerator)        # train_metrics.json and the trackers

Every method logs its scalars to TensorBoard in `out/tb/`: MetaTuner and SFT through their Accelerator's trackers
(`accelerator.init_trackers("tb")`), the methods without an Accelerator of their own (DPO inside TRL's Trainer, the
instruction searches under a PartialState) through `start_tracker(out)`, the same accelerate tracker and folder;
`TrackerCallback` hands a transformers/TRL Trainer's logs to it.

Every method's `train_metrics.json` has one schema: `method`, `command`, `train_seconds`, `peak_rss_mb`, the
examples it trained on (`train_examples`, `unique_train_examples`), `precision` where it trains in one, and
`history`: {"train/<name>": [one value per optimiser step, logging interval or search round]}; then the method's
own keys. `compare` reads the curves from `history` (and from `loss_curve`, which run folders written before kept).
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker
from transformers import TrainerCallback

from .checkpoint import Checkpoint, find_checkpoint, load_checkpoint
from .config import RunConfig, to_yaml
from .distributed import sum_across
from .runtime import Precision, command_line, peak_rss_mb, resolve_precision
from .tasks import get_task
from .tasks.base import Task


class TrainingStopped(RuntimeError):
    """Training stopped early on purpose (a signal, or diverging losses) after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Run:
    """A started run: its folder, its task and the initial instruction p0."""

    out: Path
    task: Task
    p0: str


def open_run_folder(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_accelerator(cfg: RunConfig, out: Path, **kwargs) -> tuple[Accelerator, Precision]:
    """The run's Accelerator, in the precision `train.mixed_precision` resolves to, logging to TensorBoard in out/."""
    precision = resolve_precision(cfg.train.mixed_precision, cfg.model.device)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, log_with="tensorboard", project_dir=str(out),
                              cpu=cfg.model.device == "cpu", **kwargs)
    return accelerator, precision


def start_tracker(out: Path) -> TensorBoardTracker:
    """accelerate's TensorBoard tracker writing to out/tb/, where `make_accelerator`'s trackers write after
    `init_trackers("tb")`, for a method that has no Accelerator to hold it. It writes on the main process only
    (the others log nothing); `finish()` closes it. Make it after the processes are set up (PartialState or the
    Trainer): on first use it asks PartialState which process is the main one."""
    tracker = TensorBoardTracker("tb", out)
    tracker.start()
    return tracker


class TrackerCallback(TrainerCallback):
    """Sends what a transformers (or TRL) Trainer logs every `logging_steps` (loss, learning rate, TRL's rewards, ...)
    to a tracker, as `train/<name>` at the Trainer's global step: the tags of SFT's and MetaTuner's scalars."""

    def __init__(self, tracker: GeneralTracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        scalars = {f"train/{k}": v for k, v in (logs or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.log(scalars, step=state.global_step)


def start_run(cfg: RunConfig, out: Path, main: bool = True, precision: Precision | None = None) -> Run:
    """Write config.yaml (main process), say the precision, seed torch and build the task."""
    if main:
        (out / "config.yaml").write_text(to_yaml(cfg))
        if precision is not None:
            precision.announce()
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.data.task, **cfg.data.task_kwargs())
    return Run(out, task, cfg.data.prompt or task.default_prompt)


def find_resume(cfg: RunConfig, out: Path) -> Checkpoint | None:
    """The checkpoint `train.resume` names (`auto`: the newest in the run folder), loaded; None without one."""
    path = find_checkpoint(out, cfg.train.resume) if cfg.train.resume else None
    return load_checkpoint(path) if path else None


class StepControl:
    """What happens between two optimiser steps whatever the step did (trained, skipped a non-finite update, or
    had nothing to train): the periodic checkpoint, then a SIGINT/SIGTERM on any rank saves and stops the run.

    The signal is recorded, not acted on at once, so the step in flight finishes and its checkpoint is whole.
    `save(step)` writes a checkpoint (collective: every rank calls it) and returns its path.
    """

    def __init__(self, save_every: int, accelerator, save: Callable[[int], Path | None]):
        self.save_every, self.accelerator, self.save = save_every, accelerator, save
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame):
        self.signal = signum

    def __enter__(self) -> StepControl:
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def after_step(self, step: int, total_steps: int) -> None:
        if self.save_every and (step % self.save_every == 0 or step == total_steps):
            self.save(step)
        if sum_across([self.signal or 0], self.accelerator)[0]:  # a signal on any rank stops them all
            path = self.save(step)
            signum = self.signal or signal.SIGTERM  # a rank that got none stops as if terminated
            raise TrainingStopped(f"stopped by signal {signum} after step {step}; saved {path}.",
                                  exit_code=128 + signum)


def run_metrics(method: str, **values) -> dict[str, Any]:
    """The keys every train_metrics.json starts with (see the module docstring), then `values`."""
    return {"method": method, "command": command_line(), **values, "peak_rss_mb": peak_rss_mb()}


def write_metrics(out: Path, metrics: dict[str, Any], tracker: Accelerator | GeneralTracker | None = None,
                  step: int | None = None) -> None:
    """train_metrics.json, and its scalar summary (train_seconds, peak_rss_mb, ...) to the run's trackers: an
    Accelerator's, or one tracker from `start_tracker` (both have `log(values, step=)`)."""
    if tracker is not None:
        scalars = {f"run/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.log(scalars, step=step)
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n")
