"""Which training rows each batch holds: seeded shuffles per epoch, cut into batches.

    rows = batch_rows(step, len(examples), batch_size, seed)          # MetaTuner's step: a pure function of the step
    batches = shuffled_batches(len(pairs), batch_size, random.Random(seed), min_rows=processes)   # SFT, warm-ups
    next(batches)

Every order comes from `epoch_batches`, so the rules for an epoch's short last batch are written once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def epoch_batches(order: list[int], batch_size: int, min_rows: int) -> list[list[int]]:
    """An epoch's `order` cut into batches of `batch_size`, without those shorter than `min_rows` (the short last
    batch, when a caller cannot use it)."""
    batches = [order[first : first + batch_size] for first in range(0, len(order), batch_size)]
    return [rows for rows in batches if len(rows) >= min_rows]


def shuffled_batches(n_examples: int, batch_size: int, rng: random.Random, min_rows: int) -> Iterator[list[int]]:
    """Batches forever, each epoch shuffled by `rng`: the sequence depends on the stream alone, so a resumed run
    skips the batches it already trained on by drawing them again."""
    while True:
        order = list(range(n_examples))
        rng.shuffle(order)
        yield from epoch_batches(order, batch_size, min_rows)


def full_batches(n_examples: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Batches of exactly `batch_size` rows (one batch of every row when there are fewer rows than that)."""
    return shuffled_batches(n_examples, batch_size, rng, min_rows=min(batch_size, n_examples))


def batch_rows(step: int, n_examples: int, batch_size: int, seed: int) -> list[int]:
    """The training rows of optimiser step `step` (1-based): a pure function of the step, so a resumed run sees
    exactly the batches the uninterrupted run would have seen. Each epoch is a fresh seeded shuffle; an epoch holds
    only full batches (one batch of every row when there are fewer rows than `batch_size`)."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, index = divmod(step - 1, per_epoch)
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return epoch_batches(order, batch_size, min(batch_size, n_examples))[index]
