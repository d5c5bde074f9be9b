"""Is the prompt branch writing anything but p0, and does the per-query LoRA differ between queries?

    prompt_diagnostics(written_prompts, p0)   # distinct prompts, share equal to p0, edit distance to p0
    lora_diversity(mt, questions, h)          # how much the hypernetwork's LoRA differs between queries
    d2_diagnostics(store, p0)                 # how much of D2 is G's own samples

Every MetaTuner run reports these: training logs them (TensorBoard and `train_metrics.json`, `diagnostics`), and
`MetaTuner.evaluate` adds them to the evaluation's metrics (so `metatuner eval` and `compare` report them).

LoRA diversity compares the per-query updates U_i = lambda * B_i A_i over all targets, flattened, without building
any d_out x d_in matrix: <U_i, U_j> = sum over targets of sum((B_i^T B_j) * (A_i A_j^T)), r x r products.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .hyperlora import LoraFactors


def word_edit_distance(a: str, b: str) -> float:
    """Levenshtein distance between the word sequences of `a` and `b`, over the longer one's length (0 to 1)."""
    x, y = a.split(), b.split()
    if not x and not y:
        return 0.0
    previous = list(range(len(y) + 1))
    for i, word in enumerate(x, 1):
        current = [i]
        for j, other in enumerate(y, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1] / max(len(x), len(y))


def is_p0(prompt: str, p0: str) -> bool:
    """p0 itself, or p0 cut short (by the prompt-length limit): G copying p0 either way."""
    return prompt == p0 or (bool(prompt) and p0.startswith(prompt))


def prompt_diagnostics(prompts: Sequence[str], p0: str) -> dict:
    """How varied the written prompts are and how far they are from p0 (`p0_share` counts p0 cut short as p0)."""
    if not prompts:
        return {"prompts": 0}
    return {
        "prompts": len(prompts),
        "distinct_prompts": len(set(prompts)),
        "p0_share": round(sum(is_p0(p, p0) for p in prompts) / len(prompts), 4),
        "edit_distance_to_p0": round(sum(word_edit_distance(p, p0) for p in prompts) / len(prompts), 4),
    }


def d2_diagnostics(store, p0: str) -> dict:
    return {"d2_entries": len(store), "d2_from_samples": round(store.from_samples_share(p0), 4)}


def run_diagnostics(mt, questions: Sequence[str], p0: str, batch_size: int = 16, limit: int = 64) -> dict:
    """Written-prompt statistics over `questions` and LoRA diversity over the first `limit` distinct ones."""
    prompts, h = mt.write_all(list(questions), batch_size)
    return {**prompt_diagnostics(prompts, p0), "lora_diversity": lora_diversity(mt, questions, h, limit)}


def flat_scalars(diagnostics: dict, prefix: str = "diagnostics") -> dict[str, float]:
    """The numbers of a (nested) diagnostics dict as `prefix/key` scalars, for TensorBoard."""
    out = {}
    for key, value in diagnostics.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


def update_gram(factors: LoraFactors, scale: float) -> torch.Tensor:
    """The Gram matrix <U_i, U_j> (Frobenius) of the per-example updates U_i = scale * B_i A_i over all targets."""
    gram = None
    for a, b in factors.factors.values():  # a: (n, r, d_in), b: (n, d_out, r)
        a, b = a.detach().double(), b.detach().double()
        term = (torch.einsum("iok,jol->ijkl", b, b) * torch.einsum("ikd,jld->ijkl", a, a)).sum((-1, -2))
        gram = term if gram is None else gram + term
    return gram * scale**2


def diversity_from_gram(gram: torch.Tensor) -> dict:
    """Mean pairwise cosine distance, between-example variance as a share of the mean squared norm, mean norm."""
    n = gram.shape[0]
    sq_norms = gram.diagonal()
    norms = sq_norms.clamp(min=0).sqrt()
    cosine = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-30)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    mean_sq = sq_norms.mean()
    # mean ||U_i - mean U||^2 = mean ||U_i||^2 - ||mean U||^2, and ||mean U||^2 is the mean of the whole Gram matrix
    variance = mean_sq - gram.mean()
    return {
        "queries": n,
        "mean_pairwise_cosine_distance": round(float(1 - cosine[off_diagonal].mean()) if n > 1 else 0.0, 6),
        "between_query_variance_share": round(float(variance / mean_sq) if mean_sq > 0 else 0.0, 6),
        "mean_frobenius_norm": round(float(norms.mean()), 6),
    }


@torch.no_grad()
def lora_diversity(mt, questions: Sequence[str], h: torch.Tensor, limit: int = 64) -> dict | None:
    """Diversity of the per-query LoRA over the first `limit` distinct questions, from their pooled states `h` (row i
    belongs to questions[i], as `write_all` returns them), next to the Frobenius norm of M's static warm-up adapter
    (None when the run has no parameter branch)."""
    if not mt.settings.use_hyper:
        return None
    first_row: dict[str, int] = {}
    for i, question in enumerate(questions):
        first_row.setdefault(question, i)
    rows = list(first_row.values())[:limit]
    result = diversity_from_gram(update_gram(mt.hyper(h[rows]), mt.hyper_config.scale))
    static = mt.static_update_norm()
    result["static_adapter_frobenius_norm"] = round(static, 6) if static is not None else None
    return result
