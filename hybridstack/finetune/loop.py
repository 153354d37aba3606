"""The training loop of one fold, readable top to bottom (no Trainer subclassing).

:func:`train_fold` builds the model, optimizer and schedule, resumes from ``last/`` if
present, trains epoch by epoch with early stopping on the task metric, keeps the best
epoch in ``best/``, and returns validation and test predictions of that best model.
Every process of a data-parallel run executes the same code; predictions are gathered
by explicit row index, so the duplicate rows distributed samplers pad with never count.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from hybridstack.config import FinetuneConfig
from hybridstack.errors import HybridstackError
from hybridstack.finetune import lora
from hybridstack.finetune.checkpoint import FoldCheckpoints, TrainState
from hybridstack.finetune.data import (
    Collator,
    EncodedRows,
    LengthGroupedBatchSampler,
    sorted_batches,
)
from hybridstack.finetune.model import (
    LossFn,
    class_weights,
    load_classifier,
    load_trained,
    make_loss,
    optimizer_groups,
    probabilities,
)
from hybridstack.progress import progress
from hybridstack.tasks import Task, average_with_swapped

log = logging.getLogger(__name__)


@dataclass
class FoldInputs:
    """The encoded rows one fold trains and predicts on.

    ``valid_views`` / ``test_views`` hold the original view and, with swap test-time
    averaging, the A/B-swapped view whose columns ``permutation`` maps back.
    """

    train: EncodedRows  # targets set; swapped copies appended when augmenting
    valid_views: list[EncodedRows]
    Y_valid: np.ndarray  # (n_valid, C)
    test_views: list[EncodedRows] | None = None
    permutation: list[int] | None = None
    # the rows the best epoch is chosen on (an inner split of the training rows); None:
    # the held-out fold itself (its OOF predictions then picked their own epoch)
    stop_views: list[EncodedRows] | None = None
    Y_stop: np.ndarray | None = None

    def epoch_choice_views(self) -> tuple[list[EncodedRows], np.ndarray]:
        if self.stop_views is None:
            return self.valid_views, self.Y_valid
        return self.stop_views, self.Y_stop


@dataclass
class FoldOutcome:
    valid_pred: np.ndarray  # (n_valid, C) float32, best epoch
    test_pred: np.ndarray | None  # (n_test, C) float32, best epoch
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochStats:
    loss: float
    samples: int  # over all processes
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def train_fold(accelerator: Accelerator, cfg: FinetuneConfig, task: Task, model_path: Path,
               tokenizer, inputs: FoldInputs, fold_dir: Path, config_hash: str,
               fold: int) -> FoldOutcome:
    """Train one fold (resuming if ``fold_dir/last`` exists) and predict with its best epoch."""
    started = time.perf_counter()
    multilabel = task.kind == "multilabel"
    set_seed(cfg.seed + fold)  # head init and dropout; resume overwrites RNG from last/
    # decoders pool the last non-pad token: the config must know the (added) pad token
    pad_token_id = tokenizer.pad_token_id if lora.is_decoder(model_path) else None
    writer = None
    if cfg.method == "lora":
        model = lora.build_lora_classifier(model_path, task.label_names, multilabel, cfg,
                                           pad_token_id)
        writer = partial(_save_adapter, base_id=cfg.model, base_path=model_path)
    else:
        model = load_classifier(model_path, task.label_names, multilabel, cfg.dropout,
                                attention_dropout=cfg.attention_dropout, pad_token_id=pad_token_id)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
    optimizer = make_optimizer(model, cfg.weight_decay, cfg.lr, accelerator.device)
    sampler = LengthGroupedBatchSampler(inputs.train.lengths, cfg.batch_size, cfg.seed + fold)
    loader = DataLoader(inputs.train, batch_sampler=sampler, collate_fn=Collator(tokenizer),
                        num_workers=cfg.num_workers)
    # Counted on the unsharded loader: accelerate steps a prepared scheduler once per
    # process per update, so the schedule spans the same updates on 1 or N processes.
    n_updates = cfg.epochs * math.ceil(len(sampler) / cfg.grad_accum)
    scheduler = get_scheduler(cfg.scheduler, optimizer,
                              num_warmup_steps=round(cfg.warmup_ratio * n_updates),
                              num_training_steps=n_updates)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    weights = (class_weights(inputs.train.targets)
               if multilabel and cfg.class_weighted_bce else None)
    loss_fn = make_loss(multilabel, 0.0 if multilabel else cfg.label_smoothing, weights)

    if cfg.method == "lora":
        lora.adapter_only_checkpoints(accelerator)
    checkpoints = FoldCheckpoints(accelerator, fold_dir, config_hash,
                                  partial_model=cfg.method == "lora")
    choice_views, Y_choice = inputs.epoch_choice_views()
    state = checkpoints.resume()
    while state.epoch < cfg.epochs and not state.stopped:
        # the prepared loader re-seeds its sampler with its own epoch counter on every
        # pass, which restarts at 0 after a resume: set both to the true epoch
        loader.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch)
        try:
            stats = train_epoch(accelerator, model, loader, optimizer, scheduler, loss_fn,
                                cfg.max_grad_norm,
                                desc=f"fold {fold} epoch {state.epoch + 1}/{cfg.epochs}")
        except NonFiniteLoss as err:
            # the weights may already be damaged: this fold restarts on the re-run
            checkpoints.clear_last()
            raise HybridstackError(
                f"fold {fold}: the training loss became {err.value} at epoch {state.epoch + 1}, "
                f"step {err.step} ({accelerator.mixed_precision} precision); re-run with "
                "--set finetune.mixed_precision=no or a lower finetune.lr (finished folds are kept, "
                "this fold restarts)") from None
        choice_pred = predict_views(accelerator, model, choice_views, inputs.permutation,
                                    tokenizer, cfg.eval_batch_size, multilabel)
        score = task.score(Y_choice, choice_pred)
        improved = update_early_stopping(state, score, task, cfg.patience)
        log_epoch(fold, state, stats, task.metric_name, score, improved)
        if improved:
            checkpoints.save_best(model, tokenizer, writer)
        checkpoints.save_last(state)

    if cfg.method == "lora":  # the best epoch's adapters into the model in memory (no base reload)
        lora.load_adapter_weights(accelerator.unwrap_model(model), checkpoints.best_dir)
        best = model
    else:
        best = load_trained(checkpoints.best_dir).to(accelerator.device)
    valid_pred = predict_views(accelerator, best, inputs.valid_views, inputs.permutation,
                               tokenizer, cfg.eval_batch_size, multilabel)
    test_pred = None
    if inputs.test_views is not None:
        test_pred = predict_views(accelerator, best, inputs.test_views, inputs.permutation,
                                  tokenizer, cfg.eval_batch_size, multilabel)
    accelerator.free_memory()  # the next fold prepares (and checkpoints) only its own objects
    info = {"seconds": round(time.perf_counter() - started, 3), "best_iteration": state.best_epoch,
            "best_score": state.best_score, "epochs_run": state.epoch, "history": state.history}
    return FoldOutcome(valid_pred, test_pred, info)


def make_optimizer(model: torch.nn.Module, weight_decay: float, lr: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with torch's fastest kernel for ``device``.

    On a CPU torch defaults to its single-tensor loop: about a dozen passes over every
    parameter per step, a fixed cost (the word embeddings dominate it) that no amount of
    padding saved shrinks; the fused CPU kernel makes one pass. On CUDA torch already picks
    its multi-tensor (foreach) kernel by default, which is kept.
    """
    fused = True if device.type == "cpu" else None
    return torch.optim.AdamW(optimizer_groups(model, weight_decay), lr=lr, fused=fused)


