"""Run configuration: dataclasses with help text, loaded from YAML with `key=value` overrides.

    cfg = load_config("configs/sft-gsm8k.yaml", ["train.lr=1e-4", "data.train_limit=500"])

OmegaConf does the merging and type checking: unknown keys, wrong types and values outside a `Literal` field's
choices are rejected with the key's path. Each section's `__post_init__` checks what types cannot express (ranges,
templates) and `RunConfig.__post_init__` the keys that contradict each other across sections; OmegaConf runs them
when it builds the dataclasses, so every ConfigError names its key. Everything here runs before any model is
loaded, so a bad config fails in a second, not after minutes of loading.

Renamed keys: `data.task_options.on_bad_row` (which earlier versions wrote into every run's config.yaml) is read
as `data.on_bad_row`, the one run-wide setting; the two may not contradict each other.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .tasks import check_task_options  # light: the task modules import their heavy libraries lazily

EMBEDDED_DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


Method = Literal["sft", "metatuner", "opro", "better_together", "dpo", "grpo", "bpo", "rlprompt"]
METHODS = Method.__args__


class ConfigError(ValueError):
    """A configuration problem, named by its key path (e.g. `train.lr`)."""


class _Checked:
    """A config section whose `__post_init__` checks its values; `SECTION` prefixes the key in messages."""

    SECTION: ClassVar[str] = ""

    def _require(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"`{self.SECTION + '.' if self.SECTION else ''}{key}` {message}")

    def _require_positive(self, *keys: str) -> None:
        for key in keys:
            self._require(getattr(self, key) > 0, key, "must be positive")


def _help(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig(_Checked):
    name: str = _help(
        "Hugging Face hub id, local directory, or `embedded:smollm2-135m-instruct` (offline, shipped as GGUF).",
        EMBEDDED_DEFAULT_MODEL,
    )
    actor: Optional[str] = _help(
        "The answering model M when it differs from the generator G (`name`). None: G and M are the same "
        "checkpoint and share their base weights.",
        None,
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _help("Weights dtype: float32, bfloat16, float16 or auto (the checkpoint's own).", "float32")
    device: str = _help("cpu, cuda, cuda:N, mps or auto (the best available).", "auto")
    trust_remote_code: bool = _help("Allow model repositories to run their own Python code. Off unless you ask.", False)

    SECTION: ClassVar[str] = "model"


@dataclass
class DataConfig(_Checked):
    task: str = _help("Task name (see `metatuner tasks`): gsm8k, cosmosqa, math, hotpotqa, rg:<name>, custom.", "gsm8k")
    train_path: Optional[str] = _help("Local JSONL/CSV for the training split; None loads it from the hub.", None)
    eval_path: Optional[str] = _help("Local JSONL/CSV for the evaluation split; None loads it from the hub.", None)
    train_split: str = _help("Name of the training split.", "train")
    eval_split: str = _help("Name of the evaluation split.", "test")
    train_limit: Optional[int] = _help("Use at most this many training examples (the training budget).", None)
    eval_limit: Optional[int] = _help("Evaluate at most this many items; None evaluates the whole split.", None)
    prompt: Optional[str] = _help("The initial instruction p0; None uses the task's default.", None)
    task_options: dict[str, Any] = _help("Extra keyword options for the task (e.g. {size: 2000} for rg tasks).", factory=dict)
    on_bad_row: Literal["error", "skip"] = _help("What to do with a malformed data row: error (stop, naming file and line) or skip.", "error")

    SECTION: ClassVar[str] = "data"

    def __post_init__(self):
        self._require(self.train_limit is None or self.train_limit >= 1, "train_limit", "must be at least 1 or null")
        self._require(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", "must be at least 1 or null")
        legacy = self.task_options.pop("on_bad_row", None)  # the old spelling, see the module docstring
        if legacy is not None:
            if legacy not in ("error", "skip"):
                raise ConfigError("`data.task_options.on_bad_row` (read as `data.on_bad_row`) must be error or skip")
            if legacy != self.on_bad_row and self.on_bad_row == "skip":
                raise ConfigError("`data.on_bad_row`=skip contradicts `data.task_options.on_bad_row`")
            self.on_bad_row = legacy
        try:
            check_task_options(self.task, self.task_options)
        except ValueError as err:
            raise ConfigError(f"`data.task_options`: {err}") from None

    def task_kwargs(self) -> dict[str, Any]:
        """The options to build the task with: `task_options`, and on_bad_row when rows are skipped."""
        return {**self.task_options, **({"on_bad_row": "skip"} if self.on_bad_row == "skip" else {})}


@dataclass
class LoraSettings(_Checked):
    r: int = _help("LoRA rank.", 16)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / r.", 32.0)
    dropout: float = _help("Dropout on the LoRA input.", 0.0)
    target_modules: list[str] = _help(
        "Names of the linear layers that receive LoRA.",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )

    SECTION: ClassVar[str] = "lora"

    def __post_init__(self):
        self._require(self.r >= 1, "r", "must be at least 1")
        self._require(self.alpha > 0, "alpha", "must be positive")
        self._require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        self._require(len(self.target_modules) > 0, "target_modules", "must name at least one module")


@dataclass
class TrainConfig(_Checked):
    lr: float = _help("Peak learning rate (AdamW).", 2e-4)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    epochs: int = _help("Passes over the (limited) training set.", 1)
    max_steps: Optional[int] = _help("Stop after this many optimiser steps; None runs the full epochs.", None)
    batch_size: int = _help(
        "Examples per micro-batch, over all processes: under `accelerate launch` each of N processes takes 1/N of "
        "them, so the result does not depend on N.", 8)
    grad_accum: int = _help(
        "Micro-batches per optimiser step, each weighing the same: an optimiser step sees batch_size * grad_accum "
        "examples while memory holds one micro-batch (SFT, DPO and MetaTuner's joint training; the warm-ups step "
        "once per micro-batch).", 1)
    max_length: int = _help("Truncate prompt + target to this many tokens.", 512)
    warmup_ratio: float = _help("Share of steps with linear learning-rate warm-up.", 0.05)
    grad_clip: float = _help("Clip the gradient norm to this value (0 disables).", 1.0)
    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "fp32, bf16 or fp16 autocast. auto: bf16 on CUDA GPUs that support it (else fp16) and on CPUs with native "
        "bf16 (AVX512-BF16 or AMX); fp32 on other CPUs, where bf16 is emulated and many times slower.", "auto")
    log_every: int = _help("Log scalars every N optimiser steps.", 10)
    save_every: int = _help("Write a resumable checkpoint every N steps (0: only the final model).", 0)
    keep_checkpoints: int = _help("How many of the newest checkpoints to keep.", 2)
    max_bad_steps: int = _help("Non-finite losses in a row (each update skipped) before the run stops.", 5)
    resume: Optional[str] = _help("Resume from `auto` (the newest checkpoint in output_dir) or a checkpoint path.", None)
    gradient_checkpointing: bool = _help(
        "Recompute activations in backward instead of storing them: far less memory for long sequences, about a "
        "third more compute.", False)
    check_memory: bool = _help(
        "On GPU, estimate the memory the run needs before loading and stop with advice when it exceeds the free "
        "memory (false: skip the check).", True)

    SECTION: ClassVar[str] = "train"

    def __post_init__(self):
        self._require(self.lr > 0, "lr", "must be positive")
        self._require(self.epochs >= 1, "epochs", "must be at least 1")
        self._require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be at least 1 or null")
        self._require(self.batch_size >= 1, "batch_size", "must be at least 1")
        self._require(self.grad_accum >= 1, "grad_accum", "must be at least 1")
        self._require(self.max_length >= 8, "max_length", "must be at least 8")
        self._require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        self._require(self.save_every >= 0, "save_every", "must be 0 (end only) or positive")
        self._require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        self._require(self.max_bad_steps >= 1, "max_bad_steps", "must be at least 1")


@dataclass
class EvalConfig(_Checked):
    batch_size: int = _help("Prompts per generation batch (batches are formed by length).", 16)
    max_new_tokens: Optional[int] = _help("Generation limit; None uses the task's default.", None)
    mc_mode: Literal["likelihood", "generate"] = _help("Multiple choice: likelihood (rank options) or generate (parse the generated letter).", "likelihood")

    SECTION: ClassVar[str] = "eval"

    def __post_init__(self):
        self._require(self.batch_size >= 1, "batch_size", "must be at least 1")
        self._require(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")


DEFAULT_REWRITE_TEMPLATE = (
    "Rewrite the instruction below so that it best helps to answer this particular question. "
    "Reply with the rewritten instruction only.\n\nInstruction: {instruction}\n\nQuestion: {question}"
)


@dataclass
class MetaTunerSettings(_Checked):
    # the generator G
    share_depth: float = _help(
        "k, the layers of G shared by the prompt and parameter branches: a count (>= 1) or a fraction of G's depth "
        "(0.25 = K/4 as the paper uses for a 7B generator, 0.75 for a 3B one).", 0.25)
    pool: Literal["last", "mean"] = _help("How h is pooled from layer k: last (the last request token) or mean.", "last")
    g_finetune: Literal["lora", "full"] = _help(
        "How G is trained: lora (adapters for phi_s and phi_p; the default, and the only choice when G and M share "
        "weights) or full (every weight of G; needs a separate actor, model.actor).", "lora")
    g_lora_r: int = _help("Rank of G's LoRA adapters (phi_s and phi_p).", 16)
    g_lora_alpha: float = _help("Alpha of G's LoRA adapters.", 32.0)
    g_target_modules: list[str] = _help("G's linear layers that carry phi_s / phi_p.",
                                        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rewrite_template: str = _help("G's request, with {instruction} (p0) and {question} (x).", DEFAULT_REWRITE_TEMPLATE)
    max_prompt_tokens: int = _help("Longest prompt G may write.", 48)
    max_request_tokens: int = _help("Truncation length of G's request plus prompt in the SR loss.", 512)
    # the parameter decoder F and the per-query LoRA of M
    target_modules: list[str] = _help("M's linear layers that receive the per-query LoRA.",
                                      factory=lambda: ["q_proj", "v_proj"])
    rank: int = _help("Rank r of the per-query LoRA.", 8)
    scale: float = _help("lambda: the per-query update is lambda * B (A x).", 1.0)
    hyper_hidden: int = _help("Hidden width of the hypernetwork's down/up MLP.", 256)
    hyper_query_norm: Literal["layer", "standard"] = _help(
        "How h is normalised for the hypernetwork: layer (LayerNorm of each h) or standard (minus the running mean "
        "of h over training queries, over its running standard deviation, so that only what differs between "
        "queries reaches the hypernetwork).", "layer")
    hyper_query_dim: int = _help(
        "Width of the projection of h that conditions the hypernetwork (the query's bottleneck; the layer and "
        "module embeddings are 32 wide each).", 128)
    # ablations
    use_hyper: bool = _help("False: the prompt-only ablation (MetaTuner without the parameter decoder F).", True)
    use_prompt: bool = _help("False: the parameters-only ablation (M always gets p0; G only encodes).", True)
    share: bool = _help(
        "False: the no-sharing ablation (k = 0): the parameter decoder reads a private encoder (G's first k layers "
        "with an adapter of its own) and the prompt decoder is all of G.", True)
    prompt_objective: Literal["sr", "gumbel"] = _help(
        "sr: the supervised-regularisation loss on D2 (the method); gumbel: the ablation that trains the prompt "
        "branch through the task loss with straight-through Gumbel-softmax (no rollouts, no D2).", "sr")
    gumbel_tau: float = _help("Gumbel-softmax temperature (prompt_objective=gumbel).", 1.0)
    # training
    schedule: Literal["J", "I"] = _help("J: L_task + alpha * L_SR every step; I: the two losses on alternating blocks.", "J")
    interleave_block: int = _help("Schedule I: steps per block of each loss.", 1)
    sr_weight: float = _help("alpha, the weight of the supervised-regularisation loss.", 1.0)
    sync_every: int = _help("Copy phi_p into the frozen phi_p' every N steps.", 10)
    n_rollouts: int = _help("Sampled candidate prompts per query (the stored best is added, and p0 with "
                            "d2_source=samples_and_p0).", 4)
    rollout_temperature: float = _help("Sampling temperature T of candidate prompts.", 0.8)
    rollout_every: int = _help("Run rollouts (and refresh D2) every N steps that train the SR loss.", 1)
    reward: Literal["likelihood", "exact_match"] = _help(
        "exact_match (the task's own checker on M's generated answer, ties broken by likelihood) or likelihood "
        "(minus the gold answer's mean NLL under M: no generation, so much cheaper on tasks with long answers, but "
        "it rewards the wording M was trained on rather than a right answer; docs/results/README.md, Defaults).",
        "exact_match")
    d2_source: Literal["samples", "samples_and_p0"] = _help(
        "What D2 may hold. samples: only prompts G sampled itself (p0 is scored as a reference but is neither a "
        "candidate nor the default SR target; the SR loss skips queries with no sample yet), as in the paper. "
        "samples_and_p0: p0 is a candidate in every rollout and the SR target of queries without an entry, which "
        "teaches G to copy p0 (with it, G wrote p0 for every test query in every measured run).", "samples")
    reject_answer_leaks: bool = _help(
        "Rollouts set aside every sampled prompt that states the gold answer (`Task.states_answer`: the task's "
        "checker scores it as a right answer, or it names the gold number where the question does not): M copies a "
        "stated answer, so such prompts win by leaking the label and teach G to write guesses it cannot make at "
        "test time.", False)
    prompt_without_digits: bool = _help(
        "G may not write a digit (tokens holding one are masked whenever G writes or samples a prompt): with "
        "numeric answers, G's winning samples were guessed answers that M repeats; without digits a prompt can "
        "only say how to solve the query.", False)
    lr_generator: float = _help("Learning rate of G's adapters.", 1e-4)
    lr_hyper: float = _help(
        "Learning rate of the hypernetwork. Adam moves every weight of its output heads by about this much per step, "
        "so the LoRA it writes changes by roughly lr * hidden size: keep it small.", 1e-4)
    warmup_actor_steps: int = _help("Warm-up: LoRA SFT steps of M on (p0, x) -> y, kept as a static adapter (0: none).", 0)
    warmup_actor_sampled_prompts: float = _help(
        "Warm-up of M (warmup_actor_steps): the share of rows whose instruction is a prompt G samples for that "
        "query instead of p0, so that M learns to answer under G's wordings and not p0's alone (0: p0 only).", 0.0)
    warmup_actor_adapter: Optional[str] = _help(
        "Warm-up: use this trained PEFT LoRA (e.g. the SFT baseline's RUN/adapter) as M's static adapter instead of "
        "training one.", None)
    warmup_generator: bool = _help("Warm-up: one rejection-sampling round for G (rollouts, then SFT on the best).", True)
    warmup_generator_steps: int = _help("Warm-up: SR-only steps on the rejection-sampled prompts.", 0)
    warmup_generator_queries: Optional[int] = _help(
        "Warm-up: run the rejection-sampling round on the first N training queries (None: all of them).", None)
    expert_prompts: Optional[str] = _help("Reuse a saved D2 (expert_prompts.json from an earlier run).", None)

    SECTION: ClassVar[str] = "metatuner"

    def __post_init__(self):
        at_least_one = ("rank", "hyper_hidden", "hyper_query_dim", "g_lora_r", "n_rollouts", "rollout_every",
                        "sync_every", "interleave_block", "max_prompt_tokens")
        for key in at_least_one:
            self._require(getattr(self, key) >= 1, key, "must be at least 1")
        self._require(self.share_depth > 0, "share_depth", "must be positive (a layer count or a fraction)")
        self._require(self.rollout_temperature > 0, "rollout_temperature", "must be positive")
        self._require(self.gumbel_tau > 0, "gumbel_tau", "must be positive")
        self._require(self.sr_weight >= 0, "sr_weight", "must be non-negative")
        self._require(0 <= self.warmup_actor_sampled_prompts <= 1, "warmup_actor_sampled_prompts", "must be in [0, 1]")
        self._require(self.warmup_generator_queries is None or self.warmup_generator_queries >= 1,
                      "warmup_generator_queries", "must be at least 1 or null")
        self._require("{instruction}" in self.rewrite_template and "{question}" in self.rewrite_template,
                      "rewrite_template", "must contain {instruction} and {question}")
        self._require(self.share or self.g_finetune == "lora", "share",
                      "=false (no sharing) is built from LoRA adapters: use metatuner.g_finetune=lora")
        self._require(self.use_hyper or self.use_prompt, "use_hyper",
                      "and metatuner.use_prompt cannot both be false (nothing would be trained)")
        # Both name M's warm-up: a trained adapter is loaded instead of training one, so the steps would be ignored.
        self._require(not (self.warmup_actor_adapter and self.warmup_actor_steps > 0), "warmup_actor_adapter",
                      "and metatuner.warmup_actor_steps > 0 contradict each other: M's warm-up is either loaded "
                      "from the adapter or trained for the steps; set metatuner.warmup_actor_steps=0 or "
                      "metatuner.warmup_actor_adapter=null")


@dataclass
class SearchSettings(_Checked):
    """Task-level instruction search: the OPRO-like baseline and both searches of BetterTogether."""

    rounds: int = _help("Search rounds; each builds one meta-prompt and samples `proposals_per_round` from it.", 5)
    proposals_per_round: int = _help("Instructions G proposes per round (each is scored on the dev set).", 4)
    dev_size: int = _help(
        "Items of the training split held out to score instructions (never the test split); the other training "
        "items supply the meta-prompt's examples.", 32)
    scorer: Literal["likelihood", "accuracy"] = _help(
        "likelihood (mean per-token log-likelihood of the gold targets; one forward pass, cheap and smooth) or "
        "accuracy (the task's primary metric through generation and its checker).", "likelihood")
    temperature: float = _help("Sampling temperature of the proposals.", 0.8)
    max_instruction_tokens: int = _help("Longest instruction G may propose, in tokens.", 48)
    meta_prompt_top: int = _help("How many of the best instructions so far the meta-prompt lists (with scores).", 20)
    examples_in_meta_prompt: int = _help("Task examples (question and gold answer) shown in the meta-prompt.", 3)

    SECTION: ClassVar[str] = "search"

    def __post_init__(self):
        for key in ("rounds", "proposals_per_round", "dev_size", "max_instruction_tokens", "meta_prompt_top"):
            self._require(getattr(self, key) >= 1, key, "must be at least 1")
        self._require(self.temperature > 0, "temperature", "must be positive")
        self._require(self.examples_in_meta_prompt >= 0, "examples_in_meta_prompt", "must be 0 or more")


@dataclass
class DPOSettings(_Checked):
    """The DPO baseline: LoRA preference tuning (TRL's DPOTrainer) on pairs the policy samples itself."""

    init_adapter: Optional[str] = _help(
        "A PEFT adapter (usually the SFT baseline's) to start from; it is also DPO's reference policy. None: a "
        "fresh LoRA on the base model, which is then the reference.", None)
    samples_per_question: int = _help(
        "Answers sampled per training question; the best- and worst-rewarded form its pair (free-text tasks).", 4)
    temperature: float = _help("Sampling temperature of those answers.", 1.0)
    gold_fallback: bool = _help(
        "When no sampled answer of a question beats another, pair the gold answer with the worst sample instead "
        "of dropping the question.", False)
    beta: float = _help("DPO's beta: how far the policy may move from the reference.", 0.1)
    lr: float = _help("Learning rate (AdamW) of the LoRA weights.", 5.0e-5)

    SECTION: ClassVar[str] = "dpo"

    def __post_init__(self):
        self._require(self.samples_per_question >= 2, "samples_per_question", "must be at least 2 (a pair needs two)")
        self._require(self.temperature > 0, "temperature", "must be positive")
        self._require(self.beta > 0, "beta", "must be positive")
        self._require(self.lr > 0, "lr", "must be positive")


# The rewards the RL baselines can train on: the task's checker on M's answer (exact_match) or the gold answer's
# likelihood under M, as MetaTuner's rollouts score candidates (`rollouts.candidate_scores`).
RewardKind = Literal["exact_match", "likelihood"]


@dataclass
class GRPOSettings(_Checked):
    """The PPO-family baseline: RL fine-tuning of M's LoRA (lora.*) with the task's checker as the reward, through
    TRL's GRPOTrainer (TRL 1.16 has no PPOTrainer; `baselines/grpo.py` says why GRPO stands in for PPO)."""

    init_adapter: Optional[str] = _help(
        "A PEFT adapter (the comparison passes its SFT run's) to start from; with beta > 0 it is also the KL "
        "reference. None: a fresh LoRA (lora.*) on the base model, which is then the reference.", None)
    num_generations: int = _help(
        "Answers sampled per training question: the group whose rewards are normalised into advantages.", 4)
    temperature: float = _help("Sampling temperature of those answers.", 1.0)
    beta: float = _help("Weight of the KL penalty to the reference policy (0: no penalty, no reference pass).", 0.04)
    epsilon: float = _help("PPO's clipping range of the probability ratio.", 0.2)
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = _help(
        "How token losses are averaged: grpo (per answer, then over answers), dapo (over all tokens of the batch; "
        "TRL's default, no length bias) or dr_grpo (by a constant, max_completion_length).", "dapo")
    scale_rewards: Literal["group", "batch", "none"] = _help(
        "Rewards are centred on their group's mean and divided by the standard deviation of the group, of the "
        "batch, or not at all (none).", "group")
    lr: float = _help("Learning rate (AdamW) of the LoRA weights.", 5.0e-5)

    SECTION: ClassVar[str] = "grpo"

    def __post_init__(self):
        self._require(self.num_generations >= 2, "num_generations", "must be at least 2 (a group needs two)")
        self._require(self.beta >= 0, "beta", "must be 0 or more")
        self._require_positive("temperature", "epsilon", "lr")


@dataclass
class BPOSettings(_Checked):
    """The BPO-like baseline: G (LoRA shaped by metatuner.g_*) learns to rewrite each query's prompt from the rollouts
    where its rewrite beat p0 under a frozen M; G's request and prompt length are metatuner.rewrite_template and
    metatuner.max_prompt_tokens."""

    actor_adapter: Optional[str] = _help(
        "M's PEFT adapter, frozen (the comparison passes its SFT run's for `bpo`; `bpo_zero_shot` has none). None: "
        "the base M.", None)
    samples_per_query: int = _help("Prompts G samples per training query, each scored through M against p0.", 4)
    temperature: float = _help("Sampling temperature of those prompts.", 0.8)
    reward: RewardKind = _help(
        "What judges a prompt: exact_match (the task's checker on M's answer; a sample must score strictly above "
        "p0 on it, the gold answer's likelihood only breaks ties between samples) or likelihood (minus the gold "
        "answer's mean NLL under M).", "exact_match")
    reject_answer_leaks: bool = _help(
        "Drop sampled prompts that state the gold answer (`Task.states_answer`).", True)
    epochs: int = _help("Passes of G's supervised training over the (query, better prompt) pairs.", 3)
    lr: float = _help("Learning rate (AdamW) of G's LoRA.", 1.0e-4)

    SECTION: ClassVar[str] = "bpo"

    def __post_init__(self):
        self._require(self.samples_per_query >= 1, "samples_per_query", "must be at least 1")
        self._require(self.epochs >= 1, "epochs", "must be at least 1")
        self._require_positive("temperature", "lr")


DEFAULT_RLPROMPT_REQUEST = (
    "Write a short instruction that helps to answer problems like the examples below. Reply with the instruction "
    "only.\n\nA first instruction: {instruction}\n\nExamples:\n{question}"
)


@dataclass
class RLPromptSettings(_Checked):
    """The RLPrompt-like baseline: G (LoRA shaped by metatuner.g_*) writes one short task-level prompt, trained with
    REINFORCE on M's reward over training batches (`train.batch_size` questions per step); M stays frozen."""

    samples_per_step: int = _help("Prompts sampled per step, all scored on the step's questions.", 4)
    temperature: float = _help("Sampling temperature of those prompts.", 1.0)
    max_prompt_tokens: int = _help("Longest prompt the policy may write, in tokens.", 16)
    reward: RewardKind = _help(
        "A prompt's reward on a question: exact_match (the task's checker on M's answer) or likelihood (minus the "
        "gold answer's mean NLL under M); averaged over the step's questions.", "exact_match")
    advantage: Literal["zscore", "mean"] = _help(
        "The step's rewards minus their mean (the baseline), divided by their standard deviation (zscore) or not "
        "(mean).", "zscore")
    lr: float = _help("Learning rate (AdamW) of the policy's LoRA.", 1.0e-4)
    request_template: str = _help(
        "The policy's request, with {instruction} (p0) and {question} (a few training questions).",
        DEFAULT_RLPROMPT_REQUEST)
    examples_in_request: int = _help("Training questions shown in the request (drawn once, outside the dev set).", 2)
    dev_size: int = _help(
        "Training items held out to choose the final prompt (never the test split); the policy trains on the rest.",
        32)
    finalists: int = _help(
        "Prompts with the best mean training reward that are scored on the dev set, beside p0 and the policy's "
        "final greedy prompt.", 4)

    SECTION: ClassVar[str] = "rlprompt"

    def __post_init__(self):
        self._require(self.samples_per_step >= 2, "samples_per_step", "must be at least 2 (the baseline is their mean)")
        for key in ("max_prompt_tokens", "dev_size", "finalists"):
            self._require(getattr(self, key) >= 1, key, "must be at least 1")
        self._require(self.examples_in_request >= 0, "examples_in_request", "must be 0 or more")
        self._require_positive("temperature", "lr")
        self._require("{instruction}" in self.request_template and "{question}" in self.request_template,
                      "request_template", "must contain {instruction} and {question}")


@dataclass
class RunConfig(_Checked):
    method: Method = _help(
        "Training method: metatuner, sft, opro, better_together, dpo, grpo, bpo or rlprompt.", "metatuner")
    seed: int = _help("Seed for data order, sampling and initialisation.", 0)
    output_dir: str = _help("Run folder: config, logs, checkpoints, adapter and evaluation.", "runs/${method}-${data.task}")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metatuner: MetaTunerSettings = field(default_factory=MetaTunerSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    bpo: BPOSettings = field(default_factory=BPOSettings)
    rlprompt: RLPromptSettings = field(default_factory=RLPromptSettings)

    def __post_init__(self):
        """Keys of different sections that contradict each other (each section checked its own values)."""
        self._require(self.metatuner.g_finetune == "lora" or self.model.actor not in (None, self.model.name),
                      "metatuner.g_finetune", "=full needs a separate actor (model.actor): with shared weights it "
                      "would change M")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then `key=value` overrides; validated; returned as a `RunConfig`.

    An unknown key or a wrong type is blamed on where it came from (the file or the command line), with the closest
    known key when there is one."""
    merged = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:  # OmegaConf reads YAML with a safe loader: tags such as !!python/object are errors, never code
            loaded = OmegaConf.load(path)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected keys and values at the top level, got a list")
        merged = _merge(merged, loaded, f"in {path}")
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as err:
            raise ConfigError(f"invalid command-line override: {omegaconf_message(err)}") from None
        except yaml.YAMLError as err:  # a value OmegaConf's YAML parser cannot read, e.g. `key=a: b: c`
            raise ConfigError(f"invalid command-line override (its value is not valid YAML; quote it): "
                              f"{str(err).splitlines()[0]}") from None
        merged = _merge(merged, dotlist, "on the command line")
    try:  # builds the dataclasses: resolves ${...} interpolations and runs each section's __post_init__ checks
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: key `{getattr(err, 'full_key', None)}`: {omegaconf_message(err)}") from None
    return cfg


def _merge(base: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = omegaconf_message(err)
        if isinstance(err, ConfigKeyError):  # an unknown key: OmegaConf's own guess is replaced by ours
            message = message.split(". Did you mean")[0] + _closest_key(key)
        raise ConfigError(f"invalid config {where}: key `{key}`: {message}") from None


def omegaconf_message(err: Exception) -> str:
    """OmegaConf's message without its internal `full_key:` / `object_type=` lines."""
    return str(getattr(err, "msg", None) or err).strip().splitlines()[0]


# Names users bring from other libraries (transformers' TrainingArguments, PEFT) -> ours.
_KEY_SYNONYMS = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
                 "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip", "lora_alpha": "alpha",
                 "lora_dropout": "dropout", "max_seq_length": "max_length", "model_name": "name"}


def _closest_key(key: str) -> str:
    """'; did you mean `train.lr`?' for a mistyped key, from the keys of the section it names."""
    *section, leaf = key.split(".")
    node: Any = RunConfig
    for part in section:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return ""
        node = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
    if not dataclasses.is_dataclass(node):
        return ""
    names = [f.name for f in dataclasses.fields(node)]
    candidates = names + [s for s, ours in _KEY_SYNONYMS.items() if ours in names]
    close = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean `{'.'.join([*section, _KEY_SYNONYMS.get(close[0], close[0])])}`?"


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
