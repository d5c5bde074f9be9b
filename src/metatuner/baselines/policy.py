"""M as the policy a TRL trainer tunes (DPO, GRPO): the base model with SFT's LoRA shape, or an adapter to continue."""

from __future__ import annotations

from peft import LoraConfig, PeftModel

from ..config import RunConfig
from ..models import load_model


def load_policy(cfg: RunConfig, init_adapter: str | None):
    """(model, tokenizer, lora config): with `init_adapter` the adapter loaded trainable on M and no LoRA config
    (TRL then keeps a frozen copy of it as the reference), else the base M and the LoRA config (`lora.*`) the
    trainer applies (the base model is then the reference)."""
    model, tokenizer = load_model(cfg.model.actor or cfg.model.name, cfg.model.dtype, cfg.model.device,
                                  cfg.model.trust_remote_code)
    if init_adapter:
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True), tokenizer, None
    return model, tokenizer, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
