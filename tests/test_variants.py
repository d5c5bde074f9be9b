"""Every MetaTuner variant that `metatuner compare` runs, through the same three stages: a short training run, a
save and reload, and the export of one query's LoRA as a PEFT adapter. A variant that trains nothing, saves only
part of what it trained, or exports an adapter that computes something else than its actor fails here.
"""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metatuner.config import load_config
from metatuner.generation import chat_prompt, score_targets
from metatuner.model import MetaTuner, build_metatuner
from metatuner.tasks.base import Example
from metatuner.train import train_metatuner

pytestmark = pytest.mark.integration

VARIANTS = {  # name -> overrides (configs/compare-*.yaml's methods, and the Gumbel and full fine-tuning ablations)
    "J": [],
    "I": ["metatuner.schedule=I", "metatuner.interleave_block=1"],
    "prompt_only": ["metatuner.use_hyper=false"],
    "params_only": ["metatuner.use_prompt=false"],
    "no_share": ["metatuner.share=false"],
    "gumbel": ["metatuner.prompt_objective=gumbel"],
    "full": ["metatuner.g_finetune=full"],  # needs its own M: model.actor is added below
}
QUESTION = "1 + 2 ="


def _cfg(g_dir, m_dir, out, name):
    actor = [f"model.actor={m_dir}"] if name == "full" else []
    return load_config(None, [
        f"model.name={g_dir}", "model.device=cpu", f"output_dir={out}", "data.task=rg:chain_sum",
        "data.task_options={size: 4, test_size: 2}", "train.batch_size=2", "train.max_steps=2",
        "train.warmup_ratio=0", "train.mixed_precision=fp32", "metatuner.share_depth=2", "metatuner.rank=2",
        "metatuner.hyper_hidden=16", "metatuner.g_lora_r=2", "metatuner.max_prompt_tokens=4",
        "metatuner.n_rollouts=2", "metatuner.rollout_every=1", "metatuner.warmup_generator=false",
        "metatuner.lr_hyper=1e-2", "metatuner.lr_generator=1e-2", "eval.batch_size=4", *actor, *VARIANTS[name],
    ])


@pytest.fixture(scope="module")
def trained(tiny_dir, tiny_dir_2layers, tmp_path_factory):
    """One short run per variant, trained on first use and shared by the stages."""
    runs = {}

    def get(name):
        if name not in runs:
            cfg = _cfg(tiny_dir, tiny_dir_2layers, tmp_path_factory.mktemp(name), name)
            torch.manual_seed(0)
            runs[name] = (cfg, train_metatuner(cfg))
        return runs[name]

    return get


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_its_branches(trained, name):
    """Both losses (or the variant's one) are logged and finite, and the trained weights moved from the start."""
    cfg, out = trained(name)
    history = json.loads((out / "train_metrics.json").read_text())["history"]
    losses = {k: v for k, v in history.items() if k.endswith("_loss")}
    expected = {"prompt_only": {"train/sr_loss"}, "params_only": {"train/task_loss"},
                "gumbel": {"train/task_loss"}}.get(name, {"train/task_loss", "train/sr_loss"})
    assert set(losses) == expected and all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    torch.manual_seed(0)
    start = build_metatuner(cfg).trainable_state()
    saved = load_file(str(out / "model" / "metatuner.safetensors"))
    moved = [k for k in saved if k in start and not torch.equal(saved[k], start[k])]
    assert moved, "no trained weight differs from its initial value"


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_saves_and_reloads_everything_it_trained(trained, name):
    cfg, out = trained(name)
    saved = load_file(str(out / "model" / "metatuner.safetensors"))
    mt = MetaTuner.from_pretrained(out)
    state = mt.trainable_state()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert mt.generate([QUESTION], max_new_tokens=4) == MetaTuner.from_pretrained(out).generate([QUESTION],
                                                                                                max_new_tokens=4)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_exports_the_actors_lora(trained, tiny_dir, tiny_dir_2layers, tmp_path, name):
    """The exported adapter on M reproduces the actor's log-likelihood under the query's LoRA; a variant without
    a parameter decoder refuses to export, naming the setting."""
    cfg, out = trained(name)
    mt = MetaTuner.from_pretrained(out)
    if not cfg.metatuner.use_hyper:
        with pytest.raises(ValueError, match="use_hyper"):
            mt.export_adapter(QUESTION, tmp_path / "ad", str(tiny_dir))
        return
    m_dir = tiny_dir_2layers if name == "full" else tiny_dir
    mt.export_adapter(QUESTION, tmp_path / "ad", str(m_dir))
    prompt = (tmp_path / "ad" / "metatuner_prompt.txt").read_text().rstrip("\n")
    chat = chat_prompt(mt.m_tok, mt.task.messages(prompt, Example(id="q", question=QUESTION, answer="", target="")))
    _, h = mt.write_all([QUESTION])
    ours = mt.score([chat], ["The answer is 3."], mt.hyper(h))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(m_dir), tmp_path / "ad").eval()
    theirs = score_targets(peft_model, mt.m_tok, [chat], ["The answer is 3."])
    assert abs(ours[0][0] - theirs[0][0]) < 1e-3
