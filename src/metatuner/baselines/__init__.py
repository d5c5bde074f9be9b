"""Baselines and ablations, one module each, all trained and evaluated through the same data and budget."""
