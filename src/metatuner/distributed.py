"""Data parallelism for MetaTuner's own training loop: sharding a step's batch, averaging gradients, sharing D2.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m metatuner train --config CONFIG     # N GPUs
    torchrun --standalone --nproc_per_node 2 -m metatuner train --config CONFIG model.device=cpu    # CPU (gloo)

The same code runs in one process (every helper is then a no-op) and in N. A step's global batch (a pure function
of the step, so a resumed run sees the same rows) is split across ranks; each rank weights its loss by its share of
the step's target tokens, so that the averaged gradient is the gradient of the global batch's token-mean loss, the
same as one process computing the whole batch.

Why the trainable gradients are all-reduced here instead of wrapping the model in DistributedDataParallel: G and M
share one PEFT model with several adapters, and each step calls it in three roles (writer, learner, actor) through
methods other than `forward`, with a different subset of parameters trainable in each. DDP's reducer expects one
`forward` per backward over a fixed set of parameters; calling submodules directly skips its bookkeeping and the
gradients are then not synchronised. The trainable parameters (LoRA adapters and the hypernetwork) are a few million
values, so one flattened all-reduce per step after `backward` is both correct and cheap.
"""

from __future__ import annotations

import atexit
import logging
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, gather_object

from .checkpoint import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)
T = TypeVar("T")


def shard(items: Sequence[T], accelerator) -> list[T]:
    """This rank's slice of a global batch (every rank knows the global batch, so no data moves)."""
    rank, n = accelerator.process_index, accelerator.num_processes
    return list(items[rank::n])


def sum_across(values: Sequence[float], accelerator) -> list[float]:
    """Element-wise sum of a few scalars over all ranks (one all-reduce)."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def average_gradients(params: Sequence[torch.nn.Parameter], accelerator) -> None:
    """Replace every parameter's gradient by its mean over ranks (missing gradients count as zeros)."""
    if accelerator.num_processes == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= accelerator.num_processes
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.Tensor], accelerator) -> None:
    """Make every rank start from rank 0's values (what DDP does when it wraps a model)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def merge_dicts(local: dict, accelerator) -> dict:
    """The union of every rank's dict (the keys are disjoint: each rank updates only the rows of its shard)."""
    if accelerator.num_processes == 1:
        return dict(local)
    merged: dict = {}
    for part in gather_object([local]):
        merged.update(part)
    return merged


def warn_if_sharded(accelerator, what: str) -> None:
    """MetaTuner's loop replicates G and M on every rank (data parallel) and never hands them to FSDP or DeepSpeed:
    under such a launch config nothing is sharded, so say so rather than let the user believe otherwise."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        log.warning("%s does not shard under %s: every rank holds a full copy of the models and only the "
                    "gradients of the trainable parts are averaged; launch it with configs/accelerate/ddp.yaml. "
                    "FSDP/ZeRO sharding applies to the SFT path (method=sft, whose adapter can serve as "
                    "metatuner.warmup_actor_adapter); see docs/scaling.md.", what, accelerator.distributed_type)


def end_training(accelerator) -> None:
    """Close the trackers but keep the process group: BetterTogether runs an SFT between two searches and
    `metatuner compare` trains several methods in one process, and accelerate's `end_training` would destroy the
    group they all use. It is destroyed when the process exits."""
    for tracker in accelerator.trackers:
        tracker.finish()
    if accelerator.num_processes > 1:
        _destroy_at_exit()


_registered = []


def _destroy_at_exit() -> None:
    if not _registered:
        _registered.append(True)
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)


def rank_rng_states(accelerator) -> list[dict] | None:
    """Every process's RNG states (`checkpoint.capture_rng_state`'s format), for the main process to put in a
    checkpoint (collective). None in one process: the checkpoint's own RNG states are that process's."""
    if accelerator.num_processes == 1:
        return None
    return gather_object([capture_rng_state()])


def restore_rank_rng(states: list[dict] | None, accelerator, source: str = "checkpoint") -> None:
    """Give each process back its own RNG states; warn when the process count changed since they were saved."""
    if accelerator.num_processes == 1 and not states:
        return
    if states and len(states) == accelerator.num_processes:
        restore_rng_state(_from_old_rank_state(states[accelerator.process_index]))
    else:
        log.warning("%s was written by %d process(es), this run has %d: random sampling will differ from an "
                    "uninterrupted run", source, len(states or [0]), accelerator.num_processes)


def _from_old_rank_state(state: dict) -> dict:
    """Compatibility with checkpoints written before the one RNG format: a rank's `cuda` was the state of its
    current GPU alone, one flat list, rather than a state per device. Python, NumPy and torch's CPU state were
    already in today's format."""
    cuda = state.get("cuda")
    if isinstance(cuda, list) and torch.cuda.is_available():
        return {**state, "cuda": {str(torch.cuda.current_device()): cuda}}
    return state
