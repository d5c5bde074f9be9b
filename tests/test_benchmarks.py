"""The benchmark suite runs end to end in its quick mode (tiny model) and writes every headline figure.

Speed is never asserted here: the figures depend on the machine and its load. This only keeps the code from rotting.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURED = ["hyperlora_vs_peft", "metatuner_step_vs_trl_sft", "j_step_vs_trl_sft", "scoring_vs_forward",
            "generation_speedup", "memory_vs_sft", "eval_examples_per_s"]
# llama.cpp is never run in quick mode; lm_eval only where the bench extra is installed. Both say why not.
OPTIONAL = {"generation_vs_llama_cpp": False, "eval_vs_lm_eval": importlib.util.find_spec("lm_eval") is not None}


def test_quick_benchmark_writes_every_headline_figure(tmp_path):
    out_json, out_md = tmp_path / "performance.json", tmp_path / "performance.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "perf.py"), "--quick", "--repeats", "1", "--skip", "scaling",
         "--threads", "1", "--out-json", str(out_json), "--out-md", str(out_md)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out_json.read_text())
    for key in MEASURED:
        assert isinstance(data[key], (int, float)) and data[key] > 0, key
    for key, measured in OPTIONAL.items():
        assert (isinstance(data[key], float) and data[key] > 0) if measured else data[key] is None, key
        assert measured or f"{key}: not measured" in done.stdout
    assert data["machine"]["torch_threads"] == 1
    assert data["targets"]["j_step_vs_trl_sft"] == "<= 3.0" and data["targets"]["memory_vs_sft"] == "<= 1.2"
    text = out_md.read_text()
    assert all(f"`{key}`" in text for key in [*MEASURED, *OPTIONAL])
    assert "| kv cache buffer |" in text and "| frozen weights cast once |" in text
    speedups = data["details"]["speedups"]
    assert "same D2: True" in speedups["rollouts_decoding"]["what"]
    assert "same outputs: True" in speedups["kv_cache_buffer"]["what"]
    assert "same answers: True" in speedups["checker_scoring_one_prefill"]["what"]
    # The work behind two ratios: the J step computes more than a TRL step; matmuls are part of generation's time.
    step = data["details"]["metatuner_step_vs_trl_sft"]
    assert step["j_step_flops_over_trl"] > 1 and {"rollouts", "sr_loss"} <= set(step["j_step_gflop_by_phase"])
    generation = data["details"]["generation_speedup"]
    assert 0 < generation["work"]["ours_matmul_share"] <= 1
    assert generation["work"]["fp32_ratio_ceiling"] >= generation["ratio_both_fp32"]
    assert "Work: the J step computes" in text and "Work in fp32:" in text
    if OPTIONAL["eval_vs_lm_eval"]:
        assert data["details"]["eval_vs_lm_eval"]["work"]["lm_eval_flops_over_ours"] > 0


def test_a_run_that_measures_part_of_the_figures_keeps_the_others(tmp_path):
    """Figures are written over the published file one by one, so a run that stops part way (here: one that
    measures a single figure) leaves every other figure, with its own command, as it was."""
    out_json, out_md = tmp_path / "performance.json", tmp_path / "performance.md"
    published = json.loads((REPO / "docs" / "performance.json").read_text())
    out_json.write_text(json.dumps(published))
    spec = importlib.util.spec_from_file_location("perf", REPO / "benchmarks" / "perf.py")
    perf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf)
    skip = [arg for name in perf.ORDER if name != "hyperlora_vs_peft" for arg in ("--skip", name)]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "perf.py"), "--quick", "--repeats", "1", "--threads", "1", *skip,
         "--out-json", str(out_json), "--out-md", str(out_md)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out_json.read_text())
    kept = [name for name in perf.ORDER if name != "hyperlora_vs_peft" and name in published["details"]]
    perf._attribute_whole_run_machine(published, published["details"])  # what the run did to figures without a CPU
    assert kept and all(data["details"][n] == published["details"][n] for n in kept)
    assert all(data["commands"][n] == published["commands"][n] for n in kept)
    assert data["memory_vs_sft"] == published["memory_vs_sft"]
    assert data["details"]["hyperlora_vs_peft"]["cpu"] and "--quick" in data["commands"]["hyperlora_vs_peft"]


def test_figures_from_before_each_kept_its_cpu_get_the_cpu_of_the_run_that_measured_them():
    """A figure written before each figure recorded its own CPU was measured by the run the file's top-level
    `machine` describes; once a rerun on another machine replaces that record, the figure must still say where it
    was measured. Fails if such a figure is left without a CPU or given the new machine's."""
    spec = importlib.util.spec_from_file_location("perf", REPO / "benchmarks" / "perf.py")
    perf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(perf)
    xeon = {"capability": "AVX512", "avx512_bf16": True, "amx": True, "onednn_max_cpu_isa": None, "native": True}
    own = {"model": "AMD EPYC", "capability": "AVX2", "native": False}
    data = {"date": "2026-12-03", "machine": {"cpu_model": "Xeon", "cpu_bf16": xeon}, "settings": {"precision": "bf16"}}
    details = {"old": {"ratio": 1.0}, "new": {"ratio": 2.0, "cpu": own}}
    perf._attribute_whole_run_machine(data, details)
    assert details["old"]["cpu"] == {"model": "Xeon", **xeon} and details["old"]["training_precision"]["ran"] == "bf16"
    assert details["new"]["cpu"] == own and "training_precision" not in details["new"]
    assert "native" in perf._cpu_bf16(details["old"]["cpu"])


def _benchmark_script(name: str):
    """A script of benchmarks/ loaded as a module, so a test can call its main() in this process."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_generate_prints_the_rate_and_the_top_operators(tiny_dir, capsys):
    module = _benchmark_script("profile_generate")
    module.main(["--model", str(tiny_dir), "--batch", "2", "--max-new-tokens", "3", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "fp32; batch 2:" in out and "new tokens per CPU second" in out and "aten::" in out


def test_rewrite_probe_has_m_answer_under_the_written_prompts_and_p0(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), lora).save_pretrained(adapter)
    module = _benchmark_script("rewrite_probe")
    out = tmp_path / "probe.json"
    module.main(["--model", str(tiny_dir), "--template", "one_shot", "--items", "3", "--max-new-tokens", "3",
                 "--answer-with", str(adapter), "--actor", str(tiny_dir), "--out", str(out)])
    data = json.loads(out.read_text())
    written = data["models"][str(tiny_dir)]["one_shot"]
    assert list(data["models"][str(tiny_dir)]) == list(data["templates"]) == ["one_shot"] and len(written["rows"]) == 3
    assert written["m_under_written"]["items"] == 3 and len(written["m_under_written"]["written_minus_p0"]) == 2
    assert all("m_output" in row for row in written["rows"]) and written["answers_in_prompts"]["items"] == 3
    assert data["answering"]["adapter"] == str(adapter) and 0 <= data["answering"]["p0_accuracy"] <= 1
