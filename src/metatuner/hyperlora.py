"""Per-example LoRA for the actor M, the hypernetwork that writes it, and its export to a PEFT adapter.

MetaTuner gives every query its own LoRA: each target linear of M computes ``W0 x + lambda * B_i (A_i x)`` with the
factors (A_i, B_i) of example i, written by the parameter decoder from the query's pooled state h (the
method's parameter branch, arXiv 2509.24245). Three pieces:

- :class:`PerExampleLoRA` hooks M's target linears once. Outside ``actor.apply(...)`` the hooks do nothing; inside,
  every forward and every ``model.generate`` call adds the per-example low-rank update, batched over examples.
- :class:`HyperLoraGenerator` (the parameter decoder F) maps a pooled vector h to factors for every target.
- :func:`export_peft_adapter` writes one query's factors as a standard PEFT LoRA adapter directory.

Usage::

    config = HyperLoraConfig(target_modules=["q_proj", "v_proj"], r=8)
    actor = PerExampleLoRA(model, config.target_modules, scale=config.scale)
    generator = HyperLoraGenerator(config, input_dim=h.shape[-1], targets=actor.targets)

    factors = generator(h)                              # LoraFactors, batch = h.shape[0]
    with actor.apply(factors):
        loss = model(input_ids, attention_mask=mask, labels=labels).loss    # grads reach the generator
    with actor.apply(factors.repeat_interleave(4)):                         # 4 samples per query
        out = model.generate(**batch, do_sample=True, num_return_sequences=4)

    export_peft_adapter(factors.index_select([0]), "path/to/M", "adapters/query-0", config)

Factors are keyed by ``(layer_index, module_type)`` rather than by module path, so the same factors serve M whether
it is a bare transformers model or wrapped in a ``PeftModel`` (whose module paths carry a ``base_model.model.``
prefix), and map onto the exported adapter.

With gradient checkpointing on M, call ``backward()`` inside the ``with`` block: checkpointed layers re-run their
forward during backward, and outside the context they would recompute without the LoRA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from .generation import base_model

__all__ = [
    "HyperLoraConfig",
    "HyperLoraGenerator",
    "LoraFactors",
    "LoraTarget",
    "PerExampleLoRA",
    "export_peft_adapter",
]

TargetKey = tuple[int, str]
"""(layer_index, module_type): how factors name a target, independent of M's module paths."""

# What `PeftModel.save_pretrained` writes for one adapter; anything else in an export directory is refused.
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md", "metatuner_prompt.txt"})


