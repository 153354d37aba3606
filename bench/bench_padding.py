"""Training throughput: length-grouped dynamic padding vs padding every batch to max length.

Real Jigsaw comment lengths (texts from /work/shared/data/jigsaw-toxic-10k/train.csv),
the MiniLM backbone, max_length 256, the finetune stage's own training step. Both modes
train the same rows from the same initial weights, side by side in one run.

    python bench/bench_padding.py [--rows 384] [--batch-size 16]

Prints samples/s of each mode and their ratio; writes bench/results/padding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from hybridstack.config import JIGSAW_LABELS
from hybridstack.finetune.data import Collator, EncodedRows, LengthGroupedBatchSampler, Renderer
from hybridstack.finetune.loop import train_epoch
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


def load_rows(n_rows: int, tokenizer) -> EncodedRows:
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    frame = frame.sample(n=n_rows, random_state=42)
    renderer = Renderer(tokenizer, ["text"], (1.0,), MAX_LENGTH, head_fraction=0.5)
    ids, _ = renderer.render({"text": frame["comment_text"].tolist()})
    targets = frame[JIGSAW_LABELS].astype(np.float32).to_numpy()
    return EncodedRows(ids, targets)


def measure(accelerator: Accelerator, model_path: Path, tokenizer, rows: EncodedRows,
            batch_size: int, grouped: bool) -> dict:
    """One training epoch in one padding mode; returns throughput and padding share."""
    set_seed(42)
    model = load_classifier(model_path, JIGSAW_LABELS, multilabel=True)
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=5e-5)
    sampler = LengthGroupedBatchSampler(rows.lengths, batch_size, seed=42, group_by_length=grouped)
    collate = Collator(tokenizer, pad_to=None if grouped else MAX_LENGTH)
    loader = DataLoader(rows, batch_sampler=sampler, collate_fn=collate)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    loss_fn = make_loss(True, weights=class_weights(rows.targets))
    stats = train_epoch(accelerator, model, loader, optimizer, scheduler, loss_fn, 1.0,
                        desc="grouped+dynamic" if grouped else f"pad to {MAX_LENGTH}")
    accelerator.free_memory()
    width = [max(rows.lengths[i] for i in b) if grouped else MAX_LENGTH for b in sampler]
    padded = sum(w * len(b) for w, b in zip(width, sampler))
    return {"samples_per_second": round(stats.samples_per_second, 2),
            "seconds": round(stats.seconds, 2),
            "padding_share": round(1 - sum(rows.lengths) / padded, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model_path = resolve_model("embedded:minilm", "bench model")
    tokenizer = load_tokenizer(model_path)
    rows = load_rows(args.rows, tokenizer)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    grouped = measure(accelerator, model_path, tokenizer, rows, args.batch_size, grouped=True)
    padded = measure(accelerator, model_path, tokenizer, rows, args.batch_size, grouped=False)
    ratio = grouped["samples_per_second"] / padded["samples_per_second"]
    lengths = np.array(rows.lengths)
    result = {
        "data": str(DATA), "rows": args.rows, "batch_size": args.batch_size,
        "max_length": MAX_LENGTH, "model": "embedded:minilm (all-MiniLM-L6-v2)",
        "token_length": {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                         "p90": float(np.percentile(lengths, 90)),
                         "share_at_max": float((lengths == MAX_LENGTH).mean())},
        "length_grouped_dynamic": grouped, "pad_to_max_length": padded,
        "speedup": round(ratio, 2),
        "device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
        "machine": platform.machine(), "torch": torch.__version__,
    }
    print(f"length-grouped dynamic padding: {grouped['samples_per_second']:.1f} samples/s "
          f"(padding {grouped['padding_share']:.0%})")
    print(f"pad every batch to {MAX_LENGTH}:        {padded['samples_per_second']:.1f} samples/s "
          f"(padding {padded['padding_share']:.0%})")
    print(f"speed-up: {ratio:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
