"""MetaTuner training: warm-up, then the J (joint) or I (interleaved) schedule.

    metatuner train --config configs/smollm2-arithmetic.yaml            # CPU, embedded model, G = M
    metatuner train --config configs/qwen2.5-7b-3b-gsm8k.yaml           # one GPU
    accelerate launch -m metatuner.cli train --config ...               # several GPUs

Each step, for a batch of training queries x with initial instruction p0:
1. G encodes the rewrite request (p0, x) once with {phi_s, phi_p'}: h for the hypernetwork, and a greedy prompt p.
2. Task loss: NLL of y under M with LoRA F(h) given (p, x). Reaches phi_q and phi_s (through h).
3. Rollouts (every `rollout_every` steps): n sampled prompts + p0 + the stored best, scored through M with the
   query's LoRA; the best goes to D2 when it beats the stored one.
4. SR loss: NLL of D2's prompt for x under {phi_s, phi_p}, weighted by alpha. Reaches phi_s and phi_p.
J adds both losses every step; I alternates blocks of `interleave_block` steps. phi_p' <- phi_p every `sync_every`.

The run folder gets config.yaml, TensorBoard scalars under tb/, train_metrics.json, and model/ (safetensors
weights of every trainable part) with expert_prompts.json (D2) beside it.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .baselines.sft import resolve_mixed_precision
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig, command_line, peak_rss_mb, to_yaml
from .generation import chat_prompt, lm_batch, lm_loss
from .gumbel import gumbel_task_loss
from .metatuner import MetaTuner
from .models import load_generator_and_actor
from .rollouts import ExpertPromptStore, run_rollouts
from .tasks import get_task

log = logging.getLogger(__name__)


def build_metatuner(cfg: RunConfig, device: str = "cpu") -> MetaTuner:
    g, m, g_tok, m_tok = load_generator_and_actor(
        cfg.model.name, cfg.model.actor, cfg.model.dtype, device, cfg.model.trust_remote_code
    )
    return MetaTuner(g, g_tok, cfg.metatuner, actor=None if m is g else m, m_tokenizer=m_tok)


class TrainingStopped(RuntimeError):
    """Training stopped early on purpose (a signal, or diverging losses) after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class _Interrupt:
    """Records SIGINT/SIGTERM instead of dying mid-step, so the loop can save a checkpoint first."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame):
        self.signal = signum

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class _Timer:
    """Seconds spent per phase, for the logs."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def __call__(self, phase: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] += time.perf_counter() - self.start

        return _Span()


