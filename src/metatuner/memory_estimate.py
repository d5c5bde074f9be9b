"""How much GPU memory a run needs, estimated from the model configs before any weight is loaded.

    python -m metatuner.memory_estimate --config configs/qwen2.5-7b-3b-gsm8k.yaml [key=value ...]   # print the estimate

Training calls `check_memory` on GPU runs: it prints the estimate per process and stops with the knobs to turn when
the estimate exceeds the GPU's free memory (`train.check_memory=false` skips it). The models are built on the meta
device (accelerate's `init_empty_weights`), so parameter counts are exact and nothing is downloaded but config.json.

What is counted, per process:
- weights: every parameter of G and M (once when they share a checkpoint) at `model.dtype`;
- trainable state: LoRA adapters of G (phi_s on k layers, phi_p and its frozen twin on the others), the
  hypernetwork, M's warm-up LoRA, or all of G with full fine-tuning: fp32 value + gradient + two AdamW moments;
- activations kept for backward: the task loss through M (batch x max_length) and the SR loss through G
  (batch x max_request_tokens), about 34 bytes x hidden per token and layer in 16-bit (Korthikanti et al., 2022,
  with fused attention); with gradient checkpointing one hidden state per layer plus one layer's worth;
- the KV cache of rollouts: batch x (n_rollouts + 2) sequences of request + prompt tokens;
- a fixed 1 GiB for the CUDA context, allocator slack and the logits at target positions.
It is an estimate: real use moves with sequence lengths, allocator fragmentation and kernels. Treat a run within
10% of the limit as a risk.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from .config import load_config
from .hyperlora import HyperLoraConfig, HyperLoraGenerator, PerExampleLoRA
from .models import load_config_only, resolve_share_depth

GIB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
OVERHEAD = 1 * GIB
ACTIVATION_BYTES_PER_HIDDEN = 34  # per token, layer and hidden unit, 16-bit activations (Korthikanti et al.)


class MemoryEstimateError(RuntimeError):
    """The run will not fit on this GPU; the message lists the settings that shrink it."""


@dataclass
class MemoryEstimate:
    parts: dict[str, int] = field(default_factory=dict)  # bytes per part, per process

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def summary(self) -> str:
        rows = [f"  {name:<22} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        return "\n".join(["estimated GPU memory per process:", *rows, f"  {'total':<22} {self.total / GIB:8.2f} GiB"])


@dataclass
class _ModelShape:
    params: int
    layers: int
    hidden: int
    kv_width: int  # key/value heads x head size
    linear_sizes: dict[str, int]  # module type -> d_in + d_out of that linear, averaged over layers
    hyper_params: int = 0

    def lora_per_layer(self, targets, r: int) -> int:
        """Parameters of a rank-r LoRA on `targets` in one layer."""
        return r * sum(v for k, v in self.linear_sizes.items() if k in set(targets))


def _shape(name: str, trust_remote_code: bool, hyper_settings=None) -> _ModelShape:
    config = load_config_only(name, trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # on the meta device the tied LM head is otherwise counted twice
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_layer: dict[str, int] = {}
    for module_name, module in model.named_modules():
        kind = module_name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and kind != "lm_head":
            per_layer[kind] = per_layer.get(kind, 0) + module.in_features + module.out_features
    per_layer = {k: v // layers for k, v in per_layer.items()}
    shape = _ModelShape(sum(p.numel() for p in model.parameters()), layers, config.hidden_size,
                        kv_heads * head_dim, per_layer)
    if hyper_settings is not None:
        hyper_cfg = HyperLoraConfig(target_modules=list(hyper_settings.target_modules), r=hyper_settings.rank,
                                    hidden_size=hyper_settings.hyper_hidden,
                                    query_embed_dim=hyper_settings.hyper_query_dim,
                                    query_norm=hyper_settings.hyper_query_norm)
        targets = PerExampleLoRA(model, hyper_cfg.target_modules).targets
        with init_empty_weights():
            hyper = HyperLoraGenerator(hyper_cfg, input_dim=config.hidden_size, targets=targets)
        shape.hyper_params = sum(p.numel() for p in hyper.parameters())
    return shape


def _activations(shape: _ModelShape, rows: int, tokens: int, layers: int, checkpointed: bool) -> int:
    per_layer = rows * tokens * shape.hidden * ACTIVATION_BYTES_PER_HIDDEN
    if not checkpointed:
        return layers * per_layer
    return layers * rows * tokens * shape.hidden * 2 + per_layer  # inputs kept, one layer recomputed at a time


def estimate_memory(cfg, num_processes: int = 1) -> MemoryEstimate:
    """Bytes per process for the run `cfg` (a RunConfig) when launched on `num_processes` processes."""
    t, s = cfg.train, cfg.metatuner
    weight_bytes = _BYTES[cfg.model.dtype]
    rows = -(-t.batch_size // num_processes)
    checkpointed = t.gradient_checkpointing
    est = MemoryEstimate()
    if cfg.method in ("sft", "better_together", "dpo"):
        if cfg.method == "dpo":
            rows *= 2  # DPO runs each pair's chosen and rejected answers as one batch
        m = _shape(cfg.model.actor or cfg.model.name, cfg.model.trust_remote_code)
        est.parts["weights"] = m.params * weight_bytes
        # fp32 value, gradient and two AdamW moments per LoRA parameter
        est.parts["trainable (LoRA+Adam)"] = 16 * m.layers * m.lora_per_layer(cfg.lora.target_modules, cfg.lora.r)
        est.parts["activations"] = _activations(m, rows, t.max_length, m.layers, checkpointed)
        est.parts["overhead"] = OVERHEAD
        return est
    if cfg.method == "opro":
        g = _shape(cfg.model.name, cfg.model.trust_remote_code)
        separate = cfg.model.actor not in (None, cfg.model.name)
        m = _shape(cfg.model.actor, cfg.model.trust_remote_code) if separate else g
        est.parts["weights"] = (g.params + (m.params if separate else 0)) * weight_bytes
        est.parts["kv cache"] = (cfg.eval.batch_size * 2 * (t.max_length + cfg.search.max_instruction_tokens)
                                 * m.layers * m.kv_width * weight_bytes)
        est.parts["overhead"] = OVERHEAD
        return est

    separate = cfg.model.actor not in (None, cfg.model.name)
    g = _shape(cfg.model.name, cfg.model.trust_remote_code, s if not separate else None)
    m = _shape(cfg.model.actor, cfg.model.trust_remote_code, s) if separate else g
    g.hyper_params = m.hyper_params  # the hypernetwork's size follows M's targets

    k = resolve_share_depth(s.share_depth, g.layers)
    est.parts["weights"] = (g.params + (m.params if separate else 0)) * weight_bytes
    g_lora = g.lora_per_layer(s.g_target_modules, s.g_lora_r)
    if s.g_finetune == "full":
        # every weight of G trains (gradient and fp32 moments), plus the frozen copy of the upper layers
        trainable = (weight_bytes + 8) * g.params + weight_bytes * g.params * (g.layers - k) // g.layers
    else:
        # fp32 value, gradient and two AdamW moments for phi_s and phi_p; the frozen twin phi_p' is a value only
        encoder_layers, prompt_layers = (k, g.layers - k) if s.share else (k, g.layers)
        trainable = 16 * g_lora * (encoder_layers + prompt_layers) + 4 * g_lora * prompt_layers
    trainable += 16 * g.hyper_params
    if s.warmup_actor_steps or s.warmup_actor_adapter:
        trainable += 16 * m.layers * m.lora_per_layer(cfg.lora.target_modules, cfg.lora.r)
    est.parts["trainable (LoRA+Adam)"] = trainable
    request = s.max_request_tokens
    acts = _activations(m, rows, t.max_length, m.layers, checkpointed)  # task loss through M
    acts += _activations(g, rows, request, g.layers, checkpointed)  # SR loss through G
    acts += _activations(g, rows, request, k, False)  # the writer's prefill up to layer k, for h
    est.parts["activations"] = acts
    candidates = rows * (s.n_rollouts + 2)
    est.parts["kv cache (rollouts)"] = max(
        candidates * (request + s.max_prompt_tokens) * g.layers * 2 * g.kv_width * weight_bytes,
        candidates * t.max_length * m.layers * 2 * m.kv_width * weight_bytes)
    est.parts["overhead"] = OVERHEAD
    return est


KNOBS = (
    "train.batch_size (activations and KV cache scale with it; keep the batch per optimiser step with "
    "train.grad_accum, or launch more processes)",
    "train.gradient_checkpointing=true (keeps one hidden state per layer instead of every activation)",
    "model.dtype=bfloat16 (half the bytes of float32 weights)",
    "train.max_length and metatuner.max_request_tokens (activations scale with sequence length)",
    "metatuner.n_rollouts (the rollout KV cache scales with it)",
    "metatuner.share_depth (k: the writer keeps activations for its first k layers)",
    "a smaller model.actor, or metatuner.g_finetune=lora instead of full",
    "for the SFT baseline: shard weights and optimizer with configs/accelerate/fsdp.yaml or deepspeed_zero3.yaml",
)


def assert_fits(estimate: MemoryEstimate, free_bytes: int, device: str = "cuda") -> None:
    """Raise MemoryEstimateError, listing the knobs, when the estimate exceeds `free_bytes`."""
    if estimate.total <= free_bytes:
        return
    knobs = "\n".join(f"  - {k}" for k in KNOBS)
    raise MemoryEstimateError(
        f"this run needs about {estimate.total / GIB:.1f} GiB per process but {device} has {free_bytes / GIB:.1f} "
        f"GiB free.\n{estimate.summary()}\nTo fit, change one of:\n{knobs}\n"
        "or set train.check_memory=false to try anyway.")


def check_memory(cfg, device, num_processes: int = 1, verbose: bool = True) -> MemoryEstimate | None:
    """On a CUDA device: print the estimate and stop when it exceeds the free memory. Elsewhere: nothing."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    estimate = estimate_memory(cfg, num_processes)
    free, _ = torch.cuda.mem_get_info(device)
    if verbose:
        print(estimate.summary(), f"\n  free on {device}: {free / GIB:.2f} GiB", flush=True)
    assert_fits(estimate, free, str(device))
    return estimate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(estimate_memory(cfg, args.num_processes).summary())


if __name__ == "__main__":
    main()
