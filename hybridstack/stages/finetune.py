"""Stage finetune: full fine-tuning of a transformer classifier per fold, on 1..N devices.

Writes ``models/<name>/`` like every base model (oof.npy, test.npy, scores.json,
config.json, DONE), plus ``fold_<k>/best/`` (the best epoch, save_pretrained) and
``fold_<k>/pred.npz`` (the finished fold's predictions, so a re-run skips it).
Run data-parallel with ``hybridstack run finetune -c cfg.toml --num-processes N``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from hybridstack.config import Config, FinetuneConfig
from hybridstack.errors import HybridstackError
from hybridstack.experiment import Experiment
from hybridstack.finetune import distill, lora
from hybridstack.finetune.checkpoint import FoldCheckpoints
from hybridstack.finetune.data import EncodedRows, TokenFeaturizer, split_views
from hybridstack.finetune.loop import FoldInputs, FoldOutcome, train_fold
from hybridstack.finetune.model import load_tokenizer, resolve_mixed_precision
from hybridstack.finetune.token_store import TokenStore, as_token_store
from hybridstack.folds import fold_rows
from hybridstack.heads.base import FoldStore, OOFAccumulator, OOFResult
from hybridstack.models import EMBEDDED_MINILM, resolve_model
from hybridstack.runs import FEATURIZER_FILE, ModelDir, write_joblib, write_json
from hybridstack.stages.common import (
    save_model_outputs,
    skip_if_done,
    stage_experiment,
    stage_main,
    write_best_submission,
)
from hybridstack.tasks import swapped_targets

log = logging.getLogger(__name__)

# Settings that never change a fold's result: editing them reuses finished folds.
_NOT_HASHED = {"enabled", "folds", "num_workers"}
# Keys added after the first release: hashed only when they differ from their default, so a
# run finished by an older hybridstack keeps its hash (and is not refitted) after an upgrade.
_HASHED_WHEN_SET = {"attention_dropout": None, "method": "full", "quantization": None,
                    "teacher": None, "teacher_weight": 0.5}
# Hashed only with method = "lora" (a full fine-tune never reads them).
_LORA_ONLY = ("lora",)
# models/<name>/tokens/<key>/{train,test}/: the rendered rows, shared by every rank while
# the model trains (a resumed run reuses them); removed once the model's DONE is written.
TOKENS_DIR = "tokens"
_COMPLETE = "COMPLETE"  # written last: a folder without it is a cut-off write


def model_folder_name(cfg: FinetuneConfig) -> str:
    """``finetune.name``, else derived from the model: microsoft/deberta-v3-small -> deberta_v3_small."""
    if cfg.name:
        return cfg.name
    if cfg.model == EMBEDDED_MINILM:
        return "minilm"
    leaf = cfg.model.rstrip("/").split("/")[-1]
    return re.sub(r"[^0-9a-z]+", "_", leaf.lower()).strip("_") or "finetune"


def fold_config_hash(exp: Experiment, num_processes: int = 1, *,
                     with_precision: bool = True) -> str:
    """What a finished model depends on: the data, the training settings and the process count.

    ``num_processes`` changes the global batch (batch_size is per device), so it is part of
    the hash. ``with_precision=False`` gives the hash of a finished fold's predictions: a fold
    that diverged in fp16 may be re-run with ``mixed_precision = "no"`` while the folds that
    finished keep their results.
    """
    settings = exp.cfg.finetune.model_dump(mode="json", exclude=_NOT_HASHED)
    if settings.get("method") == "full":
        for key in _LORA_ONLY:
            settings.pop(key, None)
    if settings.get("teacher") is None:
        settings.pop("teacher_weight", None)
    else:  # a refitted teacher refits its students
        teacher = exp.dir.model(settings["teacher"])
        settings["teacher_done"] = (teacher.done_path.read_text().strip()
                                    if teacher.done_path.is_file() else None)
    for key, default in _HASHED_WHEN_SET.items():
        if settings.get(key) == default:
            settings.pop(key)
    if num_processes > 1:
        settings["num_processes"] = num_processes
    settings.update(exp.cfg.cv.early_stopping_settings())  # the best epoch's rows
    if not with_precision:
        settings.pop("mixed_precision")
    return exp.settings_hash(settings)


def run(exp: Experiment | Config) -> None:
    """Fine-tune every configured fold; on N processes each one gets the same ``exp``
    (the pipeline's snapshot), so no process re-reads the inputs or writes the folds."""
    exp = stage_experiment(exp, "finetune")
    if exp is None:
        return
    ft = exp.cfg.finetune
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(ft.mixed_precision),
                              gradient_accumulation_steps=ft.grad_accum)
    model_dir = exp.dir.model(model_folder_name(ft))
    n_procs = accelerator.num_processes
    fold_hash = fold_config_hash(exp, n_procs, with_precision=False)
    run_folds = _folds_to_run(ft, exp.n_splits)
    done_hash = f"{fold_config_hash(exp, n_procs)}-folds{'_'.join(map(str, run_folds))}"
    already_done = model_dir.is_done(done_hash)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and skip_if_done(model_dir, done_hash):
        write_best_submission(exp)
    if already_done:
        if accelerator.is_main_process:
            remove_token_cache(model_dir.path)
        return

    model_path = resolve_model(ft.model, "finetune.model")
    if ft.method == "lora":
        lora.require_peft()  # one line naming the extra, before anything is tokenised
    if ft.quantization is not None:
        if ft.method != "lora":
            raise HybridstackError(f'finetune.quantization = "{ft.quantization}" trains only '
                                   'adapters on a frozen base: set finetune.method = "lora"')
        lora.quantization_config(ft.quantization, torch.cuda.is_available())
    teacher = None
    if ft.teacher is not None:
        teacher_dir = exp.dir.model(ft.teacher)
        teacher = (teacher_dir, distill.check_teacher(teacher_dir, model_dir.name, run_folds))
    decoder = lora.is_decoder(model_path)
    tokenizer = load_tokenizer(model_path)
    if decoder:
        lora.prepare_tokenizer(tokenizer)
    views = shared_token_views(exp, accelerator, model_dir.path, tokenizer, decoder)
    result = train_folds(exp, accelerator, model_dir, model_path, tokenizer, views, run_folds,
                         fold_hash, teacher)
    if accelerator.is_main_process:
        settings = {**ft.model_dump(mode="json"), "model_path": str(model_path),
                    "mixed_precision": accelerator.mixed_precision,
                    "num_processes": accelerator.num_processes,
                    "backbone": "decoder" if decoder else "encoder"}
        write_joblib(model_dir.path / FEATURIZER_FILE, token_featurizer(exp, decoder))
        save_model_outputs(exp, model_dir, result, settings, done_hash, stage="finetune")
        write_best_submission(exp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # after DONE: the finished run keeps no token cache
        remove_token_cache(model_dir.path)
    accelerator.end_training()


def _folds_to_run(ft: FinetuneConfig, n_splits: int) -> list[int]:
    folds = list(range(n_splits)) if ft.folds is None else sorted(set(ft.folds))
    bad = [k for k in folds if not 0 <= k < n_splits]
    if bad or not folds:
        raise HybridstackError(
            f"finetune.folds = {ft.folds}: folds must be in 0..{n_splits - 1} (cv.n_splits = {n_splits})"
        )
    return folds


def token_featurizer(exp: Experiment, decoder: bool = False) -> TokenFeaturizer:
    return TokenFeaturizer.from_settings(exp.cfg.finetune.model_dump(mode="json"),
                                         exp.task.field_names, exp.task.swap_fields, decoder)


def encode_experiment(exp: Experiment, tokenizer,
                      decoder: bool = False) -> dict[str, TokenStore | None]:
    """Token ids of train and test rows, and of their A/B-swapped views (pairwise).

    Each split is one :class:`TokenStore` (rows, then swapped rows); the views are slices of it.
    """
    featurizer = token_featurizer(exp, decoder)
    stores = {"train": featurizer.render_store(tokenizer, exp.train.fields, exp.train.turns)}
    if exp.test is not None:
        stores["test"] = featurizer.render_store(tokenizer, exp.test.fields, exp.test.turns)
    return views_of(stores, featurizer.swap is not None)


def views_of(stores: dict[str, TokenStore], swapped: bool) -> dict[str, TokenStore | None]:
    """``train``, ``train_swapped``, ``test``, ``test_swapped`` (None where absent)."""
    views = {}
    for split in ("train", "test"):
        parts = split_views(stores[split], swapped) if split in stores else [None]
        views[split] = parts[0]
        views[f"{split}_swapped"] = parts[1] if len(parts) > 1 else None
    return views


def token_cache_key(exp: Experiment, tokenizer, decoder: bool) -> str:
    """What the rendered rows depend on: the featurizer settings, the tokenizer, the data."""
    blob = json.dumps({"featurizer": asdict(token_featurizer(exp, decoder)),
                       "tokenizer": tokenizer_fingerprint(tokenizer),
                       "data": exp.fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, special tokens and class (its ids depend on them)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([tokenizer.all_special_tokens, tokenizer.all_special_ids,
                              tokenizer.bos_token_id, tokenizer.eos_token_id,
                              tokenizer.cls_token_id, tokenizer.sep_token_id]).encode())
    return digest.hexdigest()[:16]


def shared_token_views(exp: Experiment, accelerator: Accelerator, model_path: Path, tokenizer,
                       decoder: bool) -> dict[str, TokenStore | None]:
    """The experiment's token views, rendered once by the main process and memory-mapped by all.

    The main process renders train and test into ``tokens/<key>/`` (unless a run cut off
    earlier already did); the other ranks wait for it, then every rank maps the same files,
    so N ranks hold one copy of the ids in the page cache instead of N rendered copies.
    """
    key = token_cache_key(exp, tokenizer, decoder)
    folder = model_path / TOKENS_DIR / key
    with accelerator.main_process_first():
        if not (folder / _COMPLETE).is_file():
            if not accelerator.is_main_process:  # the main process could not write it
                return encode_experiment(exp, tokenizer, decoder)
            write_token_cache(folder, exp, tokenizer, decoder)
        else:
            log.info("token ids rendered earlier, reused from %s", folder)
        stores = {split: TokenStore.load(folder / split)
                  for split in ("train", "test") if (folder / split).is_dir()}
    return views_of(stores, token_featurizer(exp, decoder).swap is not None)


def write_token_cache(folder: Path, exp: Experiment, tokenizer, decoder: bool) -> None:
    """Render train and test into ``folder`` (other keys' folders removed: stale settings)."""
    remove_token_cache(folder.parent.parent)
    featurizer = token_featurizer(exp, decoder)
    splits = {"train": exp.train} if exp.test is None else {"train": exp.train, "test": exp.test}
    for split, ds in splits.items():
        featurizer.render_store(tokenizer, ds.fields, ds.turns).save(folder / split)
    (folder / _COMPLETE).write_text("")


def remove_token_cache(model_path: Path) -> None:
    shutil.rmtree(model_path / TOKENS_DIR, ignore_errors=True)


def fold_inputs(exp: Experiment, views: dict, fold: int,
                soft: Callable[[np.ndarray], np.ndarray] | None = None) -> FoldInputs:
    """The training rows (subsampled, swap-augmented) and prediction views of one fold.

    ``soft(train_rows)`` (distillation): the teacher's fold model on those rows, mixed into
    the targets with ``finetune.teacher_weight``.
    """
    ft, task, Y = exp.cfg.finetune, exp.task, exp.train.Y
    train_rows, valid_rows = fold_rows(exp.folds, fold)
    split = exp.early_stopping_split()
    stop_rows = None
    if split is not None:  # the best epoch is chosen on rows outside the held-out fold
        train_rows, stop_rows = split(fold)
    if ft.max_train_rows is not None and ft.max_train_rows < len(train_rows):
        rng = np.random.default_rng(ft.seed + fold)
        train_rows = np.sort(rng.choice(train_rows, ft.max_train_rows, replace=False))
    views = {name: None if view is None else as_token_store(view) for name, view in views.items()}
    ids = views["train"].take(train_rows)
    targets = Y[train_rows]
    if soft is not None:
        w = ft.teacher_weight
        targets = ((1 - w) * targets + w * soft(train_rows)).astype(np.float32)
    if ft.swap_augment and views["train_swapped"] is not None:
        # both halves index the same flat ids: no copy of the token ids
        ids = TokenStore.concat([ids, views["train_swapped"].take(train_rows)])
        targets = np.concatenate([targets, swapped_targets(targets, task.swap_permutation)])
    tta = ft.swap_tta and views["train_swapped"] is not None
    test_views = None if views["test"] is None else prediction_views(views, "test", None, tta)
    return FoldInputs(EncodedRows(ids, targets), prediction_views(views, "train", valid_rows, tta),
                      Y[valid_rows], test_views, task.swap_permutation if tta else None,
                      stop_views=None if stop_rows is None else prediction_views(
                          views, "train", stop_rows, tta),
                      Y_stop=None if stop_rows is None else Y[stop_rows])


def prediction_views(views: dict, split: str, rows: np.ndarray | None,
                     tta: bool) -> list[EncodedRows]:
    """``rows`` of ``split`` (all when None) in the original view, and swapped under TTA."""
    names = [split, f"{split}_swapped"] if tta else [split]
    return [EncodedRows(views[name] if rows is None else as_token_store(views[name]).take(rows))
            for name in names]


def train_folds(exp: Experiment, accelerator: Accelerator, model_dir: ModelDir, model_path,
                tokenizer, views: dict, run_folds: list[int], fold_hash: str,
                teacher: tuple[ModelDir, dict] | None = None) -> OOFResult:
    """Train (or load) each fold; OOF rows of untrained folds stay NaN.

    Finished folds are keyed by ``fold_hash`` (precision aside); a resume checkpoint also
    by the precision, since its grad-scaler state belongs to it.
    """
    store = FoldStore(model_dir.path, fold_hash)
    resume_hash = fold_config_hash(exp, accelerator.num_processes)
    folds_done = OOFAccumulator(exp.train.Y, exp.folds, exp.task.score)
    seconds = 0.0
    for k in run_folds:
        saved = store.load(k)
        if saved is not None:
            log.info("fold %d: finished earlier, loaded from %s", k, model_dir.fold_dir(k))
            outcome = FoldOutcome(*saved)
        else:
            soft = None
            if teacher is not None:
                def soft(rows, k=k):
                    return distill.soft_targets(accelerator, *teacher, exp.task,
                                                exp.train.subset(rows), k)
            inputs = fold_inputs(exp, views, k, soft)
            outcome = train_fold(accelerator, exp.cfg.finetune, exp.task, model_path, tokenizer,
                                 inputs, model_dir.fold_dir(k), resume_hash, k)
            if accelerator.is_main_process:
                save_fold_predictions(store, k, outcome)
            FoldCheckpoints(accelerator, model_dir.fold_dir(k), resume_hash).clear_last()
        fold_score = folds_done.add(k, outcome.valid_pred, outcome.test_pred,
                                    {"seconds": outcome.info["seconds"],
                                     "best_iteration": outcome.info["best_iteration"]})
        seconds += outcome.info["seconds"]
        log.info("fold %d: %s %.5f (best epoch %d)", k, exp.task.metric_name, fold_score,
                 outcome.info["best_iteration"])
    return folds_done.result(seconds)


def save_fold_predictions(store: FoldStore, fold: int, outcome: FoldOutcome) -> None:
    """``fold_<k>/history.json`` (per-epoch loss, score, speed), then the fold's ``pred.npz``."""
    write_json(store.model_path / f"fold_{fold}" / "history.json", outcome.info["history"])
    store.save_predictions(fold, outcome.valid_pred, outcome.test_pred, outcome.info)


if __name__ == "__main__":
    stage_main("finetune", run)
