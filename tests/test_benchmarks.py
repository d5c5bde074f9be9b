"""The benchmark suite runs end to end in its quick mode (tiny model) and writes the six headline figures.

Speed is never asserted here: the figures depend on the machine and its load. This only keeps the code from rotting.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADLINE = ["hyperlora_vs_peft", "metatuner_step_vs_trl_sft", "scoring_vs_forward", "generation_speedup",
            "memory_vs_sft", "eval_examples_per_s"]


def test_quick_benchmark_writes_the_six_figures(tmp_path):
    out_json, out_md = tmp_path / "performance.json", tmp_path / "performance.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "perf.py"), "--quick", "--repeats", "1", "--skip", "scaling",
         "--threads", "1", "--out-json", str(out_json), "--out-md", str(out_md)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out_json.read_text())
    for key in HEADLINE:
        assert isinstance(data[key], (int, float)) and data[key] > 0, key
        assert key in data["details"]
    assert data["machine"]["torch_threads"] == 1
    text = out_md.read_text()
    assert all(f"`{key}`" in text for key in HEADLINE)