def _save_adapter(model, tokenizer, folder: Path, base_id: str, base_path: Path) -> None:
    lora.save_adapter(model, tokenizer, folder, base_id, base_path)


def update_early_stopping(state: TrainState, score: float, task: Task, patience: int) -> bool:
    """Record one finished epoch's ``score``; return True when it is the best so far."""
    state.epoch += 1
    improved = state.best_score is None or task.is_better(score, state.best_score)
    if improved:
        state.best_score, state.best_epoch, state.bad_epochs = score, state.epoch, 0
    else:
        state.bad_epochs += 1
        state.stopped = state.bad_epochs >= patience
    return improved


def log_epoch(fold: int, state: TrainState, stats: EpochStats, metric_name: str, score: float,
              improved: bool) -> None:
    state.history.append({"epoch": state.epoch, "train_loss": stats.loss, "score": score,
                          "samples_per_second": round(stats.samples_per_second, 2)})
    log.info("fold %d epoch %d: train loss %.4f, valid %s %.5f%s, %.1f samples/s",
             fold, state.epoch, stats.loss, metric_name, score, " (best)" if improved else "",
             stats.samples_per_second)
    if state.stopped:
        log.info("fold %d: early stop, no improvement for %d epochs (best epoch %d)",
                 fold, state.bad_epochs, state.best_epoch)


