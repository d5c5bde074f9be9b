"""TRL trainers (the GRPO and DPO baselines) run the way MetaTuner's own loops do: a checkpoint every
`train.save_every` steps, `train.resume` (`auto`: the newest checkpoint under the run's `trainer/`), SIGINT or
SIGTERM finishing the step and saving before the run stops (`TrainingStopped`), and `train_seconds` summed over
every sitting of a resumed run.

    seconds = train_resumably(trainer, cfg, out, tracker, start)   # trainer: a TRL trainer writing to out/trainer

The trainer's arguments need `save_strategy="steps"` when `train.save_every` is set and
`restore_callback_states_from_checkpoint=True` (`checkpoint_arguments` gives both).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint

from ..config import RunConfig
from ..trainer import TrainingStopped


def checkpoint_arguments(cfg: RunConfig) -> dict:
    """The TRL config's checkpoint settings for this run."""
    return {"save_strategy": "steps" if cfg.train.save_every else "no", "save_steps": cfg.train.save_every or 500,
            "save_total_limit": cfg.train.keep_checkpoints, "restore_callback_states_from_checkpoint": True}


def resume_checkpoint(cfg: RunConfig, trainer_dir: Path) -> str | None:
    """The TRL checkpoint `train.resume` names: `auto` is the newest under trainer_dir (None: a fresh start)."""
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        return get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    if not Path(cfg.train.resume).is_dir():
        raise FileNotFoundError(f"train.resume: no TRL checkpoint folder at {cfg.train.resume}")
    return cfg.train.resume


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM while TRL trains: finish the step, save a checkpoint, stop (the signal is recorded, not acted
    on at once, so the checkpoint is whole)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        self.signal = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class KeepSaveInterval(TrainerCallback):
    """This run's save interval, not the resumed checkpoint's: transformers restores the whole TrainerState from a
    checkpoint, `save_steps` included, and only warns that it differs from the arguments. A run started without
    `train.save_every` (save_steps 500) and resumed with it would otherwise never save before step 500."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.save_steps = args.save_steps


class SittingSeconds(TrainerCallback, ExportableState):
    """The seconds of a run's earlier sittings, kept in every checkpoint (transformers saves an `ExportableState`
    callback's `state()` in trainer_state.json and builds it again from there on resume). A sitting counts from
    `since`: the start of the method in the first sitting, the restore in a resumed one."""

    def __init__(self, earlier: float = 0.0, since: float | None = None):
        self.earlier = earlier
        self.since = time.perf_counter() if since is None else since

    def state(self) -> dict:
        return {"args": {"earlier": self.earlier + time.perf_counter() - self.since}, "attributes": {}}


def train_resumably(trainer, cfg: RunConfig, out: Path, tracker, start: float) -> float:
    """Train (from the checkpoint `train.resume` names), stopping with a checkpoint on SIGINT/SIGTERM; returns the
    training seconds of every sitting, this one counted from `start` (a `time.perf_counter()` value)."""
    stop = StopOnSignal()
    for callback in (stop, KeepSaveInterval(), SittingSeconds(since=start)):
        trainer.add_callback(callback)
    with stop:
        try:
            trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, out / "trainer"))
        finally:
            if stop.signal is not None:
                tracker.finish()
    if stop.signal is not None:
        raise TrainingStopped(f"stopped by signal {stop.signal} after step {trainer.state.global_step}; saved "
                              f"{get_last_checkpoint(str(out / 'trainer'))}.", exit_code=128 + stop.signal)
    # A resumed trainer holds the SittingSeconds rebuilt from its checkpoint in place of the one added above.
    seconds = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SittingSeconds))
    return seconds.earlier + time.perf_counter() - start
