"""MetaTuner training: warm-up, then the J (joint) or I (interleaved) schedule.

    metatuner train --config configs/demo-arithmetic.yaml                # CPU, embedded model, G = M
    metatuner train --config configs/qwen2.5-7b-3b-gsm8k.yaml           # one GPU
    accelerate launch --config_file configs/accelerate/ddp.yaml -m metatuner train --config ...   # N GPUs
    torchrun --standalone --nproc_per_node 2 -m metatuner train --config ... model.device=cpu   # 2 CPU processes

Each step (`JointTraining.step`), for a batch of training queries x with initial instruction p0:
1. Write: G encodes the rewrite request (p0, x) once with {phi_s, phi_p'}: h for the hypernetwork, and a greedy
   prompt p.
2. Task loss: NLL of y under M with LoRA F(h) given (p, x). Reaches phi_q and phi_s (through h).
3. Rollouts (every `rollout_every` SR steps): n sampled prompts + p0 + the stored best, scored through M with the
   query's LoRA; the best goes to D2 when it beats the stored one.
4. SR loss: NLL of D2's prompt for x under {phi_s, phi_p}, weighted by alpha. Reaches phi_s and phi_p.
5. Update: gradients averaged over the ranks, clipped, AdamW; skipped when a loss or the gradient is not finite.
J adds both losses every step; I alternates blocks of `interleave_block` steps. phi_p' <- phi_p every `sync_every`.
Between steps, whatever the step did, `trainer.StepControl` writes the periodic checkpoint and stops on a signal.

Under N processes each takes 1/N of every step's batch (the batch is a pure function of the step), rollouts run on
each rank's own queries and the D2 updates are merged on every rank, the trainable gradients are averaged, and only
the main process writes (`distributed.py` says why the gradients are averaged by hand rather than by DDP).

The run folder gets config.yaml, TensorBoard scalars under tb/, train_metrics.json (the schema in `trainer.py`),
and model/ (safetensors weights of every trainable part) with expert_prompts.json (D2) beside it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .batching import batch_rows, full_batches
from .checkpoint import find_checkpoint, save_checkpoint
from .config import RunConfig
from .diagnostics import d2_diagnostics, flat_scalars, is_p0, run_diagnostics
from .distributed import (average_gradients, broadcast_parameters, end_training, merge_dicts, rank_rng_states,
                          restore_rank_rng, shard, sum_across, warn_if_sharded)
from .generation import base_model, lm_batch, lm_loss, task_chats
from .gumbel import gumbel_task_loss
from .memory_estimate import check_memory
from .model import MetaTuner, build_metatuner
from .rollouts import ExpertPromptStore, run_rollouts
from .tasks import check_lengths, token_counter
from .trainer import (Run, StepControl, TrainingStopped, find_resume, make_accelerator, open_run_folder, run_metrics,
                      start_run, write_metrics)

log = logging.getLogger(__name__)


def enable_gradient_checkpointing(mt: MetaTuner) -> None:
    """Checkpoint G's and M's decoder layers. transformers checkpoints a layer only in training mode, so the models
    stay in eval mode (KV-cached decoding keeps its cache) and `_training` switches them for the loss forwards."""
    for model in {id(mt.g): mt.g, id(mt.m): mt.m}.values():
        base = base_model(model)
        # Non-reentrant: the inputs of a checkpointed layer need not require grad (the base weights are frozen).
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.eval()


@contextlib.contextmanager
def _training(mt: MetaTuner, on: bool):
    if not on:
        yield
        return
    models = {id(mt.g): mt.g, id(mt.m): mt.m}.values()
    for model in models:
        model.train()
    try:
        yield
    finally:
        for model in models:
            model.eval()


@contextlib.contextmanager
def _actor_with(mt: MetaTuner, factors):
    """The actor role with the batch's per-query LoRA: where the task loss runs its forward, and where its
    backward must run too when layers are checkpointed (the recompute must see the same adapters and LoRA)."""
    with mt.role("actor"), (mt.lora.apply(factors) if factors is not None else contextlib.nullcontext()):
        yield


@dataclass
class _Term:
    """One loss of a step on this rank's rows."""

    name: str
    loss: torch.Tensor  # this rank's token-mean loss
    weight: float  # alpha for SR, 1 for the task loss
    tokens: int  # this rank's target tokens, its share of the global token mean (1 in one process: unused)
    context: Callable[[], contextlib.AbstractContextManager]  # the role its forward ran in