@dataclass
class HyperLoraConfig:
    """The per-query LoRA of M and the hypernetwork (parameter decoder) that generates it."""

    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={
            "help": "Names of M's linear layers that get a per-query LoRA, matched as a suffix of the module path "
            "('q_proj' matches 'model.layers.3.self_attn.q_proj'), in every layer, as in PEFT's target_modules."
        },
    )
    r: int = field(default=8, metadata={"help": "LoRA rank r: A is r x d_in and B is d_out x r for every target."})
    scale: float = field(
        default=1.0,
        metadata={
            "help": "lambda in W0 x + lambda * B (A x). This is the scaling itself, not PEFT's alpha (PEFT scales by "
            "lora_alpha / r), so changing r does not change it; an exported adapter gets lora_alpha = scale * r."
        },
    )
    hidden_size: int = field(
        default=256,
        metadata={"help": "Width of the hypernetwork's hidden layer (the output of down_A and down_B)."},
    )
    query_embed_dim: int = field(
        default=128,
        metadata={"help": "Size of the projection of the pooled query vector h that conditions the hypernetwork."},
    )
    layer_embed_dim: int = field(
        default=32, metadata={"help": "Size of the learned embedding of a target's layer index."}
    )
    module_embed_dim: int = field(
        default=32, metadata={"help": "Size of the learned embedding of a target's module type (q_proj, v_proj, ...)."}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the hypernetwork's hidden layer during training (0 disables it)."}
    )
    query_norm: str = field(
        default="layer",
        metadata={
            "help": "How h is normalised before the query projection: layer (LayerNorm of each h: what all queries "
            "share stays in it, and dominates, since the pooled states of different queries are nearly parallel) "
            "or standard (minus the running mean of h over the queries seen in training, over its running standard "
            "deviation: only what differs between queries is left)."
        },
    )

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ValueError("HyperLoraConfig.target_modules must name at least one module")
        for name in ("r", "hidden_size", "query_embed_dim", "layer_embed_dim", "module_embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HyperLoraConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HyperLoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.query_norm not in ("layer", "standard"):
            raise ValueError(f"HyperLoraConfig.query_norm must be layer or standard, got {self.query_norm!r}")


class RunningStandardize(nn.Module):
    """x minus the running mean, over the running standard deviation, of every x seen in training mode (a cumulative
    average, as BatchNorm's momentum=None, but always normalising with the running statistics: a training batch of
    8 queries would give noisy batch statistics, and inference sees one query at a time)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] > 0:
            with torch.no_grad():
                flat = x.detach().float()
                n, total = flat.shape[0], int(self.count) + flat.shape[0]
                batch_mean = flat.mean(0)
                delta = batch_mean - self.mean
                new_mean = self.mean + delta * n / total
                # Chan et al.'s parallel update of the variance: old and batch sums of squares plus the shift.
                m2 = self.var * int(self.count) + flat.var(0, unbiased=False) * n + delta**2 * int(self.count) * n / total
                self.mean.copy_(new_mean)
                self.var.copy_(m2 / total)
                self.count.fill_(total)
        return (x - self.mean.to(x.dtype)) / (self.var.to(x.dtype) + self.eps).sqrt()


class LoraTarget(NamedTuple):
    """One linear of M that carries a per-example LoRA."""

    layer_index: int
    module_type: str
    d_in: int
    d_out: int

    @property
    def key(self) -> TargetKey:
        return (self.layer_index, self.module_type)


@dataclass(frozen=True, eq=False)  # tensors have no boolean ==
class LoraFactors:
    """Per-example LoRA factors for every target: ``(layer_index, module_type) -> (A, B)``.

    A has shape (batch, r, d_in) and B (batch, d_out, r); row i of every tensor belongs to example i.
    """

    factors: Mapping[TargetKey, tuple[Tensor, Tensor]]

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("LoraFactors needs at least one target")
        batch_sizes = set()
        for key, (a, b) in self.factors.items():
            if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
                raise ValueError(
                    f"factors for {key} must be A (batch, r, d_in) and B (batch, d_out, r); "
                    f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
                )
            batch_sizes.add(a.shape[0])
        if len(batch_sizes) != 1:
            raise ValueError(f"all targets must have the same batch size, got {sorted(batch_sizes)}")

    @property
    def batch_size(self) -> int:
        a, _ = next(iter(self.factors.values()))
        return a.shape[0]

    def __getitem__(self, key: TargetKey) -> tuple[Tensor, Tensor]:
        return self.factors[key]

    def __iter__(self) -> Iterator[TargetKey]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def keys(self):
        return self.factors.keys()

    def items(self):
        return self.factors.items()

    def _map(self, fn) -> LoraFactors:
        return LoraFactors({key: (fn(a), fn(b)) for key, (a, b) in self.factors.items()})

    def repeat_interleave(self, n: int) -> LoraFactors:
        """Each example's factors n times in a row, matching ``input_ids.repeat_interleave(n, dim=0)``.

        That is how ``generate`` expands a batch for ``num_return_sequences`` and ``num_beams``, and how n candidate
        prompts per query are laid out.
        """
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def index_select(self, indices: Sequence[int] | Tensor) -> LoraFactors:
        """The factors of the examples at ``indices`` (for sorted or sub-batched inputs; ``[i]`` for export)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    @staticmethod
    def cat(parts: Sequence[LoraFactors]) -> LoraFactors:
        """The examples of `parts` one after another (rows joining a batch that is already decoding)."""
        keys = parts[0].keys()
        return LoraFactors({key: (torch.cat([p[key][0] for p in parts]), torch.cat([p[key][1] for p in parts]))
                            for key in keys})

    def to(self, *args, **kwargs) -> LoraFactors:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> LoraFactors:
        return self._map(Tensor.detach)


def _module_type(name: str, target_modules: Sequence[str]) -> str | None:
    """The target that `name` ends with, PEFT's suffix rule; None when it matches none."""
    matches = [t for t in target_modules if name == t or name.endswith("." + t)]
    if len(matches) > 1:
        raise ValueError(f"module {name!r} matches several target_modules: {matches}")
    return matches[0] if matches else None


def _layer_index(name: str) -> int:
    # The first numeric path component is the decoder layer in every causal LM layout (model.layers.N, h.N,
    # transformer.blocks.N); later numbers (experts, sub-layers) would be ambiguous and are caught as duplicates.
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"cannot find a layer index in module name {name!r}")


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a plain nn.Linear or of a PEFT layer wrapping one (M with a static warm-up adapter)."""
    base = module if isinstance(module, nn.Linear) else getattr(module, "base_layer", None)
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    return None


def _find_targets(model: nn.Module, target_modules: Sequence[str]) -> list[tuple[str, nn.Module, LoraTarget]]:
    found: list[tuple[str, nn.Module, LoraTarget]] = []
    linear_names: list[str] = []
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        # Skip the pieces inside a PEFT layer (base_layer, lora_A.default, ...): the wrapper itself is the target.
        if shape is None or any(part == "base_layer" or part.startswith("lora_") for part in name.split(".")):
            continue
        linear_names.append(name)
        module_type = _module_type(name, target_modules)
        if module_type is not None:
            found.append((name, module, LoraTarget(_layer_index(name), module_type, *shape)))

    missing = [t for t in target_modules if not any(target.module_type == t for _, _, target in found)]
    if missing:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise ValueError(
            f"target_modules {missing} match no linear layer of the model; "
            f"available linear names: {available} (e.g. {linear_names[:3]})"
        )
    keys: dict[TargetKey, str] = {}
    for name, _, target in found:
        if target.key in keys:
            raise ValueError(
                f"modules {keys[target.key]!r} and {name!r} both map to layer {target.layer_index} "
                f"{target.module_type!r}; name the targets more precisely (e.g. 'self_attn.q_proj')"
            )
        keys[target.key] = name
    found.sort(key=lambda item: (item[2].layer_index, target_modules.index(item[2].module_type)))
    return found


def _lora_delta(x: Tensor, a: Tensor, b: Tensor, scale: float, where: str) -> Tensor:
    """lambda * B_i (A_i x_i) for every example i, as two bmm's: never a d_out x d_in matrix per example."""
    if x.shape[0] != a.shape[0]:
        raise ValueError(
            f"per-example LoRA factors have batch size {a.shape[0]} but {where} received a batch of {x.shape[0]}; "
            "expand the factors the way the inputs were expanded (LoraFactors.repeat_interleave(n) for "
            "num_return_sequences / num_beams / n candidates per query, index_select for sub-batches)"
        )
    # Under autocast the input may be fp32 while the factors are bf16 (or the reverse); follow the input and let
    # autocast pick the matmul dtype.
    a = a.to(device=x.device, dtype=x.dtype)
    b = b.to(device=x.device, dtype=x.dtype)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, d_in); tokens = 1 while decoding
    low = torch.bmm(x3, a.transpose(1, 2))  # (batch, tokens, r)
    delta = torch.bmm(low, b.transpose(1, 2))  # (batch, tokens, d_out)
    return (scale * delta).reshape(*x.shape[:-1], b.shape[1])


