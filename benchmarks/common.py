"""Shared helpers for the scripts in benchmarks/: the project's measurement rules in one place.

The rules: measure the things being compared in ONE process, interleaved (a, b, a, b, ...), each after a warm-up,
and report the median of several repetitions together with the machine, the thread count and the exact command.

    from common import Summary, command_line, machine, sync, write_json

    ours = Summary([tokens / seconds for tokens, seconds in runs])
    write_json("docs/performance/x.json", {"command": command_line(), "machine": machine(), "ours": ours.as_dict()})
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from metatuner.runtime import cpu_bf16


@dataclass
class Summary:
    """Repetitions of one figure: the median is the headline, the rest shows the spread."""

    values: Sequence[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        return {
            "median": round(self.median, digits),
            "min": round(min(self.values), digits),
            "max": round(max(self.values), digits),
            "values": [round(v, digits) for v in self.values],
        }


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued accelerator work, so that a timestamp taken next covers it (a no-op on CPU)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


CLOCK = "wall"
"""What `now()` reads: "wall" (time.perf_counter) or "cpu" (time.process_time: CPU seconds of this process, all
its threads). On a CPU shared with other jobs, wall time of one and the same call swings several-fold with their
load, while this process's CPU time barely moves; with one torch thread it equals wall time on an idle machine."""


def now() -> float:
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, core counts, accelerator, thread settings and library versions."""
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = os.cpu_count()
    info: dict[str, Any] = {
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # what decides the training precision (metatuner.runtime): bf16 only where the CPU runs it natively
        "cpu_bf16": {**asdict(cpu_bf16()), "native": cpu_bf16().native},
    }
    return info


def library_versions(*names: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# Thread counts, and the variables that restrict PyTorch's CPU kernels (which decide whether bf16 is native).
ENV_THAT_CHANGES_FIGURES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def command_line() -> str:
    """The command that is running, as typed (the variables that change the figures included)."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ENV_THAT_CHANGES_FIGURES if k in os.environ)
    cmd = " ".join(["python", *(shlex.quote(a) for a in sys.argv)])
    return f"{env} {cmd}" if env else cmd


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, number: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in turns: every repetition runs each function `number` times,
    alternating which goes first (so drift in machine load falls on both sides). `warmup` untimed rounds first."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            sync()
            start = now()
            for _ in range(number):
                fns[name]()
            sync()
            seconds[name].append((now() - start) / number)
    return seconds


def autocast(precision: str, device: str = "cpu"):
    """bf16 autocast or nothing for fp32 (training's `auto` picks bf16 only on a CPU with native bf16)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_summary() -> dict[str, Any]:
    """What else ran on the machine: load averages and the busiest other processes (ratios stay fair under load
    because both sides are interleaved, but absolute figures do not)."""
    info: dict[str, Any] = {}
    try:
        info["loadavg"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        pass
    try:
        top = subprocess.run(["top", "-bn1", "-w", "200"], capture_output=True, text=True, timeout=10).stdout
        rows = [line for line in top.splitlines()[7:] if line.strip()]
        info["top"] = [" ".join(line.split()[8:10] + line.split()[11:])[:120] for line in rows[:6]]
    except (OSError, subprocess.SubprocessError):
        pass
    return info
