"""Data parallelism on CPU (gloo): two processes train exactly what one process trains on the same global batch.

Each test launches `torchrun --nproc_per_node 2 -m metatuner train ...` on a tiny model saved to disk (the same
command a GPU user runs with `accelerate launch`; accelerate reads torchrun's environment) and compares the saved
trainable weights with a single-process run of the same config.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metatuner.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp_path, name, cfg) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _launch(config: str, nproc: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "metatuner", "train", "--config", config, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _metatuner_config(tiny_dir, out) -> dict:
    return {
        "method": "metatuner", "output_dir": str(out),
        "model": {"name": str(tiny_dir), "device": "cpu"},
        "data": {"task": "rg:chain_sum", "task_options": {"size": 8, "test_size": 2}},
        "train": {"batch_size": 4, "max_steps": 4, "save_every": 2, "mixed_precision": "fp32", "warmup_ratio": 0.0},
        "metatuner": {"share_depth": 2, "rank": 4, "hyper_hidden": 32, "g_lora_r": 4, "max_prompt_tokens": 4,
                      "n_rollouts": 2, "sync_every": 2, "lr_hyper": 1e-2, "lr_generator": 1e-2,
                      "warmup_actor_steps": 2, "warmup_generator": True, "warmup_generator_steps": 1,
                      # Near-zero temperature: sampled candidates equal the greedy ones whatever the random
                      # stream, so D2 does not depend on how the rows are split between processes.
                      "rollout_temperature": 1e-4},
    }


def test_ddp_two_processes_train_the_same_metatuner_weights_and_d2_as_one_and_resume_exactly(tiny_dir, tmp_path):
    from metatuner.train import train_metatuner

    one, two = tmp_path / "one", tmp_path / "two"
    train_metatuner(load_config(_write(tmp_path, "one", _metatuner_config(tiny_dir, one))))
    _launch(_write(tmp_path, "two", _metatuner_config(tiny_dir, two)), 2)

    a = load_file(str(one / "model" / "metatuner.safetensors"))
    b = load_file(str(two / "model" / "metatuner.safetensors"))
    trained = [k for k in a if "lora_B" in k and ".prompt." in k]
    assert trained and all(a[k].abs().max() > 0 for k in trained)  # the weights moved: the test has teeth
    assert _max_diff(a, b) < 1e-4
    d2_one = json.loads((one / "model" / "expert_prompts.json").read_text())
    d2_two = json.loads((two / "model" / "expert_prompts.json").read_text())
    assert len(d2_one) == 8  # the warm-up rolled out every training query, half on each rank in the DDP run
    assert {k: v["prompt"] for k, v in d2_one.items()} == {k: v["prompt"] for k, v in d2_two.items()}
    # Only the main process writes, and the metrics are over the global batch.
    m_one = json.loads((one / "train_metrics.json").read_text())
    m_two = json.loads((two / "train_metrics.json").read_text())
    assert m_two["processes"] == 2 and m_two["train_examples"] == m_one["train_examples"] == 16
    for key in ("train/task_loss", "train/sr_loss"):
        assert m_one["history"][key] == pytest.approx(m_two["history"][key], abs=1e-4)
    # Checkpoints carry each rank's RNG states, so a resumed DDP run continues each rank's own random stream.
    state = json.loads((two / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert len(state["trainer"]["rank_rng"]) == 2
    assert all(rank.keys() == state["rng"].keys() for rank in state["trainer"]["rank_rng"])  # one RNG format
    assert state["trainer"]["config"]["train"]["batch_size"] == 4  # the run's config travels with its checkpoint

    # Resuming the two-process run from its step-2 checkpoint ends where the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    _launch(_write(tmp_path, "resumed", _metatuner_config(tiny_dir, resumed)), 2,
            "--resume", str(two / "checkpoints" / "step-00000002"))
    c = load_file(str(resumed / "model" / "metatuner.safetensors"))
    assert _max_diff(b, c) <= 1e-6
    assert (resumed / "model" / "expert_prompts.json").read_text() == (two / "model" / "expert_prompts.json").read_text()


def test_ddp_two_processes_train_the_same_sft_adapter_as_one(tiny_dir, tmp_path):
    from metatuner.baselines.sft import train_sft

    def cfg(out):
        return {"method": "sft", "output_dir": str(out), "model": {"name": str(tiny_dir), "device": "cpu"},
                "data": {"task": "rg:chain_sum", "task_options": {"size": 8, "test_size": 2}},
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "train": {"batch_size": 4, "max_steps": 3, "lr": 1e-2, "mixed_precision": "fp32",
                          "warmup_ratio": 0.0}}

    one, two = tmp_path / "one", tmp_path / "two"
    train_sft(load_config(_write(tmp_path, "one", cfg(one))))
    _launch(_write(tmp_path, "two", cfg(two)), 2)
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a and all(t.numel() > 0 for t in b.values())  # no empty (size-0) tensors in the saved adapter
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    assert _max_diff(a, b) < 1e-4
    losses = [json.loads((d / "train_metrics.json").read_text())["history"]["train/loss"] for d in (one, two)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_ddp_batch_smaller_than_the_process_count_is_refused(tiny_dir, tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    from metatuner import distributed, train, trainer

    class RankOneOfTwo:  # the part of an Accelerator the trainer reads before any collective call
        process_index, num_processes, is_main_process = 1, 2, False
        distributed_type, device = DistributedType.MULTI_CPU, torch.device("cpu")

        def __init__(self, **kwargs):
            pass

        def init_trackers(self, name):
            pass

    assert distributed.shard(list(range(5)), RankOneOfTwo()) == [1, 3]
    monkeypatch.setattr(trainer, "Accelerator", RankOneOfTwo)
    cfg = _metatuner_config(tiny_dir, tmp_path / "small")
    cfg["train"]["batch_size"] = 1
    with pytest.raises(ValueError, match="train.batch_size=1 .* 2 processes"):
        train.train_metatuner(load_config(_write(tmp_path, "small", cfg)))


def test_ddp_two_processes_run_better_together_like_one(tiny_dir, tmp_path):
    """Both instruction searches (dev set scored in two shards, proposals written by the main process) and the SFT
    between them give what one process gives."""
    from metatuner.baselines.better_together import train_better_together

    def cfg(out):
        return {"method": "better_together", "output_dir": str(out), "model": {"name": str(tiny_dir), "device": "cpu"},
                "data": {"task": "rg:chain_sum", "task_options": {"size": 8, "test_size": 4}},
                "search": {"rounds": 2, "proposals_per_round": 3, "dev_size": 4, "max_instruction_tokens": 10},
                "lora": {"r": 4, "alpha": 8}, "eval": {"max_new_tokens": 4},
                "train": {"batch_size": 4, "max_steps": 2, "lr": 5e-3, "mixed_precision": "fp32", "warmup_ratio": 0.0}}

    one, two = tmp_path / "one", tmp_path / "two"
    train_better_together(load_config(_write(tmp_path, "one", cfg(one))))
    _launch(_write(tmp_path, "two", cfg(two)), 2)
    searches = [json.loads((d / "search.json").read_text()) for d in (one, two)]
    for phase in ("before_sft", "after_sft"):
        a, b = searches[0][phase], searches[1][phase]
        assert [h["instruction"] for h in a["history"]] == [h["instruction"] for h in b["history"]]
        assert [h["score"] for h in a["history"]] == pytest.approx([h["score"] for h in b["history"]], abs=1e-4)
        assert a["best"] == b["best"] and a["examples_scored"] == b["examples_scored"]
    adapters = [load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, two)]
    assert _max_diff(*adapters) < 1e-4


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_ddp_accelerate_configs_load_and_give_their_launch_command(name):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).parent.parent / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml -m metatuner train" in path.read_text()
    assert config.mixed_precision == "bf16" and not config.use_cpu
    if name == "fsdp":  # PEFT's FSDP recipe: no use_orig_params (the trainer wraps LoRA leaves separately)
        assert config.fsdp_config["fsdp_use_orig_params"] is False and config.fsdp_config["fsdp_version"] == 1
    if name == "deepspeed_zero3":  # without it, get_state_dict cannot gather the adapter for saving
        assert config.deepspeed_config["zero3_save_16bit_model"] is True


def test_fsdp_policy_wraps_trainable_lora_leaves_apart_from_frozen_weights(tiny_dir):
    """FSDP 1 without use_orig_params cannot flatten trainable and frozen weights into one unit: the SFT trainer
    swaps in PEFT's policy, which gives every trainable LoRA leaf its own unit and wraps the decoder layers."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from metatuner.baselines.sft import _wrap_lora_separately

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    plugin = SimpleNamespace(fsdp_version=1, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    _wrap_lora_separately(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), model)
    policy = plugin.auto_wrap_policy
    layer = model.base_model.model.model.layers[0]
    q = layer.self_attn.q_proj

    def wrapped(module):
        return policy(module=module, recurse=False, nonwrapped_numel=0)

    assert wrapped(q.lora_A["default"]) and wrapped(q.lora_B["default"])  # trainable leaves: own units
    assert wrapped(layer) and not wrapped(q.base_layer)  # decoder layers wrapped; frozen linears stay inside
    plugin2 = SimpleNamespace(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    _wrap_lora_separately(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin2)), model)
    assert plugin2.auto_wrap_policy == "TRANSFORMER_BASED_WRAP"  # FSDP 2 shards per parameter: left alone


