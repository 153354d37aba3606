"""Training throughput: length-grouped dynamic padding vs padding every batch to max length.

Real Jigsaw comment lengths (texts from /work/shared/data/jigsaw-toxic-10k/train.csv),
the MiniLM backbone, max_length 256, the finetune stage's own training step
(:func:`hybridstack.finetune.loop.train_epoch`). Both padding modes train the same rows from
the same initial weights, side by side in one run: one warm-up step each, then ``--repeats``
epochs per mode, interleaved; the speed-up is the median of the per-repeat ratios.

One profiled step per mode (after a warm-up step) splits a step into collation, forward,
backward, clipping, optimizer step and zero_grad, both with the stage's optimizer and
collator (``stage``) and with what the stage used before (``before``: torch's default
AdamW, on a CPU its single-tensor loop, and the tokenizer's Python ``pad``), so the fixed
per-step costs that padding cannot shrink show side by side. ``--before-epochs`` also
times whole epochs of the ``before`` variant.

On a CPU this is a proxy for the GPU: the ratio of compute saved by padding is the same,
but the fixed per-step costs (optimizer, collation, Python) weigh differently there.

    python bench/bench_padding.py [--rows 192] [--batch-size 16] [--repeats 3]

Prints samples/s of each mode and their ratio; writes bench/results/padding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from hybridstack.config import JIGSAW_LABELS
from hybridstack.finetune.data import Collator, EncodedRows, LengthGroupedBatchSampler, Renderer
from hybridstack.finetune.loop import make_optimizer, train_epoch
from hybridstack.finetune.model import (
    class_weights,
    load_classifier,
    load_tokenizer,
    make_loss,
    optimizer_groups,
)
from hybridstack.models import resolve_model

DATA = Path(os.environ.get("HYBRIDSTACK_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "jigsaw-toxic-10k" / "train.csv"
RESULTS = Path(__file__).parent / "results" / "padding.json"
MAX_LENGTH = 256
MODES = {"length_grouped_dynamic": True, "pad_to_max_length": False}
VARIANTS = ("stage", "before")


class TokenizerPadCollator:
    """The stage's collator before: the tokenizer's Python ``pad`` (the ``before`` variant)."""

    def __init__(self, tokenizer, pad_to: int | None = None):
        self.tokenizer, self.pad_to = tokenizer, pad_to

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": [item["input_ids"].tolist() for item in items]},
                                   padding="max_length" if self.pad_to else "longest",
                                   max_length=self.pad_to, return_attention_mask=True,
                                   return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.from_numpy(np.stack([item["labels"] for item in items]))}


def load_rows(n_rows: int, tokenizer) -> EncodedRows:
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    frame = frame.sample(n=n_rows, random_state=42)
    renderer = Renderer(tokenizer, ["text"], (1.0,), MAX_LENGTH, head_fraction=0.5)
    store = renderer.render_store({"text": frame["comment_text"].tolist()})
    targets = frame[JIGSAW_LABELS].astype(np.float32).to_numpy()
    return EncodedRows(store, targets)


def build(accelerator: Accelerator, model_path: Path, tokenizer, rows: EncodedRows,
          batch_size: int, grouped: bool, variant: str) -> dict:
    """Model, optimizer, loader and loss of one (padding mode, variant), from the same init."""
    set_seed(42)
    model = load_classifier(model_path, JIGSAW_LABELS, multilabel=True)
    if variant == "stage":
        optimizer = make_optimizer(model, 0.01, 5e-5, accelerator.device)
        collate = Collator(tokenizer, pad_to=None if grouped else MAX_LENGTH)
    else:
        optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=5e-5)
        collate = TokenizerPadCollator(tokenizer, pad_to=None if grouped else MAX_LENGTH)
    sampler = LengthGroupedBatchSampler(rows.lengths, batch_size, seed=42, group_by_length=grouped)
    loader = DataLoader(rows, batch_sampler=sampler, collate_fn=collate)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return {"model": model, "optimizer": optimizer, "loader": loader, "scheduler": scheduler,
            "sampler": sampler, "collate": collate,
            "loss_fn": make_loss(True, weights=class_weights(rows.targets))}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_step(accelerator: Accelerator, run: dict, rows: EncodedRows) -> dict:
    """Seconds of each part of one training step (the steps of ``train_epoch``) on the batch
    of median width (all batches are ``MAX_LENGTH`` wide when padding to it)."""
    model, optimizer = run["model"], run["optimizer"]
    batches = list(run["sampler"])
    widths = [int(rows.lengths[b].max()) for b in batches]
    indices = batches[int(np.argsort(widths, kind="stable")[len(widths) // 2])]  # a median batch
    times, t = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        _sync()
        now = time.perf_counter()
        times[name] = round(now - t, 4)
        t = now

    model.train()
    batch = run["collate"]([rows[i] for i in indices])
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    lap("collate")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = run["loss_fn"](logits.float(), batch["labels"])
    lap("forward")
    accelerator.backward(loss)
    lap("backward")
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    lap("clip_grad_norm")
    optimizer.step()
    run["scheduler"].step()
    lap("optimizer_step")
    optimizer.zero_grad()
    lap("zero_grad")
    times["total"] = round(sum(times.values()), 4)
    times["batch_width"] = int(batch["input_ids"].shape[1])
    return times


def epoch_rate(accelerator: Accelerator, run: dict, desc: str) -> float:
    """Samples/s of one epoch of the stage's own ``train_epoch``."""
    run["loader"].set_epoch(0)
    run["sampler"].set_epoch(0)
    stats = train_epoch(accelerator, run["model"], run["loader"], run["optimizer"],
                        run["scheduler"], run["loss_fn"], 1.0, desc=desc)
    return stats.samples_per_second