def _target_tokens(tokenizer, prompts, targets, max_length: int) -> int:
    return int((lm_batch(tokenizer, prompts, targets, max_length)["labels"] != -100).sum())


def _combine(terms: list[_Term], accelerator) -> tuple[dict[str, float], list[float]]:
    """Global token-mean of each term over all ranks, and the factor that makes this rank's backward contribute
    exactly its share: tokens / global tokens * N (the gradients are then averaged over the N ranks)."""
    n = accelerator.num_processes
    if n == 1:
        return {t.name: t.loss.item() for t in terms}, [1.0] * len(terms)
    sums = sum_across([v for t in terms for v in (t.tokens, t.loss.item() * t.tokens)], accelerator)
    means, scales = {}, []
    for i, t in enumerate(terms):
        total = sums[2 * i]
        means[t.name] = sums[2 * i + 1] / total
        scales.append(t.tokens / total * n)
    return means, scales


def _backward(terms: list[_Term], scales: list[float]) -> None:
    # One backward per term, each inside the role its forward ran in: with checkpointed layers the recompute
    # happens here, and G's roles and M's per-query LoRA differ between the terms. The terms' graphs are disjoint
    # (the task loss goes through the writer's prefill and M, the SR loss through the learner), so this equals one
    # backward of their sum.
    for term, scale in zip(terms, scales):
        with term.context():
            (term.loss * (term.weight * scale)).backward()


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


def warm_up_actor(mt: MetaTuner, cfg: RunConfig, task, examples, p0, accelerator, rng) -> dict:
    """LoRA SFT of M on (p0, x) -> y as the static adapter `actor` (active only when the model acts as M)."""
    steps = cfg.metatuner.warmup_actor_steps
    params = mt.add_actor_adapter(cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules)
    broadcast_parameters(params, accelerator)
    mt.set_actor_trainable(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    # The SFT baseline's schedule, so that a warm-up of M here and the SFT adapter differ only in what they see.
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * steps), steps)
    batches = full_batches(len(examples), cfg.train.batch_size, rng)
    choose = random.Random(cfg.seed + 1)  # its own stream: the batches stay those of a p0-only warm-up
    losses = []
    for _ in tqdm(range(steps), desc="warm-up M (SFT)", unit="step", disable=not accelerator.is_main_process):
        rows = shard([examples[i] for i in next(batches)], accelerator)
        prompts = _warmup_prompts(mt, rows, p0, cfg.metatuner, choose)
        chats = task_chats(mt.m_tok, task, prompts, rows)
        batch = lm_batch(mt.m_tok, chats, [ex.target for ex in rows], cfg.train.max_length, device=mt.m.device)
        with mt.role("actor"):
            with accelerator.autocast(), _training(mt, cfg.train.gradient_checkpointing):
                loss = lm_loss(mt.m, batch)
            term = _Term("loss", loss, 1.0, int((batch["labels"] != -100).sum()), contextlib.nullcontext)
            means, scales = _combine([term], accelerator)
            _backward([term], scales)  # inside the actor role: a checkpointed recompute needs M's adapter active
        average_gradients([p for p in params if p.grad is not None], accelerator)
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(means["loss"])
    mt.set_actor_trainable(False)
    return {"warmup_actor_first_loss": losses[0], "warmup_actor_final_loss": losses[-1]} if losses else {}


