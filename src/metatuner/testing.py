"""Tiny, offline models and tokenizers for tests and quick benchmarks.

Everything is built in memory from a config and a few sentences of text: no download, no file.

    model, tokenizer = tiny_model_and_tokenizer(num_layers=4)
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The same turn layout as SmolLM2's template, so code paths match the embedded default model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "Solve the problem step by step. The answer is 42. #### 42",
    "Question: Janet has 3 apples and buys 5 more. How many apples does she have? 3 + 5 = 8. The answer is 8.",
    "Rewrite this instruction for the question so that a model answers it well.",
    "Context: the lights were off. Question: why? A) rain B) power cut C) night D) none. Answer: B",
    "State the final answer to the following arithmetic problem: 4 - 1 - 7 = -4",
    "user assistant system 0 1 2 3 4 5 6 7 8 9 + - * / = . , ? ! ( ) $ % :",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (every string round-trips) with a SmolLM2-style chat template."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer: PreTrainedTokenizerFast, num_layers: int = 4, hidden_size: int = 64, seed: int = 0):
    """A randomly initialised Llama with `num_layers` layers whose vocabulary matches `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_model_and_tokenizer(num_layers: int = 4, hidden_size: int = 64, seed: int = 0):
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer, num_layers=num_layers, hidden_size=hidden_size, seed=seed), tokenizer


def optimizer_with_state() -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    """A parameter and an AdamW that has taken one step, so its state has tensors: for checkpoint tests."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    return param, optimizer


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `folder`, by tag: [(step, value), ...]. For tests that
    check what a run logged to its trackers."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(folder).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def pretend_earlier_sittings_took(checkpoint, seconds: float) -> None:
    """Set the training seconds a TRL checkpoint carries for the sittings before it (`baselines.trl_run`), so that a
    test can tell a resumed run's `train_seconds` counts them."""
    import json
    from pathlib import Path

    state_path = Path(checkpoint) / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["stateful_callbacks"]["SittingSeconds"]["args"]["earlier"] = seconds
    state_path.write_text(json.dumps(state))