def batch_rows(step: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """The training rows of optimiser step `step` (1-based): a pure function of the step, so a resumed run sees
    exactly the batches the uninterrupted run would have seen. Each epoch is a fresh seeded shuffle."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, index = divmod(step - 1, per_epoch)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[index * batch_size : (index + 1) * batch_size]


def _batches(n_examples: int, batch_size: int, rng: random.Random):
    while True:
        order = list(range(n_examples))
        rng.shuffle(order)
        for i in range(0, n_examples - batch_size + 1 if n_examples >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


def warm_up_actor(mt: MetaTuner, cfg: RunConfig, task, examples, p0, accelerator, rng) -> dict:
    """LoRA SFT of M on (p0, x) -> y as the static adapter `actor` (active only when the model acts as M)."""
    steps = cfg.metatuner.warmup_actor_steps
    params = mt.add_actor_adapter(cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules)
    mt.set_actor_trainable(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    batches = _batches(len(examples), cfg.train.batch_size, rng)
    losses = []
    for _ in tqdm(range(steps), desc="warm-up M (SFT)", unit="step"):
        rows = [examples[i] for i in next(batches)]
        chats = [chat_prompt(mt.m_tok, task.messages(p0, ex)) for ex in rows]
        batch = lm_batch(mt.m_tok, chats, [ex.target for ex in rows], cfg.train.max_length, device=mt.m.device)
        with mt.role("actor"), accelerator.autocast():
            loss = lm_loss(mt.m, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    mt.set_actor_trainable(False)
    return {"warmup_actor_first_loss": losses[0], "warmup_actor_final_loss": losses[-1]} if losses else {}


def train_metatuner(cfg: RunConfig) -> Path:
    s = cfg.metatuner
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
                              log_with="tensorboard", project_dir=str(out), cpu=cfg.model.device == "cpu")
    accelerator.init_trackers("tb")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    task = get_task(cfg.data.task, **cfg.data.task_options)
    examples = task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    p0 = cfg.data.prompt or task.default_prompt
    mt = build_metatuner(cfg, str(accelerator.device))
    store = ExpertPromptStore.load(s.expert_prompts) if s.expert_prompts else ExpertPromptStore()
    timer, summary = _Timer(), {"method": "metatuner", "schedule": s.schedule, "share_depth_layers": mt.k}
    start = time.perf_counter()
    resume_from = find_checkpoint(out, cfg.train.resume) if cfg.train.resume else None
    ckpt = load_checkpoint(resume_from) if resume_from else None

    # ----- warm-up (its results are in the checkpoint when resuming) ------------------------------------------
    if ckpt is not None:
        mt.load_state(ckpt.tensors, ckpt.state["meta"], source=str(ckpt.path))
        store = ExpertPromptStore(ckpt.state["expert_prompts"])
        summary = ckpt.state["summary"]
        timer.seconds.update(ckpt.state["seconds"])
    elif s.warmup_actor_adapter:
        mt.load_actor_adapter(s.warmup_actor_adapter)
    elif s.warmup_actor_steps > 0:
        with timer("warmup_actor"):
            summary.update(warm_up_actor(mt, cfg, task, examples, p0, accelerator, rng))
    g_params = mt.generator_parameters()
    h_params = list(mt.hyper.parameters()) if s.use_hyper else []
    if ckpt is None and s.warmup_generator and s.use_prompt:
        with timer("warmup_generator"):
            summary.update(_warm_up_generator(mt, cfg, task, examples, p0, store, g_params, accelerator, rng))

    # ----- joint training ------------------------------------------------------------------------------------
    per_step = cfg.train.batch_size
    total_steps = cfg.train.max_steps or -(-len(examples) // per_step) * cfg.train.epochs
    optimizer = torch.optim.AdamW(
        [{"params": g_params, "lr": s.lr_generator}] + ([{"params": h_params, "lr": s.lr_hyper}] if h_params else []),
        weight_decay=cfg.train.weight_decay,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps), total_steps)
    history, seen, tokens, first = defaultdict(list), 0, 0, 1
    if ckpt is not None:
        ckpt.restore(optimizer, scheduler)
        history.update(ckpt.state["history"])
        seen, tokens, first = ckpt.state["seen"], ckpt.state["tokens"], ckpt.step + 1
        start -= ckpt.state["elapsed"]
    bar = tqdm(range(first, total_steps + 1), desc=f"MetaTuner-{s.schedule}", unit="step",
               initial=first - 1, total=total_steps)

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out, step, tensors=mt.trainable_state(), optimizer=optimizer, scheduler=scheduler,
                               keep=cfg.train.keep_checkpoints, state={
                                   "meta": mt.meta(), "expert_prompts": store.entries, "summary": summary,
                                   "history": dict(history), "seen": seen, "tokens": tokens,
                                   "seconds": dict(timer.seconds), "elapsed": time.perf_counter() - start})

    interrupt = _Interrupt()  # SIGINT/SIGTERM finish the current step, save a checkpoint and stop
    bad_steps = 0
    try:
        for step in bar:
            rows = [examples[i] for i in batch_rows(step, len(examples), per_step, cfg.seed)]
            with accelerator.autocast():
                loss, logs = _step_loss(mt, cfg, task, rows, p0, store, step, timer)
            if loss is None:
                continue
            if not torch.isfinite(loss):
                # Skip the update: the weights stay those of the last good step.
                bad_steps += 1
                log.warning("step %d: non-finite loss (%s), update skipped (%d in a row)", step, loss.item(), bad_steps)
                optimizer.zero_grad(set_to_none=True)
                if bad_steps >= cfg.train.max_bad_steps:
                    path = checkpoint(step - 1)
                    raise TrainingStopped(f"{bad_steps} non-finite losses in a row at step {step}; the last good state "
                                          f"is saved in {path}. Lower the learning rates or check the data.")
                continue
            bad_steps = 0
            with timer("backward"):
                loss.backward()
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(g_params + h_params, cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if step % s.sync_every == 0:
                mt.sync_frozen()
            seen += len(rows)
            tokens += sum(len(mt.m_tok(ex.target, add_special_tokens=False)["input_ids"]) for ex in rows)
            elapsed = time.perf_counter() - start
            logs.update({"train/examples_seen": seen, "train/target_tokens_per_s": tokens / elapsed,
                         "train/d2_size": len(store)})
            for key, value in logs.items():
                history[key].append(value)
            if step % cfg.train.log_every == 0 or step == total_steps:
                accelerator.log({**logs, **{f"seconds/{k}": v for k, v in timer.seconds.items()}}, step=step)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.endswith("loss")})
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                checkpoint(step)
            if interrupt.signal is not None:
                path = checkpoint(step)
                raise TrainingStopped(f"stopped by signal {interrupt.signal} after step {step}; saved {path}. "
                                      "Continue with --resume auto.", exit_code=128 + interrupt.signal)
    finally:
        interrupt.uninstall()
    bar.close()

    save_run(mt, store, out)
    summary.update({
        "command": command_line(), "steps": total_steps, "train_examples": seen, "unique_train_examples": len(examples),
        "train_seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb(),
        "seconds_per_phase": {k: round(v, 1) for k, v in timer.seconds.items()},
        "history": dict(history),
    })
    (out / "train_metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    accelerator.end_training()
    return out


def _step_loss(mt: MetaTuner, cfg: RunConfig, task, rows, p0: str, store: ExpertPromptStore, step: int, timer):
    """One step's loss under the configured schedule (J: task + alpha * SR; I: alternating blocks), with rollouts
    refreshing D2 every `rollout_every` steps; returns (loss or None when nothing trains, scalars to log)."""
    s = cfg.metatuner
    logs: dict[str, float] = {}
    device = next(mt.hyper.parameters()).device
    if s.prompt_objective == "gumbel":
        with timer("task_loss"):
            loss, _ = gumbel_task_loss(mt, task, rows, p0, s.max_prompt_tokens, s.gumbel_tau, cfg.train.max_length)
        logs["train/task_loss"] = loss.item()
        return loss, logs
    block = (step - 1) // s.interleave_block
    do_task = s.use_hyper and (s.schedule == "J" or block % 2 == 0)
    do_sr = s.use_prompt and s.sr_weight > 0 and (s.schedule == "J" or block % 2 == 1)
    if not (do_task or do_sr):  # schedule I with one branch switched off: this block has nothing to train
        return None, logs
    requests = mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows])
    loss = torch.zeros((), device=device)
    with timer("write_prompts"):
        written = mt.write_prompts(requests, with_grad=do_task)
        factors = mt.factors(written.h)
        prompts = written.prompts or [p0] * len(rows)
    if do_task:
        with timer("task_loss"):
            chats = [chat_prompt(mt.m_tok, task.messages(p, ex)) for p, ex in zip(prompts, rows)]
            task_loss = mt.task_loss(chats, [ex.target for ex in rows], factors, cfg.train.max_length)
        loss = loss + task_loss
        logs["train/task_loss"] = task_loss.item()
    if do_sr and (step - 1) % s.rollout_every == 0:
        with timer("rollouts"):
            result = run_rollouts(mt, task, rows, p0, factors, store, n=s.n_rollouts,
                                  temperature=s.rollout_temperature, reward=s.reward,
                                  batch_size=cfg.eval.batch_size)
        logs.update({"rollouts/mean_reward": result.mean_reward, "rollouts/best_reward": result.best_reward,
                     "rollouts/d2_improved_share": result.improved / len(rows)})
    if do_sr:
        with timer("sr_loss"):
            sr = mt.sr_loss(requests, [store.best(ex.id, p0) for ex in rows])
        loss = loss + s.sr_weight * sr
        logs["train/sr_loss"] = sr.item()
    return loss, logs


def _warm_up_generator(mt, cfg, task, examples, p0, store, g_params, accelerator, rng) -> dict:
    """One rejection-sampling round for G: rollouts over the training queries, then SR-only steps on the best."""
    s = cfg.metatuner
    bs = cfg.train.batch_size
    improved = 0
    queries = examples[: s.warmup_generator_queries] if s.warmup_generator_queries else examples
    for i in tqdm(range(0, len(queries), bs), desc="warm-up G (rollouts)", unit="batch"):
        rows = queries[i : i + bs]
        with torch.no_grad(), accelerator.autocast():
            written = mt.write_prompts(mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows]), False)
            result = run_rollouts(mt, task, rows, p0, mt.factors(written.h), store, n=s.n_rollouts,
                                  temperature=s.rollout_temperature, reward=s.reward, batch_size=cfg.eval.batch_size)
        improved += result.improved
    optimizer = torch.optim.AdamW(g_params, lr=s.lr_generator)
    batches = _batches(len(queries), bs, rng)
    losses = []
    for _ in tqdm(range(s.warmup_generator_steps), desc="warm-up G (SFT on best prompts)", unit="step"):
        rows = [queries[i] for i in next(batches)]
        requests = mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows])
        with accelerator.autocast():
            loss = mt.sr_loss(requests, [store.best(ex.id, p0) for ex in rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    mt.sync_frozen()
    return {"warmup_generator_improved_share": improved / len(queries),
            **({"warmup_generator_sr_loss": [losses[0], losses[-1]]} if losses else {})}


def save_run(mt: MetaTuner, store: ExpertPromptStore, out: Path) -> None:
    mt.save(out / "model")
    store.save(out / "model" / "expert_prompts.json")
