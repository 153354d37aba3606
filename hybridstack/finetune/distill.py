"""Distillation (``finetune.teacher``): soft labels from the teacher's fold-k model.

Student fold k trains on the rows outside fold k with targets
``(1 - teacher_weight) * Y + teacher_weight * P_k``, where ``P_k`` is the prediction of the
teacher's **fold-k** model (trained without fold k, like the student) on those rows. Never
the teacher's out-of-fold predictions: for a row outside fold k they come from a teacher
model that saw fold k's labels, which would leak them into student fold k's validation.

The teacher is a finished fine-tuned model of the same experiment (full or LoRA); its
fold models are rebuilt here from ``fold_<k>/best/`` and its saved settings, and its rows
are rendered with its own tokenizer, budget and swap TTA.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from hybridstack.errors import HybridstackError
from hybridstack.finetune import lora
from hybridstack.finetune.data import EncodedRows, make_renderer, split_views
from hybridstack.finetune.loop import predict_views
from hybridstack.finetune.model import load_tokenizer, load_trained
from hybridstack.runs import ModelDir, read_json
from hybridstack.tasks import Dataset, Task

log = logging.getLogger(__name__)


def check_teacher(teacher: ModelDir, student_name: str, folds: list[int]) -> dict[str, Any]:
    """The teacher's config.json; one error line when it cannot teach these folds."""
    key = f"finetune.teacher = {teacher.name!r}"
    if teacher.name in ("stack", student_name):
        why = ("the stack is fitted on the base models' OOF after them, it cannot teach one"
               if teacher.name == "stack" else "a model cannot be its own teacher")
        raise HybridstackError(f"{key}: {why}; name another finished base model")
    if not teacher.is_done():
        raise HybridstackError(f"{key}: models/{teacher.name} is not a finished model (no DONE); "
                               "run its stage first")
    config = read_json(teacher.config_path)
    if config.get("stage") != "finetune":
        raise HybridstackError(
            f"{key}: models/{teacher.name} is a {config.get('stage')} model; the teacher must be "
            "a fine-tuned transformer of this experiment (its fold models are reloaded)")
    trained = {int(k) for k in teacher.load_scores()["per_fold"]}
    missing = sorted(set(folds) - trained)
    if missing:
        raise HybridstackError(
            f"{key}: the teacher has no fold model for fold(s) {missing} (trained: "
            f"{sorted(trained)}); each student fold learns from the teacher's model of the same "
            "fold, so train the teacher on those folds or restrict finetune.folds")
    return config


def soft_targets(accelerator: Accelerator, teacher: ModelDir, config: dict[str, Any], task: Task,
                 rows: Dataset, fold: int) -> np.ndarray:
    """(n, C) float32: the teacher's fold-``fold`` model on ``rows`` (its swap TTA included)."""
    settings = config["settings"]
    best = teacher.fold_dir(fold) / "best"
    where = f"finetune.teacher models/{teacher.name} fold {fold}"
    decoder = settings.get("backbone") == "decoder"
    tokenizer = load_tokenizer(best, key=where)
    if decoder:
        lora.prepare_tokenizer(tokenizer)
    shares = tuple(settings["segment_budget"]) if len(task.field_names) > 1 else (1.0,)
    renderer = make_renderer(tokenizer, task.field_names, shares, settings["max_length"],
                             settings["head_fraction"], decoder)
    tta = settings["swap_tta"] and task.swap_fields is not None
    store = renderer.render_store(rows.fields, task.swap_fields if tta else None, rows.turns)
    views = [EncodedRows(view) for view in split_views(store, tta)]
    if settings.get("method", "full") == "lora":
        base_id = read_json(best / lora.BASE_FILE)["model"]
        model, _ = lora.load_adapter_models([best], lora.find_base(base_id, where),
                                            settings.get("quantization"), where,
                                            accelerator.device)
    else:
        model = load_trained(best).to(accelerator.device)
    log.info("fold %d: soft labels of %d rows from models/%s fold %d", fold, len(views[0]),
             teacher.name, fold)
    pred = predict_views(accelerator, model, views, task.swap_permutation if tta else None,
                         tokenizer, settings["eval_batch_size"], task.kind == "multilabel")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return pred
