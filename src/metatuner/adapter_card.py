"""The README.md of an exported per-query adapter: what it is for and how to build the input it was made for.

An exported adapter is one query's LoRA, trained to work with the prompt G wrote for that query: loading it with
PEFT and asking the bare question gives an unrelated answer. The card says so, and gives a snippet that builds the
exact input MetaTuner feeds M (the chat template over the task's messages: the written prompt, a blank line, the
question).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__

_SNIPPET = '''```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = {base!r}
tokenizer = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), {adapter!r})
messages = {messages}  # the written prompt, a blank line, then the question
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def write_adapter_card(out_dir: str | Path, *, base_model: str, question: str, prompt: str, messages: list[dict],
                       rank: int, target_modules: list[str], max_new_tokens: int, static_rank: int | None) -> Path:
    """Write `out_dir`/README.md (replacing PEFT's blank template)."""
    out = Path(out_dir)
    snippet = _SNIPPET.format(base=base_model, adapter=str(out), max_new_tokens=max_new_tokens,
                              messages=json.dumps(messages, ensure_ascii=False))
    folded = (f" It folds in M's static warm-up adapter (rank {static_rank}), so it replaces that adapter rather "
              "than adding to it." if static_rank else "")
    card = f"""---
base_model: {json.dumps(base_model)}
library_name: peft
tags: [metatuner, lora]
---

# A MetaTuner per-query LoRA adapter

Written by MetaTuner {__version__} for **one query**: the hypernetwork made this LoRA (rank {rank}, on
{", ".join(target_modules)}) from that query, for the base model `{base_model}`.{folded}

- **Query:** {question}
- **Prompt MetaTuner wrote for it:** {prompt}

The adapter was trained to answer under that prompt. Build the input as MetaTuner does, the chat template over the
messages below, or the answer will not be what MetaTuner gives:

{snippet}

Other queries get other prompts and other LoRA weights: export each with
`metatuner export --run RUN --query "..." --out DIR`, or serve a whole run from Python with
`MetaTuner.from_pretrained(RUN).generate([...])`.
"""
    path = out / "README.md"
    path.write_text(card, encoding="utf-8")
    (out / "metatuner_prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    return path
