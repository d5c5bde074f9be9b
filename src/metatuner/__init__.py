"""MetaTuner: per-query prompt and LoRA co-optimisation for large language models (arXiv 2509.24245).

    from metatuner import MetaTuner
    mt = MetaTuner.from_pretrained("runs/metatuner-gsm8k")

`MetaTuner` (metatuner.model) is loaded on first use, so that `import metatuner` and the command line's help and
config errors do not import torch.
"""

__version__ = "0.1.0"
__all__ = ["MetaTuner", "__version__"]


def __getattr__(name: str):
    if name == "MetaTuner":
        from .model import MetaTuner  # deferred: torch, transformers and PEFT load only when the model is used

        return MetaTuner
    raise AttributeError(f"module 'metatuner' has no attribute {name!r}")