def _warmup_prompts(mt: MetaTuner, rows, p0: str, s, choose: random.Random) -> list[str]:
    """p0 for each row, except a `warmup_actor_sampled_prompts` share that gets a prompt G samples for its query
    (G as it is before training: the base model rewriting p0), so that M does not learn p0's wording alone."""
    prompts = [p0] * len(rows)
    picked = [i for i in range(len(rows)) if choose.random() < s.warmup_actor_sampled_prompts]
    if picked:
        requests = mt.rewrite_requests([p0] * len(picked), [rows[i].question for i in picked])
        for i, (sample,) in zip(picked, mt.sample_prompts(requests, n=1, temperature=s.rollout_temperature)):
            prompts[i] = sample or p0
    return prompts


def train_metatuner(cfg: RunConfig) -> Path:
    """Train MetaTuner as `cfg` says; returns the run folder. Resumes from `train.resume`; a SIGINT or SIGTERM
    finishes the current step, saves a checkpoint and raises TrainingStopped."""
    out = open_run_folder(cfg)
    accelerator, precision = make_accelerator(cfg, out)
    run = start_run(cfg, out, accelerator.is_main_process, precision)
    accelerator.init_trackers("tb")
    warn_if_sharded(accelerator, "MetaTuner training")
    rng = random.Random(cfg.seed)  # the warm-ups' batches
    examples = run.task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    _check_batch_sizes(cfg, len(examples), accelerator.num_processes)
    if cfg.train.check_memory:
        check_memory(cfg, accelerator.device, num_processes=accelerator.num_processes,
                     verbose=accelerator.is_main_process)
    mt = build_metatuner(cfg, str(accelerator.device))
    mt.task, mt.p0 = run.task, run.p0
    # Over-long examples stop the run (naming file and line) or, with on_bad_row=skip, are left out: cut to
    # max_length they would train on a question without its answer.
    examples = check_lengths(examples, token_counter(mt.m_tok), cfg.train.max_length, cfg.data.on_bad_row)
    _warn_if_p0_is_cut(mt, cfg.metatuner, run.p0)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(mt)
    training = JointTraining(cfg, mt, run, examples, accelerator, precision)
    ckpt = find_resume(cfg, out)
    training.warm_up(ckpt, rng)  # or, when resuming, the warm-ups' results from the checkpoint
    total_steps = cfg.train.max_steps or -(-len(examples) // training.per_step) * cfg.train.epochs
    training.prepare_optimizer(total_steps, ckpt)
    with StepControl(cfg.train.save_every, accelerator, save=training.save_checkpoint) as control:
        bar = tqdm(range(training.first_step, total_steps + 1), desc=f"MetaTuner-{cfg.metatuner.schedule}",
                   unit="step", initial=training.first_step - 1, total=total_steps,
                   disable=not accelerator.is_main_process)
        for step in bar:
            logs = training.step(step, total_steps)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.endswith("loss")})
            control.after_step(step, total_steps)
        bar.close()
    training.finish(total_steps)
    accelerator.wait_for_everyone()
    end_training(accelerator)
    return out


def _check_batch_sizes(cfg: RunConfig, n_examples: int, processes: int) -> None:
    micro, per_step = cfg.train.batch_size, cfg.train.batch_size * cfg.train.grad_accum
    if min(micro, n_examples) < processes:
        raise ValueError(f"train.batch_size={micro} with {n_examples} training examples leaves some of the "
                         f"{processes} processes without a row: raise train.batch_size to at least "
                         f"{processes} or launch fewer processes")
    if cfg.train.grad_accum > 1 and n_examples < per_step:
        raise ValueError(f"train.batch_size * train.grad_accum = {per_step} is more than the {n_examples} "
                         "training examples: lower train.grad_accum")


