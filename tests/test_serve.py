"""`metatuner serve`: a real uvicorn server on a free loopback port, driven by the official `openai` client, over a
tiny in-memory MetaTuner (G and M share a 4-layer random Llama whose adapters are perturbed so that prompts and
answers differ from question to question)."""

import contextlib
import http.client
import json
import signal
import socket
import threading
import time

import openai
import pytest
import torch
from typer.testing import CliRunner

from metatuner.cli import app as cli_app
from metatuner.config import MetaTunerSettings
from metatuner.generation import DecodeBatch, _encode, chat_prompt, generate
from metatuner.model import MetaTuner
from metatuner.serve.app import create_app, make_server
from metatuner.serve.engine import Delta, Done, Engine, Job, MetaTunerBackend, ModelBackend, Row
from metatuner.serve.prefix import PromptWriter
from metatuner.serve.settings import ServeSettings
from metatuner.tasks import get_task
from metatuner.testing import tiny_model

QUESTIONS = ["What is 2 + 2?", "Janet has 3 apples and buys 5 more. How many?", "4 - 1 - 7 ="]
NAME = "tiny-run"


def _tiny_run(tokenizer, **settings) -> MetaTuner:
    torch.manual_seed(0)
    settings = MetaTunerSettings(share_depth=0.5, rank=4, hyper_hidden=32, g_lora_r=4, max_prompt_tokens=6, **settings)
    mt = MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, settings)
    with torch.no_grad():
        for p in mt.generator_parameters() + list(mt.hyper.parameters()):
            p.add_(torch.randn_like(p) * 0.5)
    mt.sync_frozen()
    mt.task, mt.p0 = get_task("gsm8k"), get_task("gsm8k").default_prompt
    return mt.eval()


@pytest.fixture(scope="module")
def mt(tokenizer):
    return _tiny_run(tokenizer)


