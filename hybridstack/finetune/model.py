"""Loading the backbone and tokenizer, the optimizer, the loss and the precision choice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from hybridstack.errors import HybridstackError, one_line

log = logging.getLogger(__name__)

# Config attributes of common encoders (BERT, DeBERTa-v2/v3, RoBERTa, ELECTRA, DistilBERT).
# ``finetune.dropout`` sets the hidden-state and classifier-head rates; attention dropout has
# its own key (``finetune.attention_dropout``); anything else (e.g. DeBERTa's pooler_dropout)
# keeps the checkpoint's value.
HIDDEN_DROPOUT_ATTRS = ("hidden_dropout_prob", "dropout")  # DistilBERT calls it "dropout"
CLASSIFIER_DROPOUT_ATTRS = ("classifier_dropout", "cls_dropout", "seq_classif_dropout")
ATTENTION_DROPOUT_ATTRS = ("attention_probs_dropout_prob", "attention_dropout")
# DeBERTa reads cls_dropout with getattr (absent from its config class): set it explicitly.
_EXPLICIT_CLASSIFIER_ATTR = {"deberta-v2": "cls_dropout", "deberta": "cls_dropout"}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# Files one of which every saved Hugging Face tokenizer has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spm.model", "vocab.txt",
                   "vocab.json", "sentencepiece.bpe.model")


def load_tokenizer(path: Path, key: str = "finetune.model"):
    """The tokenizer saved in ``path``; one error line when there is none that loads."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would silently build an empty-vocabulary tokenizer from config.json
        raise HybridstackError(
            f"{key}: no tokenizer files in {path} (looked for {', '.join(TOKENIZER_FILES)}); "
            "save one there with tokenizer.save_pretrained"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # transformers raises many types for a broken/missing tokenizer
        if (path / "spm.model").is_file() and "tiktoken" in str(err):
            # transformers converts a sentencepiece-only tokenizer (DeBERTa-v3 on the Hub)
            # with protobuf; without it the error misleadingly asks for tiktoken
            raise HybridstackError(
                f"{key}: {path} has only spm.model, and converting it needs protobuf; "
                "pip install protobuf (it is a hybridstack dependency: reinstall hybridstack)"
            ) from None
        raise HybridstackError(
            f"{key}: cannot load a tokenizer from {path} ({type(err).__name__}: "
            f"{one_line(str(err))[:200]}); save one there with tokenizer.save_pretrained"
        ) from None


def set_dropout(config, dropout: float | None, attention_dropout: float | None) -> None:
    """Override the hidden/classifier dropout and, separately, the attention dropout."""
    groups = [(dropout, HIDDEN_DROPOUT_ATTRS + CLASSIFIER_DROPOUT_ATTRS),
              (attention_dropout, ATTENTION_DROPOUT_ATTRS)]
    for rate, attrs in groups:
        if rate is None:
            continue
        for attr in attrs:
            if hasattr(config, attr):
                setattr(config, attr, rate)
    explicit = _EXPLICIT_CLASSIFIER_ATTR.get(getattr(config, "model_type", ""))
    if dropout is not None and explicit:
        setattr(config, explicit, dropout)


def load_trained(path: Path):
    """A fine-tuned classifier folder (``best/``) in float32, whatever dtype it was stored in."""
    return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)


def load_classifier(path: Path, label_names: list[str], multilabel: bool,
                    dropout: float | None = None, key: str = "finetune.model",
                    attention_dropout: float | None = None, dtype: torch.dtype = torch.float32,
                    pad_token_id: int | None = None, **load_kwargs):
    """AutoModelForSequenceClassification from ``path`` with a fresh head of C outputs.

    The weights are loaded in float32 whatever their stored dtype: the Hub's DeBERTa-v3
    checkpoints are float16, and fp16 master weights break mixed-precision training
    ("Attempting to unscale FP16 gradients"); autocast does the half-precision compute.

    Parameters
    ----------
    path : folder written by ``save_pretrained``.
    label_names : the C output columns (become id2label).
    multilabel : sigmoid/BCE problem type instead of softmax/cross-entropy.
    dropout : when given, the hidden-state and classifier-head dropout rate.
    attention_dropout : when given, the attention-probability dropout rate.
    dtype : float32 for a full fine-tune; a LoRA base keeps its storage dtype.
    pad_token_id : when given, written into the config (decoders pool the last non-pad token).
    load_kwargs : e.g. a bitsandbytes ``quantization_config`` and its ``device_map`` (QLoRA).
    """
    try:
        config = AutoConfig.from_pretrained(
            str(path), num_labels=len(label_names),
            problem_type="multi_label_classification" if multilabel else "single_label_classification",
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
        set_dropout(config, dropout, attention_dropout)
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        # a head fine-tuned for another label count is replaced, not an error
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), config=config, ignore_mismatched_sizes=True, dtype=dtype, **load_kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise HybridstackError(
            f"{key}: cannot load a sequence-classification model from {path} "
            f"({type(err).__name__}: {one_line(str(err))[:200]})"
        ) from None


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings only, never biases or LayerNorm (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def class_weights(Y: np.ndarray) -> np.ndarray:
    """Per-label BCE weights: inverse positive rate, normalised to sum to K (CleanSpeech).

    Parameters
    ----------
    Y : (n, K) 0/1 targets of the training rows.

    Returns
    -------
    (K,) float32 weights; a label with no positive counts as one positive in n rows.
    """
    rate = np.maximum(Y.mean(axis=0), 1.0 / len(Y))
    inverse = 1.0 / rate
    return (inverse / inverse.sum() * Y.shape[1]).astype(np.float32)


def make_loss(multilabel: bool, label_smoothing: float = 0.0,
              weights: np.ndarray | None = None) -> LossFn:
    """``loss(logits, Y)`` for float32 targets Y of shape (b, C).

    Single-label: cross-entropy with label smoothing (Y one-hot, or soft after swaps).
    Multilabel: binary cross-entropy, each label column scaled by ``weights`` (K,).
    """
    if not multilabel:
        return lambda logits, Y: F.cross_entropy(logits, Y, label_smoothing=label_smoothing)
    weight = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def weighted_bce(logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        w = None if weight is None else weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, Y, weight=w)

    return weighted_bce


def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Sigmoid per label (multilabel) or softmax over classes."""
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)


def resolve_mixed_precision(setting: str) -> str:
    """``auto``: bf16 on compute capability >= 8 (A100, H100), fp16 below (T4, V100), fp32 on CPU.

    An explicit fp16 on a machine without CUDA falls back to fp32 (CPU autocast is bf16 only).
    """
    if not torch.cuda.is_available():
        if setting == "fp16":
            log.warning("finetune.mixed_precision = fp16 needs a GPU; training in fp32 on CPU")
            return "no"
        return "no" if setting == "auto" else setting
    if setting != "auto":
        return setting
    major, _ = torch.cuda.get_device_capability()
    return "bf16" if major >= 8 else "fp16"