def padding_share(rows: EncodedRows, sampler: LengthGroupedBatchSampler, grouped: bool) -> float:
    lengths = rows.lengths
    padded = sum((max(lengths[b]) if grouped else MAX_LENGTH) * len(b) for b in sampler)
    return round(1 - float(lengths.sum()) / padded, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before-epochs", action="store_true",
                        help="also time whole epochs of the before variant (doubles the run); "
                             "without it, the before variant is only profiled step by step")
    args = parser.parse_args()

    model_path = resolve_model("embedded:minilm", "bench model")
    tokenizer = load_tokenizer(model_path)
    rows = load_rows(args.rows, tokenizer)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    variants = VARIANTS if args.before_epochs else VARIANTS[:1]
    runs = {(v, m): build(accelerator, model_path, tokenizer, rows, args.batch_size, grouped, v)
            for v in VARIANTS for m, grouped in MODES.items()}
    for run in runs.values():  # warm-up step, not measured
        profile_step(accelerator, run, rows)
    profiles = {key: profile_step(accelerator, run, rows) for key, run in runs.items()}
    rates = {key: [] for key in runs if key[0] in variants}
    for repeat in range(args.repeats):  # interleaved: every config once per round
        for key in rates:
            rates[key].append(epoch_rate(accelerator, runs[key], f"{key[0]} {key[1]} #{repeat + 1}"))

    result = {
        "data": str(DATA), "rows": args.rows, "batch_size": args.batch_size,
        "max_length": MAX_LENGTH, "model": "embedded:minilm (all-MiniLM-L6-v2)",
        "repeats": args.repeats, "method": "one warm-up step per config, then the configs' "
        "epochs interleaved round by round; speed-up = median of the per-round ratios",
        "note": "a CPU proxy for the GPU: padding saves the same share of compute there, but "
                "the fixed per-step costs (optimizer, collation) weigh differently",
        "token_length": token_length_stats(rows.lengths),
        "device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
        "machine": platform.machine(), "torch": torch.__version__,
    }
    for variant in VARIANTS:
        result[variant] = variant_result(rows, runs, rates, profiles, variant)
        print(f"{variant}: {json.dumps(result[variant])}")
    result["speedup"] = result["stage"]["speedup"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


def variant_result(rows: EncodedRows, runs: dict, rates: dict, profiles: dict, variant: str) -> dict:
    """Speed-up (when its epochs were timed), padding share and step breakdown per mode."""
    grouped, padded = ((variant, m) for m in MODES)
    out = {}
    if grouped in rates:
        ratios = [g / p for g, p in zip(rates[grouped], rates[padded])]
        out = {"speedup": round(statistics.median(ratios), 2),
               "per_round_speedup": [round(r, 2) for r in ratios]}
    for mode, is_grouped in MODES.items():
        key = (variant, mode)
        out[mode] = {"padding_share": padding_share(rows, runs[key]["sampler"], is_grouped),
                     "step_seconds": profiles[key]}
        if key in rates:
            out[mode]["samples_per_second"] = round(statistics.median(rates[key]), 2)
            out[mode]["per_round_samples_per_second"] = [round(r, 2) for r in rates[key]]
    return out


def token_length_stats(lengths: np.ndarray) -> dict:
    return {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "share_at_max": float((lengths == MAX_LENGTH).mean())}


if __name__ == "__main__":
    main()
