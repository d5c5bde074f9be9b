"""Load test of `metatuner serve`: concurrent clients (the official `openai` client) against a server on loopback.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --run runs/demo/metatuner_j     # prints the figures
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/perf.py --threads 1 --serve-run runs/demo/metatuner_j \\
        --only serve_batching_speedup --only serve_p95_latency_s              # merges them into docs/performance.*

Two figures, each from one server started for it (`metatuner serve --run RUN --port 0`, a subprocess on
127.0.0.1, stopped with SIGTERM at the end):
  serve_batching_speedup  new tokens/s with 16 concurrent clients / with 1 client, the same 16 greedy requests,
                          interleaved repetitions (medians)                                          goal >= 4
  serve_p95_latency_s     95th percentile latency of 32 concurrent clients sending 2 requests each; also p50,
                          throughput, and the count of failed requests (must be 0)
Bounded: a fixed number of requests, each client with a timeout and the whole load under a deadline; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Summary, command_line, load_summary, machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 900  # the whole load of one figure; a server that hangs fails the benchmark instead of blocking it


@contextlib.contextmanager
def served(run: str, max_batch: int, threads: int, startup_s: float = 300):
    """`metatuner serve --run RUN` on a free loopback port; yields (base URL, model id); SIGTERM at the end."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "metatuner", "serve", "--run", run, "--host", "127.0.0.1", "--port", "0",
           "--max-batch", str(max_batch), "--max-queue", "256"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        url = _wait_for_url(proc, time.monotonic() + startup_s)
        from openai import OpenAI

        model = OpenAI(base_url=url, api_key="none", max_retries=0).models.list().data[0].id
        yield url, model
    finally:
        proc.send_signal(signal.SIGTERM)  # the server finishes what is in flight, then exits
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_for_url(proc: subprocess.Popen, deadline: float) -> str:
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError("metatuner serve exited before it listened:\n" + "".join(lines[-20:]))
        lines.append(line)
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        if found:
            # keep draining its log, or a full pipe would block the server
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return found.group(1) + "/v1"
    raise RuntimeError("metatuner serve did not start in time:\n" + "".join(lines[-20:]))


def run_questions(run: str, n: int) -> list[str]:
    """The first n test questions of the run's own task."""
    from metatuner.config import load_config
    from metatuner.tasks import get_task

    cfg = load_config(Path(run) / "config.yaml")
    task = get_task(cfg.data.task, **cfg.data.task_kwargs())
    return [ex.question for ex in task.load(cfg.data.eval_split, path=cfg.data.eval_path, limit=n)]


