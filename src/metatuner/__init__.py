"""MetaTuner: per-query prompt and LoRA co-optimisation for large language models (arXiv 2509.24245)."""

__version__ = "0.1.0"