class Served:
    """A uvicorn server for `backend` on a free loopback port, in a thread, and clients for it."""

    def __init__(self, backend, **settings):
        self.settings = ServeSettings(port=0, log_level="warning", **settings)
        self.app = create_app(backend, self.settings)
        self.server = make_server(self.app, self.settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started

    def client(self, key: str = "none", **kwargs) -> openai.OpenAI:
        # no retries: a 429 or 5xx must reach the test as it is
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=30,
                             **kwargs)

    def raw(self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
        """(status, parsed JSON or text, headers) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        try:
            return response.status, json.loads(text), response.headers
        except json.JSONDecodeError:
            return response.status, text, response.headers

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@contextlib.contextmanager
def serving(backend, **settings):
    served = Served(backend, **settings)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def served(mt):
    with serving(MetaTunerBackend(mt, NAME), max_tokens_cap=64, max_body_bytes=20_000) as s:
        yield s


@contextlib.contextmanager
def engine_held(served):
    """Decoding pauses at its next step until the block ends: a request stays in flight meanwhile."""
    engine = served.app.state.scheduler.engine
    gate, entered = threading.Event(), threading.Event()
    step = engine.step

    def held_step():
        entered.set()
        gate.wait(20)
        return step()

    engine.step = held_step
    try:
        yield entered
    finally:
        gate.set()
        del engine.step


def _chat(client, question=QUESTIONS[0], **kwargs):
    kwargs = {"max_tokens": 12, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}], **kwargs)


def test_serve_greedy_chat_and_completion_equal_metatuner_generate(served, mt):
    reference = mt.generate(QUESTIONS[:2], max_new_tokens=12)
    client = served.client()
    for ref in reference:
        chat = _chat(client, ref["question"])
        assert chat.choices[0].message.content == ref["answer"]
        # the written prompt: an extension field the openai client keeps (model_extra)
        assert chat.model_extra["metatuner"]["prompt"] == ref["prompt"]
        text = client.completions.create(model=NAME, prompt=ref["question"], max_tokens=12, temperature=0)
        assert text.choices[0].text == ref["answer"] and text.model_extra["metatuner"]["prompt"] == ref["prompt"]
    chats = mt.answer_chats([reference[0]["prompt"]], [QUESTIONS[0]])
    assert chat.usage.prompt_tokens > 0 and text.usage.completion_tokens == 12 == text.usage.total_tokens - \
        text.usage.prompt_tokens
    assert _chat(client, QUESTIONS[0]).usage.prompt_tokens == len(_encode(mt.m_tok, chats)[0])


def test_serve_streamed_chunks_add_up_to_the_answer(served, mt):
    client = served.client()
    for question in QUESTIONS:
        whole = _chat(client, question, max_tokens=20)
        chunks = list(_chat(client, question, max_tokens=20, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].model_extra["metatuner"]["prompt"] == whole.model_extra["metatuner"]["prompt"]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_serve_completions_stream_equals_completion(served):
    client = served.client()
    whole = client.completions.create(model=NAME, prompt=QUESTIONS[1], max_tokens=20, temperature=0)
    stream = client.completions.create(model=NAME, prompt=QUESTIONS[1], max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text != ""


def test_serve_stop_strings_and_seeded_sampling(served):
    client = served.client()
    full = _chat(client, QUESTIONS[2], max_tokens=20).choices[0].message.content
    stop = full[5:8].strip() or full[5:8]
    cut = _chat(client, QUESTIONS[2], max_tokens=20, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content
    assert full.startswith(cut.choices[0].message.content)
    sampled = [_chat(client, QUESTIONS[2], temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_serve_models_health_and_metrics(served):
    client = served.client()
    assert [m.id for m in client.models.list()] == [NAME]
    assert served.raw("GET", "/health")[:2] == (200, {"status": "ok"})
    _chat(client)
    status, text, headers = served.raw("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for metric in ('metatuner_requests_total{endpoint="chat",status="200"}', "metatuner_generation_tokens_total",
                   "metatuner_decode_batch_rows_bucket", "metatuner_request_latency_seconds_bucket",
                   "metatuner_admit_batch_rows_count"):
        assert metric in text


def _valid(**changes) -> dict:
    body = {"model": NAME, "messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 4}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.bad_input
@pytest.mark.parametrize("body, status, named", [
    ('{"model": "tiny-run", "messages": [', 400, "not valid JSON"),
    (_valid(messages=None), 400, "messages"),
    (_valid(messages=[]), 400, "messages"),
    (_valid(messages=[{"role": "user", "content": "  "}]), 400, "messages"),
    (_valid(messages=[{"role": "system", "content": "be brief"}]), 400, "messages: no user message"),
    (_valid(messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role"),
    (_valid(max_tokens="10"), 400, "max_tokens"),
    (_valid(max_tokens=True), 400, "max_tokens"),
    (_valid(temperature=[1]), 400, "temperature"),
    (_valid(tools=[{"type": "function"}]), 400, "tools: unknown or unsupported field"),
    (_valid(n=2), 400, "n"),
    (_valid(max_tokens=65), 400, "above this server's limit of 64"),
    (_valid(messages=[{"role": "user", "content": "7 + 8 = 15. " * 120}]), 400, "context"),
    (_valid(model="gpt-4o"), 404, "gpt-4o"),
    (json.dumps(_valid(messages=[{"role": "user", "content": "x" * 30_000}])), 413, "limit of 20000 bytes"),
])
def test_serve_bad_input_is_a_4xx_openai_error_that_names_the_field(served, body, status, named):
    raw = body if isinstance(body, str) else json.dumps(body)
    got, answer, _ = served.raw("POST", "/v1/chat/completions", raw)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and named in answer["error"]["message"]
    assert "Traceback" not in json.dumps(answer)


@pytest.mark.bad_input
def test_serve_bad_input_through_the_openai_client(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _chat(client, max_tokens=10_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="prompt: empty"):
        client.completions.create(model=NAME, prompt="")
    with pytest.raises(openai.BadRequestError, match="prompt: the question .* exceeds the model's context of 512"):
        client.completions.create(model=NAME, prompt="7 + 8 = 15. " * 120, max_tokens=4)
    assert served.raw("GET", "/v1/nothing")[0] == 404


def test_serve_api_key_is_required_when_set(mt):
    with serving(MetaTunerBackend(mt, NAME), api_key="s3cret") as s:
        for key in ("wrong", "s3cret-but-longer"):
            with pytest.raises(openai.AuthenticationError):
                _chat(s.client(key))
        status, body, headers = s.raw("POST", "/v1/chat/completions", "{not json")  # no key: 401 before parsing
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["WWW-Authenticate"] == "Bearer"
        assert s.raw("GET", "/v1/models")[0] == 401 and s.raw("GET", "/health")[0] == 200
        assert _chat(s.client("s3cret")).choices[0].message.content


def test_serve_full_queue_answers_429(mt):
    with serving(MetaTunerBackend(mt, NAME), max_batch=1, max_queue=1, batch_window_ms=0) as s:
        client = s.client()
        with concurrent_calls() as calls, engine_held(s) as decoding:
            calls.start(lambda: _chat(client))  # admitted, held at its first step
            assert decoding.wait(10)
            calls.start(lambda: _chat(client))  # waits in the queue, which is then full
            _wait_until(lambda: len(s.app.state.scheduler._waiting) == 1)
            with pytest.raises(openai.RateLimitError, match="queue is full"):
                _chat(client)
        assert all(r.choices[0].message.content for r in calls.results)  # the two accepted ones finish


def test_serve_request_timeout_is_504_and_frees_the_row(mt):
    with serving(MetaTunerBackend(mt, NAME), request_timeout_s=0.5) as s:
        with engine_held(s):
            with pytest.raises(openai.InternalServerError) as err:
                _chat(s.client())
        assert err.value.status_code == 504 and "longer than 0.5 s" in str(err.value)
        _wait_until(lambda: not s.app.state.scheduler.engine.rows)  # the cancelled row has left the batch
        assert _chat(s.client()).choices[0].message.content


def test_serve_client_gone_cancels_its_non_streamed_request(mt):
    """A client that closes its connection while its (non-streamed) answer is decoded: the row is cancelled at once
    and leaves the batch at the next step, without decoding to max_tokens for nobody."""
    with serving(MetaTunerBackend(mt, NAME)) as s:
        engine = s.app.state.scheduler.engine
        with engine_held(s) as decoding:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
            conn.request("POST", "/v1/chat/completions", json.dumps(_valid(max_tokens=64, temperature=0)),
                         {"Content-Type": "application/json"})
            assert decoding.wait(10)
            row = engine.rows[0]
            conn.close()
            _wait_until(lambda: row.job.cancelled)  # while decoding is still held
        _wait_until(lambda: not engine.rows)
        assert row.tokens == []
        _wait_until(lambda: 'status="499"' in s.raw("GET", "/metrics")[1])
        assert _chat(s.client()).choices[0].message.content  # the server goes on serving


def test_serve_graceful_shutdown_finishes_the_request_in_flight(mt):
    s = Served(MetaTunerBackend(mt, NAME))
    reference = _chat(s.client()).choices[0].message.content
    with concurrent_calls() as calls, engine_held(s) as decoding:
        calls.start(lambda: _chat(s.client()))
        assert decoding.wait(10)
        s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler does
        _wait_until(lambda: _refused(s.port))  # it stops accepting connections at once ...
    s.thread.join(20)  # ... and exits once the request in flight is answered
    assert not s.thread.is_alive() and calls.results[0].choices[0].message.content == reference


def test_serve_concurrent_requests_share_a_batch_and_equal_sequential_answers(mt):
    with serving(MetaTunerBackend(mt, NAME), batch_window_ms=200) as s:
        client = s.client()
        alone = [_chat(client, q, max_tokens=16).choices[0].message.content for q in QUESTIONS]
        with concurrent_calls() as calls:
            for q in QUESTIONS:
                calls.start(lambda q=q: _chat(client, q, max_tokens=16))
        together = {r.id: r.choices[0].message.content for r in calls.results}
        assert sorted(together.values()) == sorted(alone)
        admitted = s.app.state.metrics.admit_batch.collect()[0].samples
        assert any(x.name.endswith("_bucket") and x.labels["le"] == "2.0" and x.value < 4 for x in admitted)


def test_serve_rows_joining_mid_decode_get_their_own_logits(mt):
    """A row admitted between two steps of another decodes exactly as it would alone (padding, positions, LoRA)."""
    backend = MetaTunerBackend(mt, NAME)
    emitted = {}

    def job(q):
        return Job(text=q, max_tokens=10, temperature=0, emit=lambda e, q=q: emitted.setdefault(q, []).append(e))

    engine = Engine(backend)
    engine.admit([job(QUESTIONS[1])])
    for _ in range(3):
        engine.step()
    engine.admit([job(QUESTIONS[0]), job(QUESTIONS[2])])
    while engine.rows:
        engine.step()
    together = {q: next(e.text for e in events if isinstance(e, Done)) for q, events in emitted.items()}
    reference = {r["question"]: r["answer"] for r in mt.generate(QUESTIONS, max_new_tokens=10)}
    assert together == reference and len(set(together.values())) == 3


def _assert_writes_as_write_all(mt, questions):
    """The server's prompt writing gives MetaTuner.write_all's prompts and h (so the same LoRA)."""
    prompts, h = PromptWriter(mt).write(questions)
    ref_prompts, ref_h = mt.write_all(questions)
    assert prompts == ref_prompts and len(set(prompts)) == len(questions)
    assert torch.allclose(h, ref_h, atol=1e-5, rtol=1e-4)


def _takes_cached_path(mt, questions) -> list[bool]:
    writer = PromptWriter(mt)
    requests = _encode(mt.g_tok, mt.rewrite_requests([mt.p0] * len(questions), questions))
    return [writer.split(ids) is not None for ids in requests]


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_serve_cached_request_beginning_writes_what_write_all_writes(tokenizer, pool):
    """G prefills the rewrite request's shared beginning once; the questions' own tokens then give the same prompts
    and the same h, pooled at the last token or over every token of the request."""
    mt = _tiny_run(tokenizer, pool=pool)
    shared = len(PromptWriter(mt).ids)
    assert shared > 0.5 * len(_encode(tokenizer, mt.rewrite_requests([mt.p0], QUESTIONS[:1]))[0])
    assert _takes_cached_path(mt, QUESTIONS) == [True] * 3
    _assert_writes_as_write_all(mt, QUESTIONS)


def test_serve_question_that_merges_with_the_shared_tokens_gets_a_full_prefill(tokenizer):
    """Here the question continues a word of the template: "Questio" + "n: ..." tokenises as "Question", not as the
    beginning's tokens. That request is prefilled in full, in the same batch as one that takes the cached path."""
    mt = _tiny_run(tokenizer, rewrite_template="Instruction: {instruction}\nQuestio{question}")
    questions = ["n: what is 2 + 2?", "\nJanet has 3 apples and buys 5 more. How many?"]
    assert _takes_cached_path(mt, questions) == [False, True]
    _assert_writes_as_write_all(mt, questions)


def test_serve_streamed_text_never_shows_half_a_character_or_half_a_stop_string(tokenizer):
    events = []
    row = Row(Job(text="", max_tokens=50, emit=events.append), prompt_tokens=0, generator=None, stops=("STOP",))
    ids = tokenizer("price 5\u20ac + 2 STOP more", add_special_tokens=False)["input_ids"]
    assert len(tokenizer("\u20ac", add_special_tokens=False)["input_ids"]) > 1  # the euro sign spans tokens
    finish = None
    for token in ids:
        finish = row.take(token, False, tokenizer)
        if finish:
            break
    deltas = [e.text for e in events if isinstance(e, Delta)]
    assert finish == "stop" and "".join(deltas) == events[-1].text == "price 5\u20ac + 2"


def test_serve_decode_batch_extend_matches_separate_prefills(model, tokenizer):
    rows = _encode(tokenizer, ["short", "a much longer prompt than the other one"])
    a = DecodeBatch.prefill(model, rows[:1], tokenizer.pad_token_id)
    a.advance(model, a.logits.argmax(-1))
    b = DecodeBatch.prefill(model, rows[1:], tokenizer.pad_token_id)
    expected = [a.logits.clone(), b.logits.clone()]
    next_a, next_b = a.logits.argmax(-1), b.logits.argmax(-1)
    a.extend(b)
    assert torch.allclose(a.logits, torch.cat(expected))
    a.advance(model, torch.cat([next_a, next_b]))
    solo_b = DecodeBatch.prefill(model, rows[1:], tokenizer.pad_token_id)
    solo_b.advance(model, next_b)
    assert torch.allclose(a.logits[1], solo_b.logits[0], atol=1e-5)
    a.select([1])
    a.trim()
    assert a.mask.shape[1] == len(rows[1]) + 1 and bool(a.mask.all())


def test_serve_plain_model_equals_generate(model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}]
    reference = generate(model, tokenizer, [chat_prompt(tokenizer, messages)], max_new_tokens=10).texts[0]
    with serving(ModelBackend(model, tokenizer, "plain")) as s:
        got = s.client().chat.completions.create(model="plain", messages=messages, max_tokens=10, temperature=0)
        assert got.choices[0].message.content == reference and got.model_extra["metatuner"]["prompt"] is None