async def _clients(url: str, model: str, questions: list[list[str]], max_tokens: int) -> dict:
    """Client i sends questions[i] one after another; all clients at once. Latency and tokens per request."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=DEADLINE_S)
    latencies, tokens, failures = [], [], []

    async def one_client(mine: list[str]) -> None:
        for question in mine:
            start = time.perf_counter()
            try:
                answer = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                    temperature=0)
            except Exception as err:  # counted and reported: the load test must show nothing failed
                failures.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)
            tokens.append(answer.usage.completion_tokens)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one_client(q) for q in questions)), DEADLINE_S)
    seconds = time.perf_counter() - start
    await client.close()
    return {"seconds": seconds, "latencies": latencies, "tokens": tokens, "failures": failures}


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def batching_speedup(run: str, clients: int = 16, repeats: int = 2, max_tokens: int = 64, threads: int = 1) -> dict:
    """New tokens/s of `clients` concurrent clients over one client sending the same greedy requests in turn."""
    questions = run_questions(run, clients)
    rates: dict[str, list[float]] = {"one": [], "many": []}
    produced: dict[str, list[int]] = {"one": [], "many": []}
    with served(run, max_batch=clients, threads=threads) as (url, model):
        asyncio.run(_clients(url, model, [questions[:1]], max_tokens))  # warm-up
        for rep in range(repeats):
            for side in ("one", "many") if rep % 2 == 0 else ("many", "one"):
                split = [questions] if side == "one" else [[q] for q in questions]
                got = asyncio.run(_clients(url, model, split, max_tokens))
                if got["failures"]:
                    raise RuntimeError(f"{len(got['failures'])} requests failed: {got['failures'][:3]}")
                rates[side].append(sum(got["tokens"]) / got["seconds"])
                produced[side].append(sum(got["tokens"]))
    one, many = Summary(rates["one"]), Summary(rates["many"])
    return {
        "ratio": round(many.median / one.median, 3),
        "target": ">= 4",
        "what": f"new tokens/s: {clients} concurrent clients / 1 client, the same {clients} greedy chat requests "
                f"(the run's own test questions, max_tokens {max_tokens}), one server, interleaved repetitions",
        "one_client_tokens_per_s": one.as_dict(2),
        "concurrent_tokens_per_s": many.as_dict(2),
        "new_tokens": produced,
        "clients": clients,
        "run": _shown(run),
        "precision": "fp32 (the run's model.dtype)",
    }


def load_test(run: str, clients: int = 32, per_client: int = 2, max_tokens: int = 64, max_batch: int = 32,
              threads: int = 1) -> dict:
    """`clients` concurrent clients, `per_client` greedy requests each: latency percentiles, throughput, failures."""
    questions = run_questions(run, clients * per_client)
    split = [questions[i * per_client : (i + 1) * per_client] for i in range(clients)]
    with served(run, max_batch=max_batch, threads=threads) as (url, model):
        asyncio.run(_clients(url, model, [questions[:1]], max_tokens))  # warm-up
        got = asyncio.run(_clients(url, model, split, max_tokens))
    lat = got["latencies"]
    return {
        "p95_latency_s": round(_percentile(lat, 95), 3),
        "p50_latency_s": round(_percentile(lat, 50), 3),
        "max_latency_s": round(max(lat), 3),
        "requests": clients * per_client,
        "completed": len(lat),
        "failed": len(got["failures"]),
        "failures": got["failures"][:5],
        "tokens_per_s": round(sum(got["tokens"]) / got["seconds"], 2),
        "requests_per_s": round(len(lat) / got["seconds"], 3),
        "mean_completion_tokens": round(statistics.mean(got["tokens"]), 1),
        "seconds": round(got["seconds"], 1),
        "what": f"{clients} concurrent clients x {per_client} greedy chat requests (the run's own test questions, "
                f"max_tokens {max_tokens}), --max-batch {max_batch}; latency from send to full answer",
        "clients": clients,
        "run": _shown(run),
        "precision": "fp32 (the run's model.dtype)",
    }


def _shown(run: str) -> str:
    path = Path(run).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def describe(name: str, x: dict) -> str:
    """One figure's line in docs/performance.md (perf.py)."""
    if name == "serve_batching_speedup":
        return (f"{x['concurrent_tokens_per_s']['median']:.4g} new tokens/s with {x['clients']} concurrent clients vs "
                f"{x['one_client_tokens_per_s']['median']:.4g} with one ({x['what']}; run `{x['run']}`, "
                f"{x['precision']}).")
    return (f"p95 {x['p95_latency_s']} s, p50 {x['p50_latency_s']} s, {x['tokens_per_s']} new tokens/s, "
            f"{x['requests_per_s']} requests/s, {x['completed']} of {x['requests']} requests completed, {x['failed']} "
            f"failed ({x['what']}; mean answer {x['mean_completion_tokens']} tokens; run `{x['run']}`, "
            f"{x['precision']}).")


# perf.py's entry points (benchmarks/perf.py --only serve_batching_speedup --only serve_p95_latency_s)
def serve_batching_speedup(b) -> dict:
    return batching_speedup(b.serve_run, clients=4 if b.quick else 16, repeats=max(1, b.repeats // 2),
                            max_tokens=b.max_new_tokens, threads=b.threads)


def serve_p95_latency_s(b) -> dict:
    clients = 4 if b.quick else 32
    return load_test(b.serve_run, clients=clients, per_client=2, max_tokens=b.max_new_tokens, max_batch=clients,
                     threads=b.threads)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a MetaTuner run folder (config.yaml and model/)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients of the load test")
    p.add_argument("--per-client", type=int, default=2, help="requests each load-test client sends in turn")
    p.add_argument("--speedup-clients", type=int, default=16, help="concurrent clients of the batching speed-up")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out-json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    result = {
        "serve_batching_speedup": batching_speedup(args.run, args.speedup_clients, args.repeats, args.max_tokens,
                                                   threads),
        "serve_p95_latency_s": load_test(args.run, args.clients, args.per_client, args.max_tokens, args.clients,
                                         threads),
        "command": command_line(), "machine": machine(), "load": load_summary(),
    }
    print(json.dumps({k: result[k] for k in ("serve_batching_speedup", "serve_p95_latency_s")}, indent=1))
    if args.out_json:
        write_json(args.out_json, result)
    return result


if __name__ == "__main__":
    main()
