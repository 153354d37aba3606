"""Decoder backbones and LoRA / QLoRA adapters for the fine-tune (``finetune.method = "lora"``).

- Decoders (Llama, Gemma-2, Qwen2, Mistral) go through ``AutoModelForSequenceClassification``
  like encoders: :func:`prepare_tokenizer` gives their tokenizer a pad token (unk, else eos)
  and right padding, and ``pad_token_id`` goes into the model config, since the head pools
  the last non-pad token (rows are rendered by :class:`~hybridstack.finetune.data.TurnRenderer`
  so that token is never an eos).
- LoRA: the base stays frozen in its storage dtype (fp16/bf16; fp16 is float32 on a CPU) or
  in 4/8-bit through bitsandbytes on CUDA, and every trainable parameter (adapters and the
  ``modules_to_save`` head, which peft would leave in the base's fp16) is float32.
- ``best/`` holds the adapters and head (``adapter_config.json``, ``adapter_model.safetensors``),
  the tokenizer, the head's label settings and :data:`BASE_FILE`: the base model's id and a
  cheap fingerprint (config + safetensors headers and sizes) that predict checks.

peft is imported only here, only when a LoRA model is built or loaded: without the ``llm``
extra the package works, and ``method = "lora"`` says which extra to install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch

from hybridstack.errors import HybridstackError
from hybridstack.models import find_in_input_root, find_model
from hybridstack.runs import read_json, write_json

log = logging.getLogger(__name__)

LLM_EXTRA = "pip install 'hybridstack[llm]'"
BASE_FILE = "base_model.json"  # in best/: the base model's id and fingerprint
HEAD_FILE = "classifier.json"  # in best/: labels, problem type, pad token of the head
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# predict: a folder to use as the base of every LoRA model (``predict --base-model``), and a
# quantization to load it with (``predict --quantization``); environment variables, so the
# processes of a multi-GPU predict see them too
BASE_MODEL_ENV = "HYBRIDSTACK_BASE_MODEL"
QUANTIZATION_ENV = "HYBRIDSTACK_PREDICT_QUANTIZATION"

DECODER_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                           "gemma3_text", "phi3"})
_DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Per model family: attention and MLP projections (never the pooler, which is in the head).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _DECODER_TARGETS for t in DECODER_TYPES},
    "bert": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "xlm-roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "electra": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def require_peft():
    try:
        import peft
    except ImportError:
        raise HybridstackError(
            f'finetune.method = "lora" needs peft, in the llm extra: {LLM_EXTRA}') from None
    return peft


def model_config(path: Path) -> dict[str, Any]:
    config = Path(path) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}


def is_decoder(path: Path) -> bool:
    """Whether the model folder holds a decoder LM (pools the last token, needs a pad token)."""
    return model_config(path).get("model_type") in DECODER_TYPES


def prepare_tokenizer(tokenizer):
    """A decoder's tokenizer with a pad token (its unk, else its eos) that pads on the right.

    Right padding keeps every row's positions independent of the batch it is in. With pad =
    eos a trailing eos would count as padding: the decoder rendering never ends with one.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = (tokenizer.unk_token if tokenizer.unk_token is not None
                               else tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def storage_dtype(path: Path) -> torch.dtype:
    name = model_config(path).get("dtype") or model_config(path).get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def base_dtype(path: Path, on_cuda: bool) -> torch.dtype:
    """The frozen base's dtype: its storage dtype; float16 becomes float32 on a CPU."""
    dtype = storage_dtype(path)
    if dtype not in (torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float32 if dtype == torch.float16 and not on_cuda else dtype


def quantization_config(quantization: str | None, on_cuda: bool, key: str = "finetune.quantization"):
    """A BitsAndBytesConfig for ``"4bit"`` (NF4, double quantization) or ``"8bit"``; None for None."""
    if quantization is None:
        return None
    if not on_cuda:
        raise HybridstackError(
            f'{key} = "{quantization}" loads the base through bitsandbytes, which needs a CUDA '
            "GPU; on a CPU remove it (LoRA then trains on the unquantized base)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise HybridstackError(
            f'{key} = "{quantization}" needs bitsandbytes, in the llm extra: {LLM_EXTRA}') from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def _load_kwargs(quantization: str | None, key: str) -> dict[str, Any]:
    on_cuda = torch.cuda.is_available()
    quant = quantization_config(quantization, on_cuda, key)
    if quant is None:
        return {}
    # each data-parallel process holds its own quantized copy on its own GPU
    return {"quantization_config": quant,
            "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def head_modules(model: torch.nn.Module) -> list[str]:
    """The classifier's own top-level modules (everything with weights but the backbone)."""
    return [name for name, child in model.named_children()
            if name != model.base_model_prefix and any(True for _ in child.parameters())]


def default_targets(model_type: str) -> list[str]:
    if model_type not in DEFAULT_TARGETS:
        raise HybridstackError(
            f"finetune.lora.target_modules: no default for model type {model_type!r}; name the "
            "linear layers to adapt, e.g. target_modules = [\"q_proj\", \"v_proj\"]")
    return list(DEFAULT_TARGETS[model_type])


def _is_adapter_param(name: str) -> bool:
    return "lora_" in name or "modules_to_save." in name


def float32_adapters(model: torch.nn.Module) -> None:
    """Adapters and head copies in float32 (peft keeps a modules_to_save head in the base's dtype,
    and fp16 trainable weights make GradScaler fail: "Attempting to unscale FP16 gradients")."""
    for name, param in model.named_parameters():
        if _is_adapter_param(name) and param.dtype != torch.float32:
            param.data = param.data.float()


def _to_float32(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def cast_head_inputs(model: torch.nn.Module, heads: list[str]) -> None:
    """Feed the float32 head float32 hidden states (a half-precision base outside autocast)."""
    for name in heads:
        module = model.get_submodule(name)
        if not getattr(module, "_hybridstack_cast", False):
            module.register_forward_pre_hook(_to_float32)
            module._hybridstack_cast = True


def _find_heads(model) -> list[str]:
    """Dotted names of the head modules inside a (peft-wrapped) classifier."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = "base_model.model." if base is not model else ""
    return [prefix + name for name in head_modules(base)]


def enable_checkpointing(model) -> None:
    """Non-reentrant checkpointing, and embeddings output requiring grad: with a frozen base,
    reentrant checkpointing would give the adapters no gradient at all."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights count as stored elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def build_lora_classifier(path: Path, label_names: list[str], multilabel: bool, cfg,
                          pad_token_id: int | None):
    """The frozen base (storage dtype or 4/8-bit) with LoRA adapters and a float32 head.

    Parameters
    ----------
    path : the base model folder.
    cfg : the FinetuneConfig (``lora``, ``quantization``, ``dropout``, ``gradient_checkpointing``).
    pad_token_id : written into the model config (decoders pool the last non-pad token).
    """
    from hybridstack.finetune.model import load_classifier

    peft = require_peft()
    kwargs = _load_kwargs(cfg.quantization, "finetune.quantization")
    model = load_classifier(path, label_names, multilabel, cfg.dropout,
                            attention_dropout=cfg.attention_dropout,
                            dtype=base_dtype(path, torch.cuda.is_available()),
                            pad_token_id=pad_token_id, **kwargs)
    if kwargs:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    heads = head_modules(model)
    targets = cfg.lora.target_modules or default_targets(model.config.model_type)
    lora_config = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                  lora_dropout=cfg.lora.dropout, target_modules=targets,
                                  modules_to_save=heads, task_type=peft.TaskType.SEQ_CLS)
    try:
        model = peft.get_peft_model(model, lora_config)
    except ValueError as err:
        raise HybridstackError(f"finetune.lora.target_modules = {targets}: "
                               f"{' '.join(str(err).split())[:300]}") from None
    float32_adapters(model)
    cast_head_inputs(model, _find_heads(model))
    trainable, total = count_parameters(model)
    log.info("LoRA r=%d on %s: %d trainable parameters of %d (%.2f%%)", cfg.lora.r,
             ",".join(targets), trainable, total, 100 * trainable / max(total, 1))
    return model


def adapter_only_checkpoints(accelerator) -> None:
    """Resume checkpoints (``last/``) of a LoRA fold hold the adapters and head, not the frozen
    base (18 GB for a 9B model at every epoch); ``FoldCheckpoints(partial_model=True)`` loads
    them back non-strictly. Registered once per Accelerator."""
    if getattr(accelerator, "_hybridstack_adapter_hook", False):
        return

    def keep_adapters(models, weights, output_dir) -> None:
        for state in weights:
            if any(_is_adapter_param(k) for k in state):
                for key in [k for k in state if not _is_adapter_param(k)]:
                    del state[key]

    accelerator.register_save_state_pre_hook(keep_adapters)
    accelerator._hybridstack_adapter_hook = True


# -- best/: the adapters, the head, and which base they belong to ------------------------------


def base_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a base model without reading its weights: the config, and every
    safetensors file's size and header (tensor names, dtypes, shapes, offsets)."""
    path = Path(path)
    config = model_config(path)
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    files = {}
    for weights in sorted(path.glob("*.safetensors")):
        with weights.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(n)
        files[weights.name] = {"size": weights.stat().st_size,
                               "header_sha256": hashlib.sha256(header).hexdigest()}
    blob = json.dumps(config, sort_keys=True).encode()
    return {"config_sha256": hashlib.sha256(blob).hexdigest(), "safetensors": files}


def save_adapter(model, tokenizer, folder: Path, base_id: str, base_path: Path) -> None:
    """Write the adapters + head, the tokenizer, the head settings and the base's identity."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    config = model.get_base_model().config
    write_json(folder / HEAD_FILE, {"label_names": [config.id2label[i] for i in range(config.num_labels)],
                                    "multilabel": config.problem_type == "multi_label_classification",
                                    "pad_token_id": config.pad_token_id})
    write_json(folder / BASE_FILE, {"model": base_id, "fingerprint": base_fingerprint(base_path)})


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_FILES[0]).is_file()


def load_adapter_weights(model, folder: Path) -> None:
    """Put ``folder``'s adapters and head into an in-memory peft model (the best epoch)."""
    from safetensors.torch import load_file

    peft = require_peft()
    weights = load_file(str(Path(folder) / ADAPTER_FILES[1]))
    result = peft.set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if _is_adapter_param(k)]
    if missing:
        raise HybridstackError(f"{folder}: adapter weights that fit no module ({missing[0]}, ...)")


def find_base(base_id: str, where: str) -> Path:
    """The base model folder of a LoRA model: ``$HYBRIDSTACK_BASE_MODEL`` (predict --base-model),
    else the model lookup of the recorded id (a local folder, the HF cache, the input root;
    for a folder of the training machine, its name under the input root)."""
    override = os.environ.get(BASE_MODEL_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if not (path / "config.json").is_file():
            raise HybridstackError(f"--base-model {override}: no config.json there; point it at "
                                   "the base model folder the adapters were trained on")
        return path
    found = find_model(base_id)
    if found is None and ("/" in base_id or base_id.startswith((".", "~"))):
        found = find_in_input_root(Path(base_id).name)
    if found is None or not (found / "config.json").is_file():
        raise HybridstackError(
            f"{where}: base model {base_id!r} not found (tried the folder, the Hugging Face cache "
            "and the input root); attach it, or pass --base-model FOLDER")
    return found


def check_base(folder: Path, base_path: Path, where: str) -> dict[str, Any]:
    """The recorded base of ``folder``; one error line when ``base_path`` is another model."""
    recorded = read_json(Path(folder) / BASE_FILE)
    now = base_fingerprint(base_path)
    want = recorded["fingerprint"]
    if now != want:
        changed = sorted(k for k in set(now["safetensors"]) | set(want["safetensors"])
                         if now["safetensors"].get(k) != want["safetensors"].get(k))
        what = ("config.json" if now["config_sha256"] != want["config_sha256"]
                else "weight files " + ", ".join(changed))
        raise HybridstackError(
            f"{where}: {base_path} is not the base model the adapters were trained on "
            f"({recorded['model']}; its {what} differ); pass --base-model with the original folder")
    return recorded


def load_adapter_models(best_dirs: list[Path], base_path: Path, quantization: str | None,
                        where: str, device: torch.device):
    """The base once, with every fold's adapters (named ``fold_<i>``), ready to predict.

    Returns ``(model, names)``: call ``model.set_adapter(name)`` before each fold's
    predictions. A single unquantized fold is merged into the base (faster, same numbers
    within float rounding); quantized bases keep their adapters unmerged.
    """
    from hybridstack.finetune.model import load_classifier

    peft = require_peft()
    for folder in best_dirs:
        check_base(folder, base_path, where)
    head = read_json(best_dirs[0] / HEAD_FILE)
    kwargs = _load_kwargs(quantization, f"{where}: --quantization")
    base = load_classifier(base_path, head["label_names"], head["multilabel"], key=where,
                           dtype=base_dtype(base_path, torch.cuda.is_available()),
                           pad_token_id=head["pad_token_id"], **kwargs)
    names = [f"fold_{i}" for i in range(len(best_dirs))]
    model = peft.PeftModel.from_pretrained(base, str(best_dirs[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], best_dirs[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    float32_adapters(model)
    if not kwargs:
        model = model.to(device)
    if len(names) == 1 and not kwargs:
        model = model.merge_and_unload()
        cast_head_inputs(model, head_modules(model))
        return model.eval(), None
    cast_head_inputs(model, _find_heads(model))
    return model.eval(), names