def test_serve_without_its_dependencies_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = CliRunner().invoke(cli_app, ["serve", "--model", "x"])
    assert result.exit_code == 2 and "uvicorn" in result.output and 'pip install "metatuner[serve]"' in result.output


def test_serve_cli_refuses_conflicting_options(tmp_path):
    runner = CliRunner()
    assert "one of --run" in runner.invoke(cli_app, ["serve"]).output
    result = runner.invoke(cli_app, ["serve", "--model", "x", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output


# ----- helpers -------------------------------------------------------------------------------------------------
class _Calls:
    def __init__(self):
        self.threads, self.results, self.errors = [], [], []

    def start(self, fn):
        def run():
            try:
                self.results.append(fn())
            except Exception as err:  # surfaced by the assertion below, with its message
                self.errors.append(err)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)


@contextlib.contextmanager
def concurrent_calls():
    calls = _Calls()
    yield calls
    for thread in calls.threads:
        thread.join(30)
    assert not calls.errors, calls.errors


def _wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_serve_load_benchmark_drives_the_real_command_end_to_end(tiny_dir_2layers, tmp_path, monkeypatch):
    """benchmarks/serve_load.py on a tiny trained run: `metatuner serve` as a subprocess on a free loopback port,
    concurrent openai clients, nothing failed, and the server gone after its SIGTERM. Nothing timed is asserted."""
    from pathlib import Path

    from metatuner.config import load_config
    from metatuner.train import train_metatuner

    run = train_metatuner(load_config(None, [
        f"model.name={tiny_dir_2layers}", "model.device=cpu", f"output_dir={tmp_path / 'run'}",
        "data.task=rg:chain_sum", "data.task_options={size: 4, test_size: 4}", "train.batch_size=4",
        "train.max_steps=1", "train.mixed_precision=fp32", "metatuner.share_depth=1", "metatuner.rank=2",
        "metatuner.hyper_hidden=8", "metatuner.g_lora_r=2", "metatuner.max_prompt_tokens=3",
        "metatuner.warmup_generator=false"]))
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import serve_load

    result = serve_load.load_test(str(run), clients=3, per_client=1, max_tokens=4, max_batch=3)
    assert result["completed"] == result["requests"] == 3 and result["failed"] == 0, result["failures"]
    assert result["p95_latency_s"] >= result["p50_latency_s"] > 0


def test_serve_app_functions_fit_a_screen():
    """create_app was one 150-line function of closures; its routes, error handlers and lifespan are now module
    functions that find what they share in `app.state`. None may grow past a screen again."""
    import ast
    import inspect

    import metatuner.serve.app as app_module

    tree = ast.parse(inspect.getsource(app_module))
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60}
    assert long == {}, f"functions over 60 lines in serve/app.py: {long}"
