"""The precision rule (`metatuner.runtime`): bf16 on a CPU only where it is native, with the CPU capability
mocked both ways, and the choice recorded in the run's train_metrics.json."""

import json
import logging

import pytest
import torch
from accelerate.state import AcceleratorState

from metatuner import runtime
from metatuner.baselines.sft import train_sft
from metatuner.config import load_config
from metatuner.runtime import resolve_precision


def _cpu(monkeypatch, capability: str, avx512_bf16: bool, amx: bool = False, onednn: str | None = None):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    if onednn is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    monkeypatch.setattr(runtime, "_ANNOUNCED", set())


@pytest.mark.parametrize("capability, avx512_bf16, amx, onednn, expected", [
    ("AVX512", True, False, None, "bf16"),  # AVX512-BF16 (e.g. Cooper Lake, Zen 4)
    ("AVX512", False, True, None, "bf16"),  # AMX (Sapphire Rapids)
    ("AVX512", False, False, None, "no"),  # AVX-512 without bf16 (Skylake-SP)
    ("AVX2", False, False, None, "no"),  # most laptops, many EPYCs
    ("AVX2", True, True, None, "no"),  # bf16 hardware, but PyTorch restricted by ATEN_CPU_CAPABILITY=avx2
    ("AVX512", True, True, "AVX2", "no"),  # ... or oneDNN restricted by ONEDNN_MAX_CPU_ISA
    ("AVX512", True, True, "AVX512_CORE_AMX", "bf16"),  # a limit that keeps bf16
])
def test_auto_picks_bf16_on_a_cpu_only_where_it_is_native(monkeypatch, capability, avx512_bf16, amx, onednn, expected):
    """Fails if `auto` keys on the CPU model or on the hardware flags alone (the old rule picked bf16 everywhere)."""
    _cpu(monkeypatch, capability, avx512_bf16, amx, onednn)
    precision = resolve_precision("auto", "cpu")
    assert precision.mixed_precision == expected
    assert capability in precision.reason and not precision.slow
    assert precision.cpu["capability"] == capability


def test_explicit_bf16_without_native_bf16_warns_once_and_is_honoured(monkeypatch, caplog, capsys):
    _cpu(monkeypatch, "AVX2", False)
    with caplog.at_level(logging.WARNING, logger="metatuner.runtime"):
        precision = resolve_precision("bf16", "cpu")
        precision.announce()
        precision.announce()
    assert precision.mixed_precision == "bf16" and precision.slow
    warnings = [r for r in caplog.records if "many times slower" in r.getMessage()]
    assert len(warnings) == 1 and "AVX2" in warnings[0].getMessage()


def test_explicit_settings_on_a_native_cpu_do_not_warn(monkeypatch, caplog, capsys):
    _cpu(monkeypatch, "AVX512", True, True)
    with caplog.at_level(logging.WARNING, logger="metatuner.runtime"):
        for setting, expected in (("bf16", "bf16"), ("fp32", "no")):
            precision = resolve_precision(setting, "cpu")
            precision.announce()
            assert precision.mixed_precision == expected and not precision.slow
    assert not caplog.records
    assert capsys.readouterr().err.count("precision:") == 2


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="auto, fp32, bf16 or fp16"):
        resolve_precision("int8", "cpu")


@pytest.fixture
def fresh_accelerate_state():
    # accelerate keeps one process-wide state whose mixed precision cannot change; the other tests train in fp32.
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("native", [False, True])
def test_a_training_run_prints_and_records_its_precision(tiny_dir_2layers, tmp_path, monkeypatch, capsys, native,
                                                         fresh_accelerate_state):
    """The SFT loop (also MetaTuner's M warm-up in `compare`) must train in what `auto` picks and say why."""
    _cpu(monkeypatch, "AVX512" if native else "AVX2", native, native)
    cfg = load_config(None, [
        "method=sft", f"model.name={tiny_dir_2layers}", "model.device=cpu", f"output_dir={tmp_path / 'sft'}",
        "data.task=rg:chain_sum", "data.task_options={size: 4, test_size: 2}", "train.batch_size=4",
        "train.max_steps=1", "train.mixed_precision=auto", "lora.r=2", "lora.alpha=4",
    ])
    out = train_sft(cfg)
    recorded = json.loads((out / "train_metrics.json").read_text())["precision"]
    assert recorded["setting"] == "auto"
    assert recorded["mixed_precision"] == ("bf16" if native else "no")
    assert recorded["cpu"]["capability"] == ("AVX512" if native else "AVX2")
    printed = capsys.readouterr().err
    assert ("precision: bf16" if native else "precision: fp32") in printed