def _warn_if_p0_is_cut(mt: MetaTuner, s, p0: str) -> None:
    p0_tokens = token_counter(mt.g_tok)(p0)
    if s.use_prompt and p0_tokens > s.max_prompt_tokens:
        # G's prompts are cut at max_prompt_tokens, so it could not even write p0 back.
        log.warning("p0 is %d tokens, longer than metatuner.max_prompt_tokens=%d: every prompt G writes is cut "
                    "short; raise metatuner.max_prompt_tokens", p0_tokens, s.max_prompt_tokens)


class JointTraining:
    """Schedules J and I after the warm-ups: the optimiser and what one step carries to the next (D2, the
    history, the count of non-finite updates in a row), and the step itself in numbered phases (`step`)."""

    def __init__(self, cfg: RunConfig, mt: MetaTuner, run: Run, examples, accelerator, precision):
        self.cfg, self.s, self.mt, self.accelerator = cfg, cfg.metatuner, mt, accelerator
        self.out, self.task, self.p0, self.examples = run.out, run.task, run.p0, examples
        self.micro = cfg.train.batch_size  # the global micro-batch: each of the N processes takes 1/N of it
        self.per_step = self.micro * cfg.train.grad_accum  # examples per optimiser step
        self.store = ExpertPromptStore.load(self.s.expert_prompts) if self.s.expert_prompts else ExpertPromptStore()
        self.timer = _Timer()
        self.summary = {"method": "metatuner", "schedule": self.s.schedule, "share_depth_layers": mt.k,
                        "processes": accelerator.num_processes, "precision": precision.as_dict()}
        self.precision = precision
        self.history: defaultdict[str, list] = defaultdict(list)
        self.seen, self.tokens, self.first_step, self.bad_steps = 0, 0, 1, 0
        self.means: dict[str, float] = {}  # the step's global loss means, filled as each loss is released
        self.start = time.perf_counter()

    # ----- before the first step ---------------------------------------------------------------------------
    def warm_up(self, ckpt, rng: random.Random) -> None:
        mt, s, cfg, accelerator = self.mt, self.s, self.cfg, self.accelerator
        if ckpt is not None:
            mt.load_state(ckpt.tensors, ckpt.state["meta"], source=str(ckpt.path))
            self.store = ExpertPromptStore(ckpt.state["expert_prompts"])
            self.summary = {**ckpt.state["summary"], "precision": self.precision.as_dict()}  # this sitting's machine
            self.timer.seconds.update(ckpt.state["seconds"])
        elif s.warmup_actor_adapter:
            mt.load_actor_adapter(s.warmup_actor_adapter)
        elif s.warmup_actor_steps > 0:
            with self.timer("warmup_actor"):
                self.summary.update(warm_up_actor(mt, cfg, self.task, self.examples, self.p0, accelerator, rng))
        self.g_params = mt.generator_parameters()
        self.h_params = list(mt.hyper.parameters()) if s.use_hyper else []
        # Every rank built the same weights from the same seed; rank 0's are broadcast anyway, as DDP does. Full
        # fine-tuning loads G from the same checkpoint on every rank, so its billions of weights need no broadcast.
        broadcast_parameters(([] if mt.full else self.g_params) + list(mt.hyper.parameters()), accelerator)
        if accelerator.num_processes > 1:
            # Ranks sample different rollouts for their different queries; the weights above are identical.
            torch.manual_seed(cfg.seed + 1_000_003 * accelerator.process_index)
        if ckpt is None and s.warmup_generator and s.use_prompt:
            with self.timer("warmup_generator"):
                self.summary.update(warm_up_generator(mt, cfg, self.task, self.examples, self.p0, self.store,
                                                      self.g_params, accelerator, rng))

    def prepare_optimizer(self, total_steps: int, ckpt) -> None:
        s, cfg = self.s, self.cfg
        groups = [{"params": self.g_params, "lr": s.lr_generator}]
        groups += [{"params": self.h_params, "lr": s.lr_hyper}] if self.h_params else []
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(cfg.train.warmup_ratio * total_steps),
                                                         total_steps)
        if ckpt is not None:
            ckpt.restore(self.optimizer, self.scheduler)
            restore_rank_rng(ckpt.state.get("rank_rng"), self.accelerator, str(ckpt.path))
            self.history.update(ckpt.state["history"])
            self.seen, self.tokens, self.first_step = ckpt.state["seen"], ckpt.state["tokens"], ckpt.step + 1
            self.start -= ckpt.state["elapsed"]

    # ----- one step -------------------------------------------------------------------------------------------
    def step(self, step: int, total_steps: int) -> dict[str, float]:
        """One optimiser step over its batch (a pure function of the step): per micro-batch 1. G writes the
        prompts and h, 2. the task loss, 3. rollouts, 4. the SR loss (each loss's backward as soon as it exists),
        then 5. the update, skipped when a loss or the gradient is not finite. Returns the step's scalars."""
        rows_global = [self.examples[i] for i in batch_rows(step, len(self.examples), self.per_step, self.cfg.seed)]
        self.means, logs, terms = {}, {}, []
        for first in range(0, len(rows_global), self.micro):
            rows = shard(rows_global[first : first + self.micro], self.accelerator)
            with self.accelerator.autocast():
                terms, micro_logs = self._forward(step, rows)
            for key, value in micro_logs.items():
                logs[key] = logs.get(key, 0.0) + value / self.cfg.train.grad_accum
        if terms and self._update(step, terms):  # no terms: schedule I with that block's branch switched off
            logs = self._record(step, total_steps, rows_global, logs)
        return logs

    def _forward(self, step: int, rows) -> tuple[list[_Term], dict[str, float]]:
        """Phases 1-4 on this rank's rows under the schedule (J: task + alpha * SR; I: alternating blocks)."""
        s, mt, p0 = self.s, self.mt, self.p0
        if s.prompt_objective == "gumbel":
            return self._gumbel_forward(rows)
        block = (step - 1) // s.interleave_block
        do_task = s.use_hyper and (s.schedule == "J" or block % 2 == 0)
        do_sr = s.use_prompt and s.sr_weight > 0 and (s.schedule == "J" or block % 2 == 1)
        if not (do_task or do_sr):  # schedule I with one branch switched off: this block has nothing to train
            return [], {}
        terms, logs = [], {}
        requests = mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows])
        with self.timer("write_prompts"):  # 1. write: G's prompts and h, and M's per-query LoRA
            written = mt.write_prompts(requests, with_grad=do_task)
            factors = mt.factors(written.h)
            prompts = written.prompts or [p0] * len(rows)
        if do_task:  # 2. task loss
            terms.append(self._release(self._task_term(rows, prompts, factors)))
        if do_sr and sr_steps_before(step, s.schedule, s.interleave_block) % s.rollout_every == 0:
            logs.update(self._rollout_phase(rows, factors))  # 3. rollouts: D2's best prompts
        if do_sr:  # 4. SR loss
            with self.timer("sr_loss"):
                sr_term = _sr_term(mt, self.cfg, requests, rows, p0, self.store, s.sr_weight, self.accelerator)
            if sr_term is not None:
                terms.append(self._release(sr_term))
        if written.prompts is not None:
            logs["prompts/p0_share"] = sum(is_p0(p, p0) for p in written.prompts) / len(rows)
        return terms, logs

    def _gumbel_forward(self, rows) -> tuple[list[_Term], dict[str, float]]:
        # Its graph mixes G's learner role and M in one backward, so its layers are not checkpointed; across ranks
        # its examples (not tokens) weight the mean.
        s = self.s
        with self.timer("task_loss"):
            loss, _ = gumbel_task_loss(self.mt, self.task, rows, self.p0, s.max_prompt_tokens, s.gumbel_tau,
                                       self.cfg.train.max_length)
        return [self._release(_Term("task", loss, 1.0, len(rows), contextlib.nullcontext))], {}

    def _task_term(self, rows, prompts, factors) -> _Term:
        mt, max_length = self.mt, self.cfg.train.max_length
        with self.timer("task_loss"):
            chats = task_chats(mt.m_tok, self.task, prompts, rows)
            targets = [ex.target for ex in rows]
            with _training(mt, self.cfg.train.gradient_checkpointing):
                task_loss = mt.task_loss(chats, targets, factors, max_length)
        count = _target_tokens(mt.m_tok, chats, targets, max_length) if self.accelerator.num_processes > 1 else 1
        return _Term("task", task_loss, 1.0, count, functools.partial(_actor_with, mt, factors))

    def _rollout_phase(self, rows, factors) -> dict[str, float]:
        with self.timer("rollouts"):
            result = _rollouts(self.mt, self.cfg, self.task, rows, self.p0, factors, self.store)
            _merge_d2(self.store, rows, self.accelerator)
        scored, mean_sum, best_sum, improved, beats, gap_sum, queries, leaks, sampled = sum_across(
            [result.scored, result.mean_reward * result.scored, result.best_reward * len(rows), result.improved,
             result.beats_p0, result.gap_over_p0 * len(rows), len(rows), result.leaks, result.sampled],
            self.accelerator)
        return {"rollouts/mean_reward": mean_sum / scored, "rollouts/best_reward": best_sum / queries,
                "rollouts/d2_improved_share": improved / queries, "rollouts/beats_p0_share": beats / queries,
                "rollouts/gap_over_p0": gap_sum / queries, "rollouts/answer_leak_share": leaks / max(sampled, 1),
                "d2/from_samples_share": self.store.from_samples_share(self.p0)}

    def _release(self, term: _Term) -> _Term:
        """Backward as soon as a loss exists, so that its graph is freed before the step's next phase (rollouts,
        the SR loss, the next micro-batch) runs and a step holds one graph at a time. The terms' graphs are
        disjoint, so the gradients equal one backward of their sum. Micro-batches weigh equally, as in SFT."""
        n_micro = self.cfg.train.grad_accum
        term_means, (scale,) = _combine([term], self.accelerator)
        self.means[term.name] = self.means.get(term.name, 0.0) + term_means[term.name] / n_micro
        if np.isfinite(term_means[term.name]):  # a non-finite loss skips the whole update
            with self.timer("backward"), torch.autocast(self.accelerator.device.type, enabled=False):
                _backward([term], [scale / n_micro])
        return term

    def _update(self, step: int, terms: list[_Term]) -> bool:
        """5. update: average the gradients over the ranks, clip, step. False when the update was skipped."""
        total = sum(t.weight * self.means[t.name] for t in terms)
        if not np.isfinite(total):  # the same on every rank: the means are global
            self._skip(step, f"non-finite loss ({total})")
            return False
        params = self.g_params + self.h_params
        with self.timer("backward"):
            average_gradients([p for p in params if p.grad is not None], self.accelerator)
            # A finite loss can still give an inf/NaN gradient (an overflow in bf16); one such update would turn
            # every weight into NaN, so it is skipped like a non-finite loss.
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip or float("inf"))
            if not torch.isfinite(norm):
                self._skip(step, f"non-finite gradient norm ({norm.item()})")
                return False
            self.bad_steps = 0
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if step % self.s.sync_every == 0:
            self.mt.sync_frozen()
        return True

    def _skip(self, step: int, what: str) -> None:
        """Skip the update: the weights stay those of the last good step; too many in a row stop the run."""
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("step %d: %s, update skipped (%d in a row)", step, what, self.bad_steps)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            path = self.save_checkpoint(step - 1)
            raise TrainingStopped(f"{self.bad_steps} non-finite losses or gradients in a row at step {step}; the "
                                  f"last good state is saved in {path}. Lower the learning rates or check the data.")

    def _record(self, step: int, total_steps: int, rows_global, logs: dict[str, float]) -> dict[str, float]:
        """The step's scalars into the history and, every `log_every` steps, the trackers."""
        self.seen += len(rows_global)
        self.tokens += sum(len(self.mt.m_tok(ex.target, add_special_tokens=False)["input_ids"]) for ex in rows_global)
        logs = {**logs, **{f"train/{name}_loss": value for name, value in self.means.items()},
                "train/examples_seen": self.seen,
                "train/target_tokens_per_s": self.tokens / (time.perf_counter() - self.start),
                "train/d2_size": len(self.store)}
        for key, value in logs.items():
            self.history[key].append(value)
        if step % self.cfg.train.log_every == 0 or step == total_steps:
            self.accelerator.log({**logs, **{f"seconds/{k}": v for k, v in self.timer.seconds.items()}}, step=step)
        return logs

    # ----- checkpoints and the end ----------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path | None:
        """A resumable checkpoint (collective: every rank sends its RNG states, the main one writes)."""
        ranks = rank_rng_states(self.accelerator)
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.out, step, tensors=self.mt.trainable_state(), optimizer=self.optimizer, scheduler=self.scheduler,
                keep=self.cfg.train.keep_checkpoints, state={
                    "meta": self.mt.meta(), "expert_prompts": self.store.entries, "summary": self.summary,
                    "history": dict(self.history), "seen": self.seen, "tokens": self.tokens,
                    "seconds": dict(self.timer.seconds), "elapsed": time.perf_counter() - self.start,
                    "processes": self.accelerator.num_processes, "config": asdict(self.cfg),
                    **({"rank_rng": ranks} if ranks else {})})
        self.accelerator.wait_for_everyone()
        return path or find_checkpoint(self.out, "auto")

    def finish(self, total_steps: int) -> None:
        """The trained model and D2 in model/, and train_metrics.json with the run's diagnostics (main process)."""
        if not self.accelerator.is_main_process:
            return
        mt, p0 = self.mt, self.p0
        save_run(mt, self.store, self.out)
        metrics = run_metrics(
            "metatuner", **{k: v for k, v in self.summary.items() if k != "method"}, steps=total_steps,
            train_examples=self.seen, unique_train_examples=len(self.examples),
            train_seconds=round(time.perf_counter() - self.start, 1),
            seconds_per_phase={k: round(v, 1) for k, v in self.timer.seconds.items()}, history=dict(self.history))
        # Is G writing anything but p0, and does the LoRA differ between queries? (64 training queries)
        mt.hyper.eval()  # as it will be used: running statistics (hyper_query_norm=standard) no longer move
        metrics["diagnostics"] = {**d2_diagnostics(self.store, p0), **run_diagnostics(
            mt, [ex.question for ex in self.examples[:64]], p0, self.cfg.eval.batch_size)}
        self.accelerator.log(flat_scalars(metrics["diagnostics"]), step=total_steps)
        write_metrics(self.out, metrics, self.accelerator, step=total_steps)


