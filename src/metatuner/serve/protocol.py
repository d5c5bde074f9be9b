"""The OpenAI wire format: request bodies (validated, unknown fields refused), response objects and error bodies.

Only what the server implements is accepted: a field it would silently ignore (`tools`, `logprobs`, `n` > 1, ...)
is a 400 that names the field, so a client never gets an answer computed without what it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The extension field of every response (and of the first streamed chunk): the openai client keeps unknown
# top-level fields of a response in `model_extra`, so `completion.model_extra["metatuner"]["prompt"]` reads it.
EXTENSION = "metatuner"


class _Strict(BaseModel):
    # strict: "max_tokens": "10" or true is a type error, not silently converted; extra: unknown fields are refused
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    n: Optional[Literal[1]] = None  # one choice per request; n > 1 would multiply the batch
    stop: Optional[Union[str, Annotated[list[str], Field(max_length=4)]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted for compatibility, not used

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None  # the newer name of max_tokens

    def question(self) -> str:
        """The last user message: what MetaTuner writes a prompt and a LoRA for."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise RequestError("messages: no user message (the question is the last one)", "messages")

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]
    echo: Literal[False] = False

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def requested_tokens(self) -> int | None:
        return self.max_tokens


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and the OpenAI error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line that names each field (`messages.0.content: ...`), and the first field."""
    parts, first = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # the union branch that failed ("str", "list[...]") is noise in a field path
        loc = [x for x in loc if not (x.startswith(("list[", "str", "int", "float", "bool")) or x in ("constrained-int",
               "constrained-float", "literal['text']"))]
        where = ".".join(loc)
        first = first or where or None
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown or unsupported field")
        elif err.get("type") == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(dict.fromkeys(parts)), first


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(kind: str, rid: str, model: str, created: int, text: str | None, finish: str | None,
                      extension: dict | None = None, usage_: dict | None = None, delta: bool = False) -> dict:
    """A chat.completion(.chunk) or text_completion object with one choice (or none: a usage-only chunk)."""
    if kind == "chat":
        obj = "chat.completion.chunk" if delta else "chat.completion"
        if text is None and finish is None and delta:
            choices = []
        elif delta:
            piece = {} if text is None else {"content": text}
            choices = [{"index": 0, "delta": piece, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                        "logprobs": None}]
    else:
        obj = "text_completion"
        choices = [] if (text is None and finish is None and delta) else [
            {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    if extension is not None:
        out[EXTENSION] = extension
    return out


def model_list(name: str, owner: str = "metatuner") -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()), "owned_by": owner}]}