class PerExampleLoRA:
    """Hooks M's target linears so that, inside :meth:`apply`, each adds its per-example LoRA update.

    The hooks are installed once, at construction. Outside ``apply`` they return at once, so M computes exactly
    its base output: the same model object can serve as M and (when G and M share weights) as G.
    """

    def __init__(self, model: nn.Module, target_modules: Sequence[str], scale: float = 1.0) -> None:
        self.model = model
        self.target_modules = list(target_modules)
        self.scale = float(scale)
        found = _find_targets(model, self.target_modules)
        self.targets: list[LoraTarget] = [target for _, _, target in found]
        self.module_names: dict[TargetKey, str] = {target.key: name for name, _, target in found}
        self._active: dict[TargetKey, tuple[Tensor, Tensor]] | None = None
        self._handles = []
        for name, module, target in found:
            # Two actors on one linear would silently add two updates.
            if getattr(module, "_metatuner_per_example_lora", False):
                raise ValueError(f"{name!r} already carries a PerExampleLoRA; call remove() on the old one first")
            module._metatuner_per_example_lora = True
            self._handles.append(module.register_forward_hook(self._make_hook(target.key, name), with_kwargs=True))

    def _make_hook(self, key: TargetKey, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
            active = self._active
            if active is None:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            a, b = active[key]
            return output + _lora_delta(x, a, b, self.scale, name).to(output.dtype)

        return hook

    @contextlib.contextmanager
    def apply(self, factors: LoraFactors | Mapping[TargetKey, tuple[Tensor, Tensor]]) -> Iterator[None]:
        """Within this block every forward of M (training, scoring, ``generate``) uses these per-example factors."""
        if not isinstance(factors, LoraFactors):
            factors = LoraFactors(factors)
        self._check(factors)
        if self._active is not None:
            raise RuntimeError("PerExampleLoRA.apply is already active; nested contexts are not supported")
        self._active = dict(factors.items())
        try:
            yield
        finally:
            self._active = None

    def _check(self, factors: LoraFactors) -> None:
        expected = {target.key: target for target in self.targets}
        missing = sorted(set(expected) - set(factors.keys()))
        unexpected = sorted(set(factors.keys()) - set(expected))
        if missing or unexpected:
            raise ValueError(f"factors do not match the actor's targets: missing {missing}, unexpected {unexpected}")
        for key, (a, b) in factors.items():
            target = expected[key]
            if a.shape[2] != target.d_in or b.shape[1] != target.d_out:
                raise ValueError(
                    f"factors for {key} have d_in {a.shape[2]} and d_out {b.shape[1]}; "
                    f"the module has d_in {target.d_in} and d_out {target.d_out}"
                )

    def remove(self) -> None:
        """Uninstall the hooks; M is then its plain self again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name in self.module_names.values():
            module = self.model.get_submodule(name)
            if hasattr(module, "_metatuner_per_example_lora"):
                del module._metatuner_per_example_lora


class HyperLoraGenerator(nn.Module):
    """The parameter decoder F: a pooled query vector h (batch, d_h) -> LoRA factors for every target of M.

    For target (layer l, module type m) the hypernetwork reads ``z = [P(h); E_layer[l]; E_module[m]]`` and computes
    ``A = up_A[m](ReLU(down_A(z)))`` reshaped to r x d_in and ``B = up_B[m](ReLU(down_B(z)))`` reshaped to d_out x r
    (the paper's MLP in the Text-to-LoRA layout). down_A and down_B are shared by all targets, so the size does not
    grow with M's depth; up_A and up_B have one head per module type because module types differ in d_in and d_out
    (with GQA, v_proj's d_out is smaller than q_proj's). All targets go through the MLP in one batched pass; the
    only Python loop is over module types.

    up_B starts at zero, so B = 0 and M is exactly its base model at step 0, as with LoRA. A's head starts small
    so that A x has LoRA's scale (LoRA initialises A uniformly in +-1/sqrt(d_in)).
    """

    def __init__(self, config: HyperLoraConfig, input_dim: int, targets: Sequence[LoraTarget]) -> None:
        super().__init__()
        if not targets:
            raise ValueError("HyperLoraGenerator needs at least one target")
        self.config = config
        self.input_dim = input_dim
        self.targets = list(targets)
        self.module_types = list(dict.fromkeys(target.module_type for target in self.targets))

        # Targets grouped by module type, so each type's head runs on one contiguous slice.
        order = sorted(self.targets, key=lambda t: (self.module_types.index(t.module_type), t.layer_index))
        self._order_keys = [target.key for target in order]
        self._groups: list[tuple[str, int, int, int, int]] = []  # (module_type, start, stop, d_in, d_out)
        for module_type in self.module_types:
            members = [i for i, t in enumerate(order) if t.module_type == module_type]
            dims = {(order[i].d_in, order[i].d_out) for i in members}
            if len(dims) != 1:
                raise ValueError(f"targets of type {module_type!r} differ in (d_in, d_out): {sorted(dims)}")
            d_in, d_out = dims.pop()
            self._groups.append((module_type, members[0], members[-1] + 1, d_in, d_out))
        self.register_buffer("target_layers", torch.tensor([t.layer_index for t in order]), persistent=False)
        self.register_buffer(
            "target_types", torch.tensor([self.module_types.index(t.module_type) for t in order]), persistent=False
        )

        # LLM hidden states carry a few huge outlier features; normalising h keeps the MLP in a sane range.
        self.query_norm = nn.LayerNorm(input_dim) if config.query_norm == "layer" else RunningStandardize(input_dim)
        self.query_proj = nn.Linear(input_dim, config.query_embed_dim)
        self.layer_embedding = nn.Embedding(max(t.layer_index for t in self.targets) + 1, config.layer_embed_dim)
        self.module_embedding = nn.Embedding(len(self.module_types), config.module_embed_dim)
        cond_dim = config.query_embed_dim + config.layer_embed_dim + config.module_embed_dim
        self.down_A = nn.Linear(cond_dim, config.hidden_size)
        self.down_B = nn.Linear(cond_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        r, hidden = config.r, config.hidden_size
        self.up_A = nn.ModuleDict({_head_name(m): nn.Linear(hidden, r * d_in) for m, _, _, d_in, _ in self._groups})
        self.up_B = nn.ModuleDict({_head_name(m): nn.Linear(hidden, d_out * r) for m, _, _, _, d_out in self._groups})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module_type, _, _, d_in, _ in self._groups:
            head_a = self.up_A[_head_name(module_type)]
            nn.init.normal_(head_a.weight, std=(self.config.hidden_size * d_in) ** -0.5)
            nn.init.zeros_(head_a.bias)  # a shared bias would make A the same for every query
            head_b = self.up_B[_head_name(module_type)]
            nn.init.zeros_(head_b.weight)
            nn.init.zeros_(head_b.bias)

    def forward(self, h: Tensor) -> LoraFactors:
        if h.dim() != 2 or h.shape[1] != self.input_dim:
            raise ValueError(f"h must have shape (batch, {self.input_dim}), got {tuple(h.shape)}")
        batch, num_targets = h.shape[0], len(self._order_keys)
        query = self.query_proj(self.query_norm(h.to(self.query_proj.weight.dtype)))
        cond = torch.cat(
            [
                query[:, None, :].expand(batch, num_targets, -1),
                self.layer_embedding(self.target_layers)[None].expand(batch, -1, -1),
                self.module_embedding(self.target_types)[None].expand(batch, -1, -1),
            ],
            dim=-1,
        )  # (batch, targets, cond_dim)
        hidden_a = self.dropout(F.relu(self.down_A(cond)))
        hidden_b = self.dropout(F.relu(self.down_B(cond)))

        r = self.config.r
        factors: dict[TargetKey, tuple[Tensor, Tensor]] = {}
        for module_type, start, stop, d_in, d_out in self._groups:
            a = self.up_A[_head_name(module_type)](hidden_a[:, start:stop]).view(batch, stop - start, r, d_in)
            b = self.up_B[_head_name(module_type)](hidden_b[:, start:stop]).view(batch, stop - start, d_out, r)
            for j, key in enumerate(self._order_keys[start:stop]):
                factors[key] = (a[:, j], b[:, j])
        # Present the targets in the actor's order, not the grouped one.
        return LoraFactors({target.key: factors[target.key] for target in self.targets})


def _head_name(module_type: str) -> str:
    return module_type.replace(".", "__")  # ModuleDict keys cannot contain dots ('self_attn.q_proj')


def _prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir).expanduser().resolve()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"export path {path} exists and is not a directory")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ADAPTER_FILES)
        if foreign:
            # Writing next to other files (a model checkpoint, another project) would mix or overwrite them.
            raise ValueError(f"export directory {path} already holds non-adapter files {foreign[:5]}; pick another")
    path.mkdir(parents=True, exist_ok=True)
    return path


def export_peft_adapter(
    factors: LoraFactors,
    base_model_name_or_path: str | os.PathLike | nn.Module,
    out_dir: str | os.PathLike,
    config: HyperLoraConfig,
) -> Path:
    """Write one query's factors as a standard PEFT LoRA adapter; return the directory.

    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` then computes what M computes under
    ``actor.apply(factors)``. ``base_model_name_or_path`` is M's hub id or local directory (recorded in
    adapter_config.json), or the loaded base model itself. The adapter holds the per-query LoRA only: if M also
    carries a static warm-up adapter, export or merge that one too.

    PEFT lays out and names the weights: its LoRA is injected into a weightless (meta-device) copy of M built from
    M's config, filled with the factors, and saved with ``save_pretrained``.
    """
    if factors.batch_size != 1:
        raise ValueError(
            f"export_peft_adapter takes the factors of one query, got a batch of {factors.batch_size}; "
            "use factors.index_select([i])"
        )
    ranks = {a.shape[1] for a, _ in factors.factors.values()}
    if ranks != {config.r}:
        raise ValueError(f"factors have rank {sorted(ranks)} but config.r is {config.r}")

    if isinstance(base_model_name_or_path, nn.Module):
        base = base_model_name_or_path
        base = base_model(base)  # a PeftModel: export against the model under it
        model_config, name_or_path = base.config, getattr(base, "name_or_path", None) or None
    else:
        name_or_path = str(base_model_name_or_path)
        model_config = AutoConfig.from_pretrained(name_or_path)
    out = _prepare_out_dir(out_dir)

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    skeleton.name_or_path = name_or_path  # get_peft_model records this as base_model_name_or_path
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.scale * config.r,  # PEFT scales by lora_alpha / r; this makes it lambda
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(skeleton, lora_config)

    filled: set[TargetKey] = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        key = (_layer_index(name), _module_type(name, config.target_modules))
        if key not in factors.keys():
            raise ValueError(f"the base model has target {key} ({name}) but the factors do not")
        a, b = factors[key]
        module.lora_A["default"].weight = nn.Parameter(a[0].detach().to("cpu").contiguous(), requires_grad=False)
        module.lora_B["default"].weight = nn.Parameter(b[0].detach().to("cpu").contiguous(), requires_grad=False)
        filled.add(key)
    unused = sorted(set(factors.keys()) - filled)
    if unused:
        raise ValueError(f"factors for {unused} have no matching module in the base model")

    # "auto" would look the base model up on the Hub to see whether its vocabulary changed; ours never does.
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    return out