def _rollouts(mt: MetaTuner, cfg: RunConfig, task, rows, p0: str, factors, store: ExpertPromptStore):
    s = cfg.metatuner
    return run_rollouts(mt, task, rows, p0, factors, store, n=s.n_rollouts, temperature=s.rollout_temperature,
                        reward=s.reward, batch_size=cfg.eval.batch_size, p0_candidate=s.d2_source == "samples_and_p0",
                        reject_leaks=s.reject_answer_leaks)


def _merge_d2(store: ExpertPromptStore, rows, accelerator) -> None:
    """Each rank refreshed D2 for its own queries; every rank gets every update."""
    store.entries.update(merge_dicts({ex.id: store.entries[ex.id] for ex in rows if ex.id in store.entries},
                                     accelerator))


def _sr_term(mt: MetaTuner, cfg: RunConfig, requests, rows, p0: str, store: ExpertPromptStore, weight: float,
             accelerator) -> _Term | None:
    """The SR loss on the rows that have a D2 target (all rows with d2_source=samples_and_p0, where p0 stands in
    for a missing entry); None when no row of any rank has one. A rank without such rows contributes a zero loss
    of no tokens, so that the ranks' collectives stay in step."""
    s = cfg.metatuner
    default = p0 if s.d2_source == "samples_and_p0" else None
    keep = [i for i, ex in enumerate(rows) if store.best(ex.id, default) is not None]
    n = accelerator.num_processes
    if (sum_across([len(keep)], accelerator)[0] if n > 1 else len(keep)) == 0:
        return None
    if not keep:
        zero = torch.zeros((), device=mt.g.device, requires_grad=True)
        return _Term("sr", zero, weight, 0, lambda: mt.role("learner"))
    requests = [requests[i] for i in keep]
    best = [store.best(rows[i].id, default) for i in keep]
    with _training(mt, cfg.train.gradient_checkpointing):
        sr = mt.sr_loss(requests, best)
    count = _target_tokens(mt.g_tok, requests, best, s.max_request_tokens) if n > 1 else 1
    return _Term("sr", sr, weight, count, lambda: mt.role("learner"))


