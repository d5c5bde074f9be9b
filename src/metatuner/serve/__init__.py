"""`metatuner serve`: an OpenAI-compatible HTTP server that writes every request's prompt and LoRA.

    pip install -e ".[serve]"
    metatuner serve --run runs/metatuner-gsm8k --port 8000 --max-batch 16
    metatuner serve --model embedded:smollm2-135m-instruct [--adapter runs/sft/adapter]   # a plain model, same API

Pieces, one job each: `settings` (ServeSettings), `protocol` (OpenAI request/response/error shapes), `engine` (G
writes prompts and LoRA, M decodes every row together), `prefix` (G's prompt writing from a cache of the rewrite
request's shared beginning), `scheduler` (the bounded queue and the batching thread),
`metrics` (Prometheus), `app` (FastAPI routes and the uvicorn server). docs/serving.md has the limits.

Nothing here is imported by `import metatuner`: FastAPI, uvicorn and prometheus-client are the optional `serve`
extra, checked by `require_dependencies` before anything loads.
"""

from __future__ import annotations

import importlib.util

DEPENDENCIES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}
INSTALL = 'pip install "metatuner[serve]"   (from a clone: pip install -e ".[serve]")'


def missing_dependencies() -> list[str]:
    """The pip names of the serve extra's packages that are not installed."""
    return [pip for module, pip in DEPENDENCIES.items() if importlib.util.find_spec(module) is None]


def require_dependencies() -> None:
    missing = missing_dependencies()
    if missing:
        raise ImportError(f"metatuner serve needs {', '.join(missing)}, which are not installed: {INSTALL}")
