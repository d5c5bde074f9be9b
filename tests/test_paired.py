"""`metatuner paired`: two evaluations of the same items compared item by item, from files written like
`metatuner eval`'s samples.jsonl (plain, gzipped, or an eval folder)."""

import gzip
import json

import pytest
from typer.testing import CliRunner

from metatuner.cli import app
from metatuner.paired import compare_paired


def _samples(path, correct, ids=None, opener=open):
    ids = ids or [f"test-{i}" for i in range(len(correct))]
    with opener(path, "wt") as f:
        for item, c in zip(ids, correct):
            f.write(json.dumps({"id": item, "scores": {"accuracy": float(c), "score": 0.5}, "correct": bool(c)}) + "\n")
    return path


def test_a_clearly_better_side_has_an_interval_above_zero_and_counts_items_each_alone_got(tmp_path):
    a = _samples(tmp_path / "a.jsonl", [1] * 60 + [0] * 40)
    b = _samples(tmp_path / "b.jsonl.gz", [1] * 20 + [0] * 70 + [1] * 10, opener=gzip.open)
    result = compare_paired([a], [b])
    assert result["metric"] == "accuracy" and result["items"] == 100
    assert (result["a"]["mean"], result["b"]["mean"], result["a_minus_b"]) == (0.6, 0.3, 0.3)
    assert (result["a_higher"], result["b_higher"]) == (40, 10)
    assert 0.15 < result["ci95"][0] < 0.3 < result["ci95"][1] < 0.45
    flipped = compare_paired([b], [a])
    assert flipped["ci95"] == pytest.approx([-result["ci95"][1], -result["ci95"][0]], abs=0.02)


def test_only_the_items_both_sides_scored_count(tmp_path):
    a = _samples(tmp_path / "a.jsonl", [1, 1, 0, 1], ids=["x", "y", "z", "w"])
    b = _samples(tmp_path / "b.jsonl", [0, 0, 1], ids=["z", "y", "v"])
    result = compare_paired([a], [b])
    assert result["items"] == 2 and result["a"]["mean"] == 0.5 and result["b"]["mean"] == 0.0


def test_seeds_pair_seed_with_seed_or_each_with_one_file(tmp_path):
    seeds = [_samples(tmp_path / f"j{s}.jsonl", [1] * (5 + s) + [0] * (5 - s)) for s in range(3)]
    one = _samples(tmp_path / "one.jsonl", [1] * 5 + [0] * 5)
    many = compare_paired(seeds, [one])
    assert many["file_pairs"] == 3 and many["a"]["means"] == [0.5, 0.6, 0.7] and many["a_minus_b"] == 0.1
    same = compare_paired(seeds, seeds)
    assert same["a_minus_b"] == 0 and same["ci95"] == [0, 0]
    with pytest.raises(ValueError, match="3 files against 2"):
        compare_paired(seeds, seeds[:2])


def test_another_metric_and_an_eval_folder(tmp_path):
    (tmp_path / "ev").mkdir()
    _samples(tmp_path / "ev" / "samples.jsonl", [1, 0, 1])
    b = _samples(tmp_path / "b.jsonl", [0, 0, 0])
    assert compare_paired([tmp_path / "ev"], [b], metric="score")["a_minus_b"] == 0
    with pytest.raises(ValueError, match=r"b.jsonl, line 1: .*missing key 'nope'"):
        compare_paired([b], [b], metric="nope")


def test_bad_files_are_named_with_their_line(tmp_path):
    good = _samples(tmp_path / "good.jsonl", [1, 0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "test-0", "scores": {"accuracy": 1.0}}) + "\n{not json\n")
    result = CliRunner().invoke(app, ["paired", "--a", str(good), "--b", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl, line 2" in result.output
    result = CliRunner().invoke(app, ["paired", "--a", str(good), "--b", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "cannot read" in result.output and "missing.jsonl" in result.output
    other = _samples(tmp_path / "other.jsonl", [1], ids=["q"])
    with pytest.raises(ValueError, match="share no item ids"):
        compare_paired([good], [other])


def test_the_command_prints_the_comparison_as_json(tmp_path):
    a = _samples(tmp_path / "a.jsonl", [1, 1, 0, 1])
    b = _samples(tmp_path / "b.jsonl", [0, 1, 0, 0])
    result = CliRunner().invoke(app, ["paired", "--a", str(a), "--b", str(b)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["a_minus_b"] == 0.5