def sr_steps_before(step: int, schedule: str, block: int) -> int:
    """How many steps before `step` (1-based) trained the SR loss. Rollouts count these, not all steps: under
    schedule I only every other block trains SR, and counting all steps would never land on one when
    `rollout_every` and the block length share a factor (D2 would then never change)."""
    if schedule == "J":
        return step - 1
    return ((step - 1) // (2 * block)) * block + max(0, (step - 1) % (2 * block) - block)


def warm_up_generator(mt, cfg, task, examples, p0, store, g_params, accelerator, rng) -> dict:
    """One rejection-sampling round for G: rollouts over the training queries, then SR-only steps on the best."""
    s = cfg.metatuner
    bs = cfg.train.batch_size
    improved, leaks, sampled = 0, 0, 0
    main = accelerator.is_main_process
    queries = examples[: s.warmup_generator_queries] if s.warmup_generator_queries else examples
    for i in tqdm(range(0, len(queries), bs), desc="warm-up G (rollouts)", unit="batch", disable=not main):
        rows = shard(queries[i : i + bs], accelerator)
        if rows:  # the last batch may leave a rank without rows; it still joins the merge below
            with torch.no_grad(), accelerator.autocast():
                written = mt.write_prompts(mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows]), False)
                result = _rollouts(mt, cfg, task, rows, p0, mt.factors(written.h), store)
            improved, leaks, sampled = improved + result.improved, leaks + result.leaks, sampled + result.sampled
        _merge_d2(store, rows, accelerator)
    improved, leaks, sampled = (int(v) for v in sum_across([improved, leaks, sampled], accelerator))
    improved_share = improved / len(queries)  # of the visited queries, before they are narrowed to D2's below
    optimizer = torch.optim.AdamW(g_params, lr=s.lr_generator)
    if s.d2_source == "samples":  # SR targets are G's own samples: only queries that have one
        queries = [ex for ex in queries if ex.id in store.entries]
    batches = full_batches(len(queries), bs, rng)
    losses = []
    for _ in tqdm(range(s.warmup_generator_steps if queries else 0), desc="warm-up G (SFT on best prompts)",
                  unit="step", disable=not main):
        rows = shard([queries[i] for i in next(batches)], accelerator)
        requests = mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows])
        with accelerator.autocast():
            term = _sr_term(mt, cfg, requests, rows, p0, store, 1.0, accelerator)
        if term is None:
            continue
        means, scales = _combine([term], accelerator)
        _backward([term], scales)
        average_gradients([p for p in g_params if p.grad is not None], accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(means["sr"])
    mt.sync_frozen()
    return {"warmup_generator_improved_share": improved_share,
            "warmup_generator_answer_leak_share": leaks / max(sampled, 1),
            **({"warmup_generator_sr_loss": [losses[0], losses[-1]]} if losses else {})}


def save_run(mt: MetaTuner, store: ExpertPromptStore, out: Path) -> None:
    mt.save(out / "model")
    store.save(out / "model" / "expert_prompts.json")
