"""The server's settings: where it listens, how it batches, and the limits it enforces (docs/serving.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class ServeSettings:
    host: str = _help("Address to bind. 127.0.0.1 (the default) is reachable from this machine only; 0.0.0.0 listens "
                      "on every interface.", "127.0.0.1")
    port: int = _help("TCP port (0: any free port).", 8000)
    api_key: Optional[str] = _help("When set, /v1/* needs `Authorization: Bearer <key>` (401 otherwise).", None)
    served_name: Optional[str] = _help("The model id that /v1/models lists and requests name (default: the run "
                                       "folder's or the model's name).", None)
    # batching
    max_batch: int = _help("Most rows decoded together; more requests wait in the queue.", 16)
    batch_window_ms: float = _help("When idle, how long the first request waits for others to arrive, so that G "
                                   "writes their prompts and LoRA in one batch.", 20.0)
    join_wait_ms: float = _help("While decoding, how long a new request may wait for company before it joins the "
                                "batch alone: joining stops the other rows while G writes the newcomers' prompts, so "
                                "newcomers are admitted together.", 100.0)
    # limits
    max_queue: int = _help("Requests waiting for a batch slot; one more gets 429.", 64)
    max_tokens_cap: int = _help("The largest max_tokens a request may ask for (400 above it).", 1024)
    default_max_tokens: Optional[int] = _help("max_tokens when a request gives none (default: the run's task's "
                                              "answer length, 256 for a plain model), never above the cap.", None)
    max_body_bytes: int = _help("Largest request body (413 above it).", 1_000_000)
    max_header_bytes: int = _help("Largest request line plus headers (uvicorn answers 400 above it).", 16_384)
    request_timeout_s: float = _help("A request still unfinished after this long is ended (504, or an error event "
                                     "when streaming).", 300.0)
    shutdown_grace_s: float = _help("On SIGTERM, how long the requests in flight may take to finish before they "
                                    "are cancelled.", 330.0)
    log_level: str = _help("uvicorn's log level: critical, error, warning, info, debug.", "info")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and value is not None and value < 0:
                raise ValueError(f"serve setting {f.name} must be >= 0, got {value}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be at least 1, got {self.max_tokens_cap}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty; give a key or leave the option out")