class NonFiniteLoss(Exception):
    """The loss of some process was NaN or infinite (raised on every process together)."""

    def __init__(self, value: str, step: int):
        super().__init__(f"non-finite loss {value} at step {step}")
        self.value, self.step = value, step


def check_finite(accelerator: Accelerator, loss: torch.Tensor, step: int) -> None:
    """Raise :class:`NonFiniteLoss` on every process when any process's loss is not finite.

    The flag is summed over processes (one scalar all-reduce per step), so all ranks stop
    together instead of the healthy ones hanging in the next gradient all-reduce. This is
    the forward loss; the inf gradients of fp16 overflow are GradScaler's to skip.
    """
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        value = str(loss.item()) if not torch.isfinite(loss) else "non-finite on another process"
        raise NonFiniteLoss(value, step)


def train_epoch(accelerator: Accelerator, model, loader, optimizer, scheduler, loss_fn: LossFn,
                max_grad_norm: float, desc: str = "train") -> EpochStats:
    """One pass over ``loader`` with gradient accumulation and clipping."""
    model.train()
    loss_sum, n_seen = 0.0, 0
    started = time.perf_counter()
    bar = progress(loader, desc=desc, unit="batches", disable=not accelerator.is_local_main_process)
    for step, batch in enumerate(bar, start=1):
        with accelerator.accumulate(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = loss_fn(logits.float(), batch["labels"])
            check_finite(accelerator, loss, step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        n_rows = len(batch["labels"])
        loss_sum += loss.item() * n_rows
        n_seen += n_rows
        rate = n_seen * accelerator.num_processes / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", samples_s=f"{rate:.1f}")
    totals = accelerator.reduce(torch.tensor([loss_sum, n_seen], device=accelerator.device,
                                             dtype=torch.float64), reduction="sum")
    return EpochStats(loss=float(totals[0] / totals[1]), samples=int(totals[1]),
                      seconds=time.perf_counter() - started)


@torch.no_grad()
def predict(accelerator: Accelerator, model, rows: EncodedRows, tokenizer, batch_size: int,
            multilabel: bool) -> np.ndarray:
    """Probabilities of every row in ``rows``' order, each row computed by exactly one process.

    Returns
    -------
    (n, C) float32 on every process.
    """
    model = accelerator.unwrap_model(model)
    model.eval()
    collate = Collator(tokenizer)
    batches = sorted_batches(rows.lengths, batch_size)
    mine = batches[accelerator.process_index::accelerator.num_processes]
    parts = []
    for indices in progress(mine, desc="predict", unit="batches",
                            disable=not accelerator.is_local_main_process):
        batch = collate([rows[i] for i in indices])
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"].to(accelerator.device),
                           attention_mask=batch["attention_mask"].to(accelerator.device)).logits
        parts.append((indices, probabilities(logits.float(), multilabel).cpu().numpy()))
    if accelerator.num_processes > 1:
        parts = gather_object(parts)
    n_classes = parts[0][1].shape[1]
    out = np.full((len(rows), n_classes), np.nan, dtype=np.float32)
    times_seen = np.zeros(len(rows), dtype=np.int64)
    for indices, probs in parts:
        out[indices] = probs
        np.add.at(times_seen, indices, 1)
    assert (times_seen == 1).all(), "every row must be predicted exactly once"
    return out


def predict_views(accelerator: Accelerator, model, views: list[EncodedRows],
                  permutation: list[int] | None, tokenizer, batch_size: int,
                  multilabel: bool) -> np.ndarray:
    """Predict the original view, averaged with the swapped view (columns mapped back) if any."""
    return average_with_swapped(
        lambda view: predict(accelerator, model, view, tokenizer, batch_size, multilabel),
        views[0], views[1] if len(views) > 1 else None, permutation)
