"""Shared helpers for the scripts in benchmarks/: the project's measurement rules in one place.

The rules: measure the things being compared in ONE process, interleaved (a, b, a, b, ...), each after a warm-up,
and report the median of several repetitions together with the machine, the thread count and the exact command.

    from common import Summary, command_line, machine, sync, write_json

    ours = Summary([tokens / seconds for tokens, seconds in runs])
    write_json("docs/performance/x.json", {"command": command_line(), "machine": machine(), "ours": ours.as_dict()})
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch


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


def now() -> float:
    return time.perf_counter()


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


def command_line() -> str:
    """The command that is running, as typed (thread variables included, since they change the figures)."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    cmd = " ".join(["python", *(shlex.quote(a) for a in sys.argv)])
    return f"{env} {cmd}" if env else cmd


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
