"""Sampling over a run's training questions in chunks that a later sitting goes on from (the DPO baseline's
preference pairs, the BPO-like baseline's better prompts).

    records, counts, seconds = sample_in_chunks(out, "pairs", examples, 8, cfg, sampled_with(cfg, "dpo"),
                                                sample, start)

Each chunk of questions is sampled under its own seed (the run's seed plus the chunk's first index), its records
are appended to `out/NAME.jsonl` and `out/NAME.progress.json` then records the questions done, the counts so far,
the seconds over all sittings and the settings the records were sampled with. With `train.resume` set, a run goes
on after the last recorded chunk (a chunk appended but not recorded is sampled again), so it ends with the records
of an uninterrupted run; other settings than the recorded ones are refused, naming the file.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_text
from ..config import RunConfig
from ..tasks.base import Example

# One chunk's work: its records (JSON objects with the question's "id") and counts to add up over the run.
SampleChunk = Callable[[list[Example]], tuple[list[dict], dict[str, int]]]


def sampled_with(cfg: RunConfig, *sections: str, **more) -> dict:
    """The settings sampled records depend on: the model, the named config sections' fields (`dpo.temperature`,
    ...) and `more`."""
    fields = {f"{name}.{key}": value for name in sections for key, value in asdict(getattr(cfg, name)).items()}
    return {"model.name": cfg.model.name, "model.actor": cfg.model.actor, **fields, **more}


def sample_in_chunks(out: Path, name: str, examples: list[Example], chunk_size: int, cfg: RunConfig,
                     settings: dict, sample: SampleChunk, start: float) -> tuple[list[dict], dict[str, int], float]:
    """Every chunk's records in question order, their summed counts, and the seconds until now over all sittings
    (this one counted from `start`, a `time.perf_counter()` value). `settings`: what the records depend on beyond
    the questions and the seed (`sampled_with`; a resumed run must have the same)."""
    progress_path, records_path = out / f"{name}.progress.json", out / f"{name}.jsonl"
    this_run = {"seed": cfg.seed, "questions_in_all": len(examples), **settings}
    done, earlier, records, counts = 0, 0.0, [], Counter()
    if cfg.train.resume and progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        changed = [k for k, v in this_run.items() if progress["sampled_with"].get(k) != v]
        if changed:
            raise ValueError(f"{progress_path}: its {name} were sampled with other settings ({', '.join(changed)}); "
                             "resume with those or start a new run folder")
        done, earlier, counts = progress["questions"], progress["seconds"], Counter(progress["counts"])
        finished = {ex.id for ex in examples[:done]}
        records = [r for r in map(json.loads, records_path.read_text().splitlines()) if r["id"] in finished]
    with open(records_path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with tqdm(total=len(examples), initial=done, desc=name, unit="question") as bar:
        for first in range(done, len(examples), chunk_size):
            torch.manual_seed(cfg.seed + first)
            found, chunk_counts = sample(examples[first:first + chunk_size])
            with open(records_path, "a") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in found)
            records += found
            counts.update(chunk_counts)
            done = min(first + chunk_size, len(examples))
            atomic_write_text(progress_path, json.dumps({
                "questions": done, "seconds": round(earlier + time.perf_counter() - start, 3),
                "counts": dict(counts), "sampled_with": this_run}))
            bar.update(done - first)
    return records, dict(counts), earlier + time.perf_counter() - start
