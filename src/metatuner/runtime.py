"""What a run records about where and how it runs: its precision (and why), its command line, its memory.

    precision = resolve_precision(cfg.train.mixed_precision, cfg.model.device)   # e.g. Precision("no", ...)
    precision.announce()                         # one line on stderr, once per process
    Accelerator(mixed_precision=precision.mixed_precision, ...)
    summary["precision"] = precision.as_dict()   # recorded in the run's train_metrics.json

bf16 autocast pays only where the hardware computes in bf16. On CUDA that is Ampere and later. On a CPU it is
AVX512-BF16 or AMX: on one thread of a Xeon with both, a LoRA forward+backward of a SmolLM2-135M-shaped model
(batch 8 x 64 tokens) took 4.0 s under bf16 autocast against 6.6 s in fp32; with PyTorch's kernels restricted to
AVX2 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, what an AVX2-only CPU runs) it took 282 s against 12.8 s
(`benchmarks/precision.py`, docs/performance.md). So `auto` picks bf16 on a CPU only where it is native, and an
explicit `bf16` elsewhere is honoured with a warning.
"""

from __future__ import annotations

import logging
import os
import resource
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# oneDNN ISA limits below AVX512_CORE_BF16: with one of these in ONEDNN_MAX_CPU_ISA, oneDNN has no bf16 kernels.
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
_ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU offers for bf16, as PyTorch sees it (the environment variables can restrict the hardware)."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ... (after ATEN_CPU_CAPABILITY)
    avx512_bf16: bool
    amx: bool
    onednn_max_cpu_isa: str | None

    @property
    def native(self) -> bool:
        isa = (self.onednn_max_cpu_isa or "").upper()
        return (self.avx512_bf16 or self.amx) and self.capability.startswith("AVX512") and isa not in _ONEDNN_WITHOUT_BF16

    def describe(self) -> str:
        units = [name for name, has in (("AVX512-BF16", self.avx512_bf16), ("AMX", self.amx)) if has]
        limit = f", ONEDNN_MAX_CPU_ISA={self.onednn_max_cpu_isa}" if self.onednn_max_cpu_isa else ""
        return f"CPU capability {self.capability}{limit}; bf16 hardware: {', '.join(units) or 'none'}"


def cpu_bf16() -> CpuBf16:
    check = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # noqa: E731  (absent on other arches)
    return CpuBf16(capability=torch.backends.cpu.get_cpu_capability(), avx512_bf16=check("_is_avx512_bf16_supported"),
                   amx=check("_is_amx_tile_supported"), onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"))


def device_type(device: str) -> str:
    """The kind of device a `model.device` setting ends up on (`auto`: CUDA, else MPS, else CPU)."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return torch.device(device).type


@dataclass(frozen=True)
class Precision:
    setting: str  # what the config asked for: auto, fp32, bf16 or fp16
    mixed_precision: str  # what runs, as accelerate spells it: no, bf16 or fp16
    device: str  # cpu, cuda, mps
    reason: str
    cpu: dict | None = None  # CpuBf16 fields on a CPU
    slow: bool = False  # bf16 asked for explicitly where it is emulated

    def as_dict(self) -> dict:
        return asdict(self)

    def announce(self) -> None:
        """Say once per process what runs and why (and warn when an explicit bf16 will be slow)."""
        line = f"precision: {self.mixed_precision if self.mixed_precision != 'no' else 'fp32'} ({self.reason})"
        if line in _ANNOUNCED:
            return
        _ANNOUNCED.add(line)
        if self.slow:
            log.warning("%s", line)
        else:
            print(f"metatuner: {line}", file=sys.stderr, flush=True)


_ANNOUNCED: set[str] = set()


def resolve_precision(setting: str, device: str = "auto") -> Precision:
    """The precision a run uses for `train.mixed_precision=setting` on `device` (a `model.device` value)."""
    kind = device_type(device)
    cpu = cpu_bf16() if kind == "cpu" else None
    if setting != "auto":
        if setting not in _ACCELERATE_NAMES:
            raise ValueError(f"mixed precision must be auto, fp32, bf16 or fp16, got {setting!r}")
        slow = setting == "bf16" and cpu is not None and not cpu.native
        reason = f"set explicitly; {cpu.describe()}" if cpu else "set explicitly"
        if slow:
            reason += (": this CPU emulates bf16, so bf16 autocast runs many times slower than fp32 (about 17-22x "
                       "measured); use train.mixed_precision=auto or fp32")
        return Precision(setting, _ACCELERATE_NAMES[setting], kind, reason, asdict(cpu) if cpu else None, slow)
    if kind == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name()
        return Precision(setting, "bf16" if bf16 else "fp16", kind,
                         f"auto: {name} {'has' if bf16 else 'has no'} bf16 support")
    if kind == "cpu":
        if cpu.native:
            return Precision(setting, "bf16", kind, f"auto: native bf16 on this CPU ({cpu.describe()})", asdict(cpu))
        return Precision(setting, "no", kind, f"auto: no native bf16 on this CPU ({cpu.describe()}), where bf16 "
                         "autocast is many times slower than fp32", asdict(cpu))
    return Precision(setting, "no", kind, f"auto: fp32 on {kind}")


def command_line() -> str:
    """The command that is running, as a user would type it (recorded next to every result)."""
    script = Path(sys.argv[0])
    if script.name in ("metatuner", "__main__.py", "cli.py"):
        program = "metatuner"
    elif script.suffix == ".py" and script.parent.name == "metatuner":  # python -m metatuner.<module>
        program = f"python -m metatuner.{script.stem}"
    else:
        program = sys.argv[0]
    return " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])


def _proc_status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux), in MiB; None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (what a run reports next to its timings). VmHWM on
    Linux rather than getrusage's ru_maxrss, which survives fork and exec: a run started by a big parent process
    (a test, a launcher, a benchmark) would report the parent's peak."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024, 1)  # macOS reports bytes


def reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) again from its present size, so that the next method run
    in the same process (`metatuner compare` runs them one after another) reports its own peak, not an earlier
    one's. Linux only (/proc/self/clear_refs); elsewhere it does nothing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux; 0 elsewhere)."""
    return _proc_status_mb("VmRSS") or 0.0