class _RankOf:
    """The part of an Accelerator that the per-rank RNG helpers read."""

    def __init__(self, index, processes=2):
        self.process_index, self.num_processes = index, processes


def _draws():
    import random

    import numpy as np

    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def _states_of_seeds(*seeds) -> list[dict]:
    import random

    import numpy as np

    from metatuner.checkpoint import capture_rng_state

    states = []
    for seed in seeds:
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        states.append(capture_rng_state())
    return states


def test_rank_rng_states_are_the_checkpoints_format_and_each_rank_gets_its_own_back(monkeypatch):
    """One format: what every rank sends (gathered here without a process group) is `capture_rng_state`'s, the
    format of a checkpoint's own `rng`; restoring gives rank 1 rank 1's streams, not rank 0's."""
    from metatuner import distributed
    from metatuner.checkpoint import capture_rng_state

    monkeypatch.setattr(distributed, "gather_object", lambda objects: objects * 2)
    sent = distributed.rank_rng_states(_RankOf(0))
    assert sent == [capture_rng_state()] * 2

    states = _states_of_seeds(1, 2)
    rank_one_draws = _draws()  # the stream rank 1 saved (seed 2), continued
    distributed.restore_rank_rng(states, _RankOf(1))
    assert _draws() == rank_one_draws


def test_rank_rng_of_the_old_format_restores_its_gpu_state_onto_the_current_device(monkeypatch):
    """Before the one format a rank kept only its current GPU's CUDA state, as a flat list: it still goes back
    there (torch.cuda stood in for, so the branch runs on a CPU-only machine)."""
    from metatuner import distributed

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.tolist(), device)))
    old = [{**state, "cuda": [7] * 16} for state in _states_of_seeds(1, 2)]
    distributed.restore_rank_rng(old, _RankOf(1))
    assert restored == [([7] * 16, 1)]
