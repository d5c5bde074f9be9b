"""The MetaTuner model: a generator G split into a shared meta encoder and a prompt decoder, a frozen copy of the
prompt decoder, a hypernetwork that writes per-query LoRA, and the actor M that answers.

    mt = MetaTuner(generator, g_tok, settings)                  # G = M: one set of base weights
    requests = mt.rewrite_requests([p0] * len(xs), xs)
    written = mt.write_prompts(requests)                        # prompts (text) + h (keeps its gradient)
    factors = mt.hyper(written.h)                               # per-query LoRA for every target of M
    loss = mt.task_loss(actor_chats, targets, factors)          # reaches phi_q and phi_s only
    loss = mt.sr_loss(requests, best_prompts)                   # reaches phi_s and phi_p only

G's parameters are LoRA adapters (PEFT) on one model: `shared` (phi_s) on layers 0..k-1, `prompt` (phi_p) on
layers k..K-1 and its frozen twin `prompt_frozen` (phi_p'). Each forward states its role by the adapters it
activates: the writer {shared, prompt_frozen}, the learner {shared, prompt}, the actor none of them (or only M's
own warm-up adapter `actor`). When G and M are different checkpoints, M is a separate model and only G switches.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint
from peft import LoraConfig, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from .adapter_card import write_adapter_card
from .checkpoint import atomic_save_file, atomic_write_text
from .config import MetaTunerSettings, RunConfig, load_config
from .evaluate import evaluate
from .diagnostics import lora_diversity, prompt_diagnostics
from .generation import (DecodeBatch, base_model, cache_argument, chat_prompt, decode_cache, decode_loop,
                         digit_tokens, eos_ids, frozen_weight_casts, generate, last_logits_only, left_padded_batch,
                         lm_batch, lm_loss, output_cache, score_and_generate, score_targets, task_chats)
from .hyperlora import HyperLoraConfig, HyperLoraGenerator, LoraFactors, PerExampleLoRA, export_peft_adapter
from .models import load_generator_and_actor, resolve_share_depth
from .prompt_answers import answers_in_prompts
from .tasks import get_task
from .tasks.base import Example

SHARED, PROMPT, FROZEN, ACTOR, PRIVATE = "shared", "prompt", "prompt_frozen", "actor", "private_encoder"


@dataclass
class WrittenPrompts:
    prompts: list[str] | None  # None when the prompt branch is off (use_prompt=False): M gets p0
    h: torch.Tensor  # (batch, hidden) pooled meta-encoder state at layer k; keeps its gradient


class MetaTuner(nn.Module):
    def __init__(self, generator, g_tokenizer, settings: MetaTunerSettings, actor=None, m_tokenizer=None):
        super().__init__()
        self.settings = settings
        self.g_tok = g_tokenizer
        self.m_tok = m_tokenizer or g_tokenizer
        self.num_layers = generator.config.num_hidden_layers
        self.k = resolve_share_depth(settings.share_depth, self.num_layers)
        self.shares_weights = actor is None or actor is generator
        self.full = settings.g_finetune == "full"
        if self.full:
            if self.shares_weights:
                raise ValueError("metatuner.g_finetune=full needs a separate actor: with shared weights it would change M")
            self.g = generator
            decoder = self._decoder()
            # phi_p' is a copy of the upper layers and the final norm, swapped in for the writer role.
            self._live_upper = nn.ModuleList([*decoder.layers[self.k :], decoder.norm])
            self._generator_params = list(generator.parameters())  # before any copy is swapped in
            self.frozen_upper = copy.deepcopy(self._live_upper).requires_grad_(False)
        else:
            lora = dict(r=settings.g_lora_r, lora_alpha=settings.g_lora_alpha, lora_dropout=0.0,
                        target_modules=list(settings.g_target_modules), task_type="CAUSAL_LM")
            lower, upper = list(range(self.k)), list(range(self.k, self.num_layers))
            if settings.share:
                self.g = get_peft_model(generator, LoraConfig(**lora, layers_to_transform=lower), adapter_name=SHARED)
            else:
                # No sharing (the k = 0 ablation): the hypernetwork reads a private encoder (layers 0..k-1 with
                # their own adapter) and the prompt decoder is all of G.
                self.g = get_peft_model(generator, LoraConfig(**lora, layers_to_transform=lower), adapter_name=PRIVATE)
                upper = list(range(self.num_layers))
            self.g.add_adapter(PROMPT, LoraConfig(**lora, layers_to_transform=upper))
            self.g.add_adapter(FROZEN, LoraConfig(**lora, layers_to_transform=upper))
        encoder = SHARED if settings.share else PRIVATE
        shared = [SHARED] if settings.share else []
        self._roles = {"writer": shared + [FROZEN], "learner": shared + [PROMPT], "encoder": [encoder]}
        self.m = self.g if self.shares_weights else actor
        self.m.requires_grad_(False)
        hyper_cfg = HyperLoraConfig(
            target_modules=list(settings.target_modules), r=settings.rank, scale=settings.scale,
            hidden_size=settings.hyper_hidden, query_embed_dim=settings.hyper_query_dim,
            query_norm=settings.hyper_query_norm,
        )
        self.lora = PerExampleLoRA(self.m, hyper_cfg.target_modules, scale=hyper_cfg.scale)
        self.hyper = HyperLoraGenerator(hyper_cfg, input_dim=generator.config.hidden_size, targets=self.lora.targets).to(
            generator.device)  # h lives where G runs
        self.hyper_config = hyper_cfg
        self.actor_adapter: dict | None = None  # r, alpha, target_modules of M's warm-up LoRA once added
        self.actor_trainable = False  # True only while M's warm-up adapter is being trained
        self.task, self.p0 = None, None  # set by from_pretrained or the trainer; needed by generate/evaluate
        # The SR loss's forward checkpoints G's layers (`_checkpointed`): its graph over the request and the prompt
        # was the peak of a training step's memory.
        self.checkpoint_sr = True
        self._banned_prompt_tokens = (digit_tokens(g_tokenizer, generator.device) if settings.prompt_without_digits
                                      else None)
        self.sync_frozen()
        self._activate(self._roles["writer"])

    def _decoder(self):
        decoder = self.g.get_decoder()
        if not (hasattr(decoder, "layers") and hasattr(decoder, "norm")):
            raise ValueError(f"g_finetune=full needs a decoder with .layers and .norm; {type(decoder).__name__} has not")
        return decoder

    def _use_upper(self, modules: nn.ModuleList) -> None:
        """Put `modules` (the live phi_p or the frozen phi_p') in place of G's upper layers and final norm."""
        decoder = self._decoder()
        for i, module in enumerate(modules[:-1]):
            decoder.layers[self.k + i] = module
        decoder.norm = modules[-1]

    # ----- parameters and roles -------------------------------------------------------------------------------
    def _named(self, adapter: str) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.g.named_parameters() if f".{adapter}." in n and "lora_" in n]

    def _adapter_params(self, name: str) -> list[nn.Parameter]:
        return [p for _, p in self._named(name)]

    def generator_parameters(self) -> list[nn.Parameter]:
        """phi_s and phi_p: the trainable part of G."""
        if not hasattr(self, "_generator_params"):  # computed once: role switches happen several times a step
            encoder = SHARED if self.settings.share else PRIVATE
            self._generator_params = self._adapter_params(encoder) + self._adapter_params(PROMPT)
        return self._generator_params

    def _activate(self, adapters: list[str]) -> None:
        if self.full:
            self._use_upper(self.frozen_upper if FROZEN in adapters else self._live_upper)
            for p in self.generator_parameters():
                p.requires_grad_(True)
            return
        # PEFT's set_adapter flips requires_grad to match the active set; our trainable set is fixed instead, so
        # phi_p' and M's warm-up adapter stay frozen whatever is active.
        self.g.base_model.set_adapter(adapters, inference_mode=True)
        for p in self.generator_parameters() + (self.actor_parameters() if self.actor_trainable else []):
            p.requires_grad_(True)

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[None]:
        """writer: {phi_s, phi_p'}; learner: {phi_s, phi_p}; actor: none of G's adapters (M's own if any);
        encoder: the private encoder of the no-sharing ablation."""
        if name == "actor":
            if not self.shares_weights:
                yield
                return
            if self.actor_adapter is not None:
                self._activate([ACTOR])
                try:
                    yield
                finally:
                    self._activate(self._roles["writer"])
                return
            try:
                with self.g.disable_adapter():
                    yield
            finally:
                # Leaving disable_adapter() re-runs PEFT's set_adapter, which un-marks inactive adapters as
                # trainable; a parameter that stops requiring grad before backward() receives no gradient.
                self._activate(self._roles["writer"])
            return
        self._activate(self._roles[name])
        yield

    @torch.no_grad()
    def sync_frozen(self) -> None:
        """phi_p' <- phi_p."""
        if self.full:
            self.frozen_upper.load_state_dict(self._live_upper.state_dict())
            return
        frozen = {n.replace(f".{FROZEN}.", "."): p for n, p in self._named(FROZEN)}
        for n, p in self._named(PROMPT):
            frozen[n.replace(f".{PROMPT}.", ".")].copy_(p)

    def add_actor_adapter(self, r: int, alpha: float, target_modules: Sequence[str]) -> list[nn.Parameter]:
        """M's static warm-up LoRA (adapter `actor`), active only in the actor role; returns its parameters."""
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), task_type="CAUSAL_LM")
        if self.shares_weights:
            self.g.add_adapter(ACTOR, config)
            self._activate(self._roles["writer"])
            params = self._adapter_params(ACTOR)
        else:
            self.m = get_peft_model(self.m, config, adapter_name=ACTOR)
            params = [p for n, p in self.m.named_parameters() if "lora_" in n]
        self.actor_adapter = {"r": r, "alpha": alpha, "target_modules": list(target_modules)}
        self.set_actor_trainable(False)
        return params

    def load_actor_adapter(self, path: str | Path) -> None:
        """Use a trained PEFT LoRA (e.g. from the SFT baseline) as M's static warm-up adapter."""
        path = Path(path)
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        config = json.loads(config_file.read_text())
        self.add_actor_adapter(config["r"], config["lora_alpha"], config["target_modules"])
        state = load_file(str(path / "adapter_model.safetensors"))
        model = self.g if self.shares_weights else self.m
        result = set_peft_model_state_dict(model, state, adapter_name=ACTOR)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{path}: weights do not fit this actor: {result.unexpected_keys[:3]}")
        self._activate(self._roles["writer"])
        self.set_actor_trainable(False)

    def set_actor_trainable(self, trainable: bool) -> None:
        """M's warm-up adapter trains during the actor warm-up and stays frozen otherwise."""
        self.actor_trainable = trainable
        for p in self.actor_parameters():
            p.requires_grad_(trainable)

    def actor_parameters(self) -> list[nn.Parameter]:
        if self.actor_adapter is None:
            return []
        if self.shares_weights:
            return self._adapter_params(ACTOR)
        return [p for n, p in self.m.named_parameters() if "lora_" in n]

    # ----- the generator -------------------------------------------------------------------------------------
    def rewrite_requests(self, instructions: Sequence[str], questions: Sequence[str]) -> list[str]:
        """G's chat-formatted input: rewrite instruction p0 for question x."""
        template = self.settings.rewrite_template
        return [
            chat_prompt(self.g_tok, [{"role": "user", "content": template.format(instruction=p, question=q)}])
            for p, q in zip(instructions, questions)
        ]

    def _prefill(self, requests: Sequence[str]) -> tuple[torch.Tensor, DecodeBatch]:
        """The requests through G (its active role): h, and what the prompt decoding starts from (the KV cache and
        the last logits; the layers' hidden states are let go at once).

        With gradients on, only h needs a graph: layers k..K-1 run on a detached input (the same values), so the
        prefill holds no graph above layer k and writes its cache as it decodes without one. Without gradients the
        cache is a preallocated buffer with room for the prompt (`generation.decode_cache`)."""
        batch = left_padded_batch(self.g_tok, requests, self.g.device)
        grad = torch.is_grad_enabled()
        cache = None if grad else decode_cache(self.g, self.settings.max_prompt_tokens)
        with self._graph_below_k(), frozen_weight_casts(self.g):
            out = self.g(**batch, use_cache=True, output_hidden_states=True, **last_logits_only(self.g),
                         **({cache_argument(self.g): cache} if cache is not None else {}))
        h = self.pool_h(out.hidden_states[self.k], batch)
        return h, DecodeBatch(output_cache(out), out.logits[:, -1].detach(), batch["attention_mask"],
                              batch["position_ids"][:, -1:])

    @contextlib.contextmanager
    def _graph_below_k(self) -> Iterator[None]:
        """With gradients on, G's layers from k up get their input detached: h keeps its graph, nothing above it
        records one (the prompt is decoded without gradients)."""
        layers = base_model(self.g).get_decoder().layers
        if not torch.is_grad_enabled() or self.k >= len(layers):
            yield
            return
        handle = layers[self.k].register_forward_pre_hook(_detach_hidden_states, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def pool_h(self, states: torch.Tensor, batch) -> torch.Tensor:
        """h from layer k's states of a left-padded batch: the last request token's, or the mean (`pool`)."""
        return states[:, -1] if self.settings.pool == "last" else _masked_mean(states, batch["attention_mask"])

    def encode(self, requests: Sequence[str]) -> torch.Tensor:
        """h alone: the request through layers 0..k-1 only (no cache, no upper layers, no LM head).

        For callers that need no prompt text (the parameters-only and no-sharing variants, the per-query LoRA of
        an already written prompt): with k = K/4 this is a quarter of the prefill that `write_prompts` runs.
        The active role's adapters apply; gradients follow torch's grad mode.
        """
        batch = left_padded_batch(self.g_tok, requests, self.g.device)
        base = base_model(self.g)
        captured: list[torch.Tensor] = []

        def stop_after_layer_k(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward  # the layers above k would be computed for nothing

        handle = base.get_decoder().layers[self.k - 1].register_forward_hook(stop_after_layer_k)
        try:
            with frozen_weight_casts(self.g):
                self.g(**batch, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {self.k - 1} of the generator did not run; cannot read the meta encoder's state")
        return self.pool_h(captured[0], batch)

    def _decode(self, prefilled: DecodeBatch, temperature: float, repeats: int = 1) -> list[str]:
        if repeats > 1:
            prefilled.repeat(repeats)  # n candidates share the request's prefill instead of recomputing it
        rows = decode_loop(
            self.g, prefilled.cache, prefilled.logits, prefilled.mask, prefilled.pos,
            max_new_tokens=self.settings.max_prompt_tokens, eos_ids=eos_ids(self.g_tok), temperature=temperature,
            banned_tokens=self._banned_prompt_tokens,
        )
        return [self.g_tok.decode(r, skip_special_tokens=True).strip() for r in rows]

    def write_prompts(self, requests: Sequence[str], with_grad: bool = True) -> WrittenPrompts:
        """Encode once with {phi_s, phi_p'}: h (pooled at layer k) for the hypernetwork, and greedy prompts."""
        if not self.settings.share or not self.settings.use_prompt:
            # Without sharing, h needs its own forward through the private encoder; without the prompt branch the
            # upper layers have nothing to do. Either way h needs layers 0..k-1 only.
            with self.role("encoder" if not self.settings.share else "writer"), torch.set_grad_enabled(with_grad):
                h = self.encode(requests)
            if not self.settings.use_prompt:
                return WrittenPrompts(None, h)
            with self.role("writer"), torch.no_grad():
                _, prefilled = self._prefill(requests)
        else:
            with self.role("writer"), torch.set_grad_enabled(with_grad):
                h, prefilled = self._prefill(requests)
        with self.role("writer"):
            prompts = self._decode(prefilled, temperature=0.0)
        return WrittenPrompts(prompts, h)

    def factors(self, h: torch.Tensor) -> LoraFactors | None:
        """The per-query LoRA for M, or None when the parameter branch is off (use_hyper=False)."""
        return self.hyper(h) if self.settings.use_hyper else None

    @torch.no_grad()
    def sample_prompts(self, requests: Sequence[str], n: int, temperature: float) -> list[list[str]]:
        """n sampled prompts per request from the current {phi_s, phi_p} (rollouts)."""
        with self.role("learner"):
            _, prefilled = self._prefill(requests)
            flat = self._decode(prefilled, temperature=temperature, repeats=n)
        return [flat[i * n : (i + 1) * n] for i in range(len(requests))]

    def sr_loss(self, requests: Sequence[str], best_prompts: Sequence[str]) -> torch.Tensor:
        """Supervised regularisation: NLL of the best prompts so far under {phi_s, phi_p}, teacher forced.

        With `checkpoint_sr` (the default) G's layers recompute in the backward, so run it in the learner role, as
        training does (the role this leaves active)."""
        with self.role("learner"):
            batch = lm_batch(self.g_tok, requests, best_prompts, self.settings.max_request_tokens, device=self.g.device)
            with self._checkpointed() if self.checkpoint_sr else contextlib.nullcontext():
                return lm_loss(self.g, batch)

    @contextlib.contextmanager
    def _checkpointed(self) -> Iterator[None]:
        """G's decoder layers checkpointed (non-reentrant) for the forwards inside: each keeps only its input and
        recomputes its activations in the backward, in the autocast state of the forward. The same values and
        gradients, a fraction of the graph's memory. Only the layers' own `training` flag is set, which is what
        transformers checks; dropout and attention stay in eval mode. Nothing to do without gradients or when
        `train.gradient_checkpointing` already checkpoints every layer."""
        layers = [layer for layer in base_model(self.g).get_decoder().layers
                  if isinstance(layer, GradientCheckpointingLayer) and not layer.gradient_checkpointing]
        if not torch.is_grad_enabled():
            layers = []
        saved = [(layer.training, layer.__dict__.get("_gradient_checkpointing_func")) for layer in layers]
        for layer in layers:
            layer.gradient_checkpointing, layer.training = True, True
            layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                   use_reentrant=False)
        try:
            yield
        finally:
            for layer, (training, func) in zip(layers, saved):
                layer.training = training
                del layer.gradient_checkpointing  # back to the class's False
                if func is None:
                    layer.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    layer._gradient_checkpointing_func = func

    # ----- the actor -----------------------------------------------------------------------------------------
    def _factor_context(self, factors: LoraFactors | None):
        if factors is None:
            return None
        return self._row_context(factors.index_select)

    def _row_context(self, make):
        """A batch context applying `make(rows)`'s factors, remade only when the rows change: decoding asks for
        the same live rows at every token, and re-gathering (or re-generating) every target's factors per token
        costs about as much as the decode step itself."""
        last: dict = {}

        def context(rows):
            key = tuple(rows)
            if last.get("rows") != key:
                last["rows"], last["factors"] = key, make(list(rows))
            return self.lora.apply(last["factors"])

        return context

    def task_loss(self, chats: Sequence[str], targets: Sequence[str], factors: LoraFactors, max_length: int = 512):
        """Token-level NLL of y under M with the per-query LoRA, given (p, x) already chat-formatted."""
        batch = lm_batch(self.m_tok, chats, targets, max_length, device=self.m.device)
        with self.role("actor"), (self.lora.apply(factors) if factors is not None else contextlib.nullcontext()):
            return lm_loss(self.m, batch)

    @torch.no_grad()
    def score(self, chats: Sequence[str], targets: Sequence[str], factors: LoraFactors, batch_size: int = 16):
        """(sum log-prob, tokens) of each target under M with row i's LoRA."""
        with self.role("actor"):
            return score_targets(self.m, self.m_tok, chats, targets, batch_size=batch_size,
                                 batch_context=self._factor_context(factors))

    @torch.no_grad()
    def answer(self, chats: Sequence[str], factors: LoraFactors, *, max_new_tokens: int, stop_strings=(),
               batch_size: int = 16, progress: bool = False):
        with self.role("actor"):
            return generate(self.m, self.m_tok, chats, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                            batch_size=batch_size, batch_context=self._factor_context(factors), progress=progress)

    @torch.no_grad()
    def score_and_answer(self, chats: Sequence[str], targets: Sequence[str], factors: LoraFactors, *,
                         max_new_tokens: int, stop_strings=(), batch_size: int = 16):
        """`score` and greedy `answer` of the same chats from one prefill each (`generation.score_and_generate`)."""
        with self.role("actor"):
            return score_and_generate(self.m, self.m_tok, chats, targets, max_new_tokens=max_new_tokens,
                                      stop_strings=stop_strings, batch_size=batch_size,
                                      batch_context=self._factor_context(factors))

    # ----- inference -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str = "cpu", dtype: str | None = None) -> "MetaTuner":
        """Rebuild a trained MetaTuner from its run folder (config.yaml + model/); `dtype` overrides the run's."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "model" / "metatuner.json").is_file():
            raise FileNotFoundError(f"{run_dir} is not a MetaTuner run folder (needs config.yaml and model/)")
        cfg = load_config(run_dir / "config.yaml", [f"model.dtype={dtype}"] if dtype else None)
        mt = build_metatuner(cfg, device)
        mt.load(run_dir / "model")
        mt.task = get_task(cfg.data.task, **cfg.data.task_kwargs())
        mt.p0 = cfg.data.prompt or mt.task.default_prompt
        mt.eval()
        return mt

    @torch.no_grad()
    def write_all(self, questions: Sequence[str], batch_size: int = 16, progress: bool = False):
        """Prompts and pooled states h for many questions (h is small; LoRA factors are made per batch later)."""
        prompts, hs = [], []
        for i in tqdm(range(0, len(questions), batch_size), desc="write prompts", disable=not progress, unit="batch"):
            chunk = list(questions[i : i + batch_size])
            written = self.write_prompts(self.rewrite_requests([self.p0] * len(chunk), chunk), with_grad=False)
            prompts += written.prompts or [self.p0] * len(chunk)
            hs.append(written.h.float())
        return prompts, torch.cat(hs)

    def lora_context(self, h: torch.Tensor):
        """A batch context for generation/scoring: rows get the LoRA the hypernetwork makes from their h."""
        if not self.settings.use_hyper:
            return None
        return self._row_context(lambda rows: self.hyper(h[rows]))

    def answer_chats(self, prompts: Sequence[str], questions: Sequence[str]) -> list[str]:
        """M's chat-formatted input for each question with its written prompt, as the task lays them out."""
        task = self._require_task()
        examples = [Example(id=str(i), question=q, answer="", target="") for i, q in enumerate(questions)]
        return task_chats(self.m_tok, task, prompts, examples)

    @torch.no_grad()
    def generate(self, questions: Sequence[str], *, return_lora: bool = False, max_new_tokens: int | None = None,
                 batch_size: int = 16) -> list[dict]:
        """For each question: the written prompt, M's answer, and (on request) the per-query LoRA factors."""

        task = self._require_task()
        prompts, h = self.write_all(questions, batch_size)
        chats = self.answer_chats(prompts, questions)
        with self.role("actor"):
            answers = generate(self.m, self.m_tok, chats, max_new_tokens=max_new_tokens or task.max_new_tokens,
                               stop_strings=task.stop_strings, batch_size=batch_size,
                               batch_context=self.lora_context(h))
        results = []
        for i, (q, prompt, text) in enumerate(zip(questions, prompts, answers.texts)):
            item = {"question": q, "prompt": prompt, "answer": text}
            if return_lora and self.settings.use_hyper:
                item["lora"] = self.hyper(h[i : i + 1])
            results.append(item)
        return results

    def evaluate(self, examples, *, batch_size: int = 16, max_new_tokens: int | None = None,
                 mc_mode: str = "likelihood", progress: bool = True):
        """The task's metrics with MetaTuner's per-query prompts and LoRA (see `evaluate.evaluate`)."""
        task = self._require_task()
        start = time.perf_counter()
        prompts, h = self.write_all([ex.question for ex in examples], batch_size, progress)
        write_seconds = time.perf_counter() - start
        with self.role("actor"):
            result = evaluate(self.m, self.m_tok, task, examples, prompts, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, mc_mode=mc_mode,
                              batch_context=self.lora_context(h), progress=progress)
        result.metrics["prompt_seconds"] = round(write_seconds, 2)
        result.metrics["seconds"] = round(result.metrics["seconds"] + write_seconds, 2)
        result.metrics["diagnostics"] = {
            **prompt_diagnostics(prompts, self.p0),
            "lora_diversity": lora_diversity(self, [ex.question for ex in examples], h),
            "answers_in_prompts": answers_in_prompts(result.samples)}
        return result

    def export_adapter(self, question: str, out_dir: str | Path, base_model: str) -> Path:
        """One query's LoRA as a standard PEFT adapter for M (`base_model`: M's hub id or directory).

        When M carries a static warm-up adapter, both are folded into one adapter of rank r + r_static: the
        per-query and static factors are stacked (zeros where a module has only one of them) and the scaling is
        moved into B, so `PeftModel.from_pretrained(M, out_dir)` computes exactly what the actor computes.
        """
        if not self.settings.use_hyper:
            raise ValueError("this run has no parameter decoder (use_hyper=false): there is no per-query LoRA to export")
        prompts, h = self.write_all([question])
        factors = self.hyper(h)
        if self.actor_adapter is None:
            path = export_peft_adapter(factors, base_model, out_dir, self.hyper_config)
            return self._write_card(path, base_model, question, prompts[0], self.hyper_config)
        static = self._static_factors()
        r_q, r_s = self.hyper_config.r, self.actor_adapter["r"]
        keys = sorted(set(factors.keys()) | set(static))
        merged = {}
        for key in keys:
            d_out, d_in = (static[key][1].shape[0], static[key][0].shape[1]) if key in static else (
                factors[key][1].shape[1], factors[key][0].shape[2])
            a = torch.zeros(1, r_q + r_s, d_in)
            b = torch.zeros(1, d_out, r_q + r_s)
            if key in factors.keys():
                a[0, :r_q], b[0, :, :r_q] = factors[key][0][0], self.hyper_config.scale * factors[key][1][0]
            if key in static:
                a[0, r_q:], b[0, :, r_q:] = static[key][0], static[key][1]
            merged[key] = (a, b)
        types = sorted({t for _, t in keys}, key=lambda t: (t not in self.hyper_config.target_modules, t))
        config = HyperLoraConfig(target_modules=types, r=r_q + r_s, scale=1.0)
        path = export_peft_adapter(LoraFactors(merged), base_model, out_dir, config)
        return self._write_card(path, base_model, question, prompts[0], config, static_rank=r_s)

    def _write_card(self, path: Path, base_model: str, question: str, prompt: str, config: HyperLoraConfig,
                    static_rank: int | None = None) -> Path:
        """README.md (and metatuner_prompt.txt) beside the exported weights: how to build the query's input."""
        task = self._require_task()
        messages = task.messages(prompt, Example(id="export", question=question, answer="", target=""))
        write_adapter_card(path, base_model=str(base_model), question=question, prompt=prompt, messages=messages,
                           rank=config.r, target_modules=list(config.target_modules),
                           max_new_tokens=task.max_new_tokens, static_rank=static_rank)
        return path

    def _static_factors(self) -> dict:
        """M's warm-up adapter as {(layer, module type): (A, scaling * B)}."""
        model = self.g if self.shares_weights else self.m
        scaling = self.actor_adapter["alpha"] / self.actor_adapter["r"]
        found = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and ACTOR in getattr(module, "lora_A", {}):
                layer = next(int(p) for p in name.split(".") if p.isdigit())
                kind = name.rsplit(".", 1)[-1]
                found[(layer, kind)] = (module.lora_A[ACTOR].weight.detach().float(),
                                        scaling * module.lora_B[ACTOR].weight.detach().float())
        return found

    def static_update_norm(self) -> float | None:
        """Frobenius norm of M's static warm-up update (scaling * B A over all its targets); None without one."""
        if self.actor_adapter is None:
            return None
        total = 0.0
        for a, b in self._static_factors().values():  # a: (r, d_in), b: (d_out, r) with the scaling in b
            total += float(((b.T @ b) * (a @ a.T)).sum())
        return max(total, 0.0) ** 0.5

    def _require_task(self):
        task = getattr(self, "task", None)
        if task is None:
            raise RuntimeError("this needs a task: load with MetaTuner.from_pretrained(run_dir) or set .task/.p0")
        return task

    # ----- saving ----------------------------------------------------------------------------------------------
    def _g_tensors(self) -> dict[str, torch.Tensor]:
        """G's trained tensors by stable names: LoRA weights, or (full fine-tuning) every weight plus phi_p'."""
        if not self.full:
            return {f"g.{n}": p for n, p in self.g.named_parameters() if "lora_" in n}
        self._use_upper(self._live_upper)  # names must not depend on which copy is swapped in
        tensors = {f"g.{n}": p for n, p in self.g.named_parameters()}
        tensors.update({f"g_frozen.{n}": p for n, p in self.frozen_upper.named_parameters()})
        return tensors

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {k: p.detach().cpu().contiguous() for k, p in self._g_tensors().items()}
        if not self.shares_weights:
            state.update({f"m.{n}": p.detach().cpu().contiguous() for n, p in self.m.named_parameters() if "lora_" in n})
        state.update({f"hyper.{n}": t.detach().cpu().contiguous() for n, t in self.hyper.state_dict().items()})
        return state

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a full disk while saving leaves an earlier model in this folder whole.
        atomic_save_file(self.trainable_state(), directory / "metatuner.safetensors")
        atomic_write_text(directory / "metatuner.json", json.dumps(self.meta(), indent=2) + "\n")

    def load(self, directory: str | Path) -> None:
        directory = Path(directory)
        weights = directory / "metatuner.safetensors"
        try:
            state = load_file(str(weights))
        except Exception as err:
            raise ValueError(f"cannot read checkpoint weights {weights}: {err}") from err
        meta_file = directory / "metatuner.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read {meta_file}: {err}") from err
        self.load_state(state, meta, source=str(weights))

    def meta(self) -> dict:
        """What, besides the tensors, it takes to rebuild this model's trainable parts."""
        return {"k": self.k, "actor_adapter": self.actor_adapter, "hyper": asdict(self.hyper_config)}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor], meta: dict, source: str = "checkpoint") -> None:
        """Copy `trainable_state()`-style tensors in, adding M's warm-up adapter first when `meta` has one."""
        if meta["actor_adapter"] and self.actor_adapter is None:
            self.add_actor_adapter(**meta["actor_adapter"])
        own = self.trainable_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source} does not match this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if state[k].shape != own[k].shape]
        if reshaped:  # e.g. saved with another rank: fail before copying anything in
            raise ValueError(f"{source} does not match this model's shapes (saved vs this model): {reshaped[:3]}")
        params = self._g_tensors()
        if not self.shares_weights:
            params.update({f"m.{n}": p for n, p in self.m.named_parameters() if "lora_" in n})
        for key, tensor in state.items():
            if not key.startswith("hyper."):
                params[key].copy_(tensor)
        self.hyper.load_state_dict({k[len("hyper."):]: v for k, v in state.items() if k.startswith("hyper.")})


def build_metatuner(cfg: RunConfig, device: str = "cpu") -> MetaTuner:
    """An untrained MetaTuner for a run config: G (and M when `model.actor` names one) loaded, adapters attached."""
    g, m, g_tok, m_tok = load_generator_and_actor(
        cfg.model.name, cfg.model.actor, cfg.model.dtype, device, cfg.model.trust_remote_code
    )
    return MetaTuner(g, g_tok, cfg.metatuner, actor=None if m is g else m, m_tokenizer=m_tok)


def _detach_hidden_states(module, args, kwargs):
    if args:
        return (args[0].detach(), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}


class _StopForward(Exception):
    """Raised by a forward hook to end a forward early, once the layer whose output is wanted has run."""


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)

