"""GPU smoke test of the fine-tune path: float32 loading, fp16/bf16 steps, 2-GPU DDP, speed.

Meant to run in the venv that ``bench/gpu_smoke.sh`` builds (the hybridstack wheel on the
machine's own CUDA torch), from the repo root, in well under 5 minutes on a T4:

    bash bench/gpu_smoke.sh                 # build the venv, then run this
    python bench/gpu_smoke.py [--out FILE]  # in an environment that already has hybridstack
    python bench/gpu_smoke.py --dry-run     # the same code on CPU at tiny sizes (fp32 only)

Checks (each with its own time box; a watchdog ends the run, JSON written, at --time-limit):

- ``load_float32``: a 2-layer DeBERTa-v2 (v3-style relative attention) stored in float16
  with a spm-only tokenizer (``spm.model`` + tokenizer_config.json, as the Hub's DeBERTa-v3)
  loads through ``hybridstack.finetune.model.load_classifier`` with every parameter float32.
- ``train_fp16`` / ``train_bf16``: a few optimizer steps of that model under
  ``Accelerator(mixed_precision=...)`` (backward, grad clipping, step): no exception (the
  classic one is "Attempting to unscale FP16 gradients") and a finite loss. bf16 runs only
  where the GPU has it natively (compute capability >= 8).
- ``train_lora``: a tiny Llama stored in float16 (a tokenizer without pad token, like the real
  ones) through ``hybridstack.finetune.lora.build_lora_classifier`` with gradient
  checkpointing: the frozen base stays float16 on CUDA, every trainable parameter (adapters
  and head) is float32, a few fp16 steps under GradScaler run with finite loss and change
  the adapters (``lora_B`` starts at zero). Needs peft (the ``llm`` extra).
- ``train_qlora``: the same with ``quantization = "4bit"`` (bitsandbytes NF4); skipped with
  a message where bitsandbytes is missing (or on the CPU dry run).
- ``ddp_2gpu``: ``hybridstack run finetune -c cfg.toml --num-processes 2`` (NCCL) on a tiny
  synthetic pairwise competition; exit status, wall time, the model folder it wrote.
- ``throughput``: training samples/s of a deberta-v3-small-sized model (random weights, random
  token ids) at 512 tokens, batch 8, fp16 autocast + GradScaler + AdamW, and eval samples/s
  (no_grad) at batch 32.

Writes one JSON (``--out``, default bench/results/gpu_smoke.json), prints a table, and exits
1 if any check that ran failed (124 when the watchdog fired).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_smoke.json"
CHECKS = ("load_float32", "train_fp32", "train_fp16", "train_bf16", "train_lora", "train_qlora",
          "ddp_2gpu", "throughput")
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]  # hybridstack.config.PAIRWISE_LABELS

# deberta-v3-small's config.json (microsoft/deberta-v3-small), the throughput model.
DEBERTA_V3_SMALL = dict(
    vocab_size=128100, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=0,
    initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1,
    position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
    pos_att_type=["p2c", "c2p"], position_biased_input=False, pad_token_id=0,
    pooler_hidden_size=768, pooler_dropout=0, pooler_hidden_act="gelu",
)
# The same attention settings at toy sizes: the tiny checkpoint and the dry run's throughput model.
V3_ATTENTION = {k: DEBERTA_V3_SMALL[k] for k in (
    "relative_attention", "max_relative_positions", "position_buckets", "norm_rel_ebd",
    "share_att_key", "pos_att_type", "position_biased_input", "type_vocab_size",
    "max_position_embeddings", "layer_norm_eps")}


class Sizes:
    """Everything that differs between a GPU run and the CPU dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.tiny_hidden, self.tiny_layers, self.tiny_heads = (64, 2, 2) if dry_run else (128, 2, 2)
        # 12 steps on GPU: GradScaler may skip the first few (overflow at its initial scale)
        self.train_rows, self.train_batch, self.train_length = ((32, 8, 64) if dry_run
                                                                 else (96, 8, 128))
        self.ddp_train, self.ddp_test = (48, 8) if dry_run else (120, 24)
        self.bench = (dict(DEBERTA_V3_SMALL) if not dry_run else
                      {**DEBERTA_V3_SMALL, "vocab_size": 1000, "hidden_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                       "pooler_hidden_size": 64})
        self.bench_length = 64 if dry_run else 512
        self.bench_batch, self.eval_batch = (4, 8) if dry_run else (8, 32)
        self.warmup, self.timed = (1, 2) if dry_run else (3, 20)
        self.eval_warmup, self.eval_timed = (1, 2) if dry_run else (2, 10)
        # seconds: each check's time box (a check starts only with its minimum left)
        self.boxes = ({"load_float32": 60, "train": 60, "ddp_2gpu": 240, "throughput": 90}
                      if dry_run else
                      {"load_float32": 30, "train": 40, "ddp_2gpu": 150, "throughput": 75})
        self.minimum = {"load_float32": 5, "train": 5, "ddp_2gpu": 45, "throughput": 20}
        self.lora_hidden = 64 if dry_run else 256


class Report:
    """The JSON being built; written on success, failure and watchdog timeout alike."""

    def __init__(self, out: Path, started: float):
        self.out = out
        self.started = started
        self.data: dict[str, Any] = {"env": {}, "checks": {}}
        self.current: str | None = None
        self.lock = threading.Lock()
        self.written = False

    def check(self, name: str, **fields) -> dict:
        entry = self.data["checks"].setdefault(name, {})
        entry.update(fields)
        return entry

    def failed(self) -> list[str]:
        return [k for k, v in self.data["checks"].items() if v.get("status") == "fail"]

    def write(self, exit_code: int) -> None:
        with self.lock:
            if self.written:
                return
            self.written = True
            checks = self.data["checks"]
            self.data["checks"] = {k: checks[k] for k in sorted(checks, key=check_order)}
            self.data["total_seconds"] = round(time.monotonic() - self.started, 1)
            self.data["failed"] = self.failed()
            self.data["ok"] = exit_code == 0
            self.data["exit_code"] = exit_code
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(f".{self.out.name}.tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
            os.replace(tmp, self.out)
            print_table(self.data)
            print(f"\nwrote {self.out}", flush=True)


# -- helpers ---------------------------------------------------------------------------------


def check_order(name: str) -> int:
    return CHECKS.index(name) if name in CHECKS else len(CHECKS)


def remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def short_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16() -> bool:
    """bf16 in hardware (compute capability >= 8); T4/V100 only emulate it, slowly."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation argument
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability()[0] >= 8


def reset_accelerate() -> None:
    """Let the next Accelerator pick another mixed precision (its state is a process singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_check(report: Report, name: str, box: float, deadline: float, minimum: float,
              fn: Callable[[float], dict]) -> None:
    """Run ``fn(check_deadline)``; record its fields, or the exception as a failure."""
    left = remaining(deadline)
    if left < minimum:  # counts as a failure: the check did not get to test anything
        report.check(name, status="fail", reason=f"not run: {left:.0f}s left of --time-limit, "
                     f"it needs {minimum:.0f}s")
        return
    report.current = name
    check_deadline = time.monotonic() + min(box, left)
    started = time.monotonic()
    print(f"\n== {name} (time box {min(box, left):.0f}s) ==", flush=True)
    try:
        fields = fn(check_deadline)
    except Exception as err:  # a smoke test records every failure and goes on
        fields = {"status": "fail", "reason": short_error(err),
                  "traceback": traceback.format_exc(limit=8).splitlines()[-12:]}
    fields.setdefault("status", "ok")
    fields["seconds"] = round(time.monotonic() - started, 2)
    report.check(name, **fields)
    report.current = None
    why = f" ({fields['reason']})" if fields.get("reason") else ""
    print(f"   {name}: {fields['status']}{why}", flush=True)
    free_memory()


# -- environment -----------------------------------------------------------------------------


def environment(dry_run: bool) -> dict:
    import accelerate
    import transformers

    import hybridstack

    env: dict[str, Any] = {
        "mode": "cpu-dry-run" if dry_run else "cuda",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "hybridstack": getattr(hybridstack, "__version__", None) or _dist_version("hybridstack"),
        "hybridstack_path": str(Path(hybridstack.__file__).parent),
        "torch_path": str(Path(torch.__file__).parent),
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        env["gpus"] = [p.name for p in props]
        env["compute_capability"] = [f"{p.major}.{p.minor}" for p in props]
        env["gpu_memory_gib"] = [round(p.total_memory / 2**30, 1) for p in props]
        env["bf16_native"] = native_bf16()
        env["bf16_supported_incl_emulation"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(Exception):  # absent from some builds
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- the tiny float16 checkpoint -------------------------------------------------------------


def make_tiny_checkpoint(folder: Path, sizes: Sizes) -> dict:
    """A DeBERTa-v2 backbone saved in float16, with a spm-only tokenizer like the Hub's v3."""
    import sentencepiece as spm
    from transformers import DebertaV2Config, DebertaV2Model

    from hybridstack.synthetic import multiclass_frame, pairwise_frame

    folder.mkdir(parents=True, exist_ok=True)
    pairs = pairwise_frame(200, seed=1)
    texts = [*multiclass_frame(200, seed=1)["text"], *pairs["prompt"], *pairs["response_a"],
             *pairs["response_b"]]
    corpus = folder.parent / "corpus.txt"
    corpus.write_text("\n".join(str(t) for t in texts))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=500, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"],
        hard_vocab_limit=False, minloglevel=2,
    )
    (folder / "spm.vocab").unlink(missing_ok=True)  # the Hub's folder has spm.model only
    vocab_size = spm.SentencePieceProcessor(model_file=str(folder / "spm.model")).get_piece_size()
    # exactly microsoft/deberta-v3-small's tokenizer_config.json: no tokenizer.json, no class
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False,
                                                              "vocab_type": "spm"}))
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=vocab_size, hidden_size=sizes.tiny_hidden,
                             num_hidden_layers=sizes.tiny_layers,
                             num_attention_heads=sizes.tiny_heads,
                             intermediate_size=4 * sizes.tiny_hidden, pad_token_id=0,
                             pooler_hidden_size=sizes.tiny_hidden, **V3_ATTENTION)
    DebertaV2Model(config).half().save_pretrained(str(folder))
    files = sorted(p.name for p in folder.iterdir())
    return {"files": files, "vocab_size": vocab_size, "stored_dtype": stored_dtype(folder)}


def stored_dtype(folder: Path) -> str:
    """The dtypes of the tensors in the checkpoint's safetensors file(s), e.g. "F16"."""
    from safetensors import safe_open

    kinds: Counter = Counter()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                kinds[str(f.get_slice(key).get_dtype())] += 1
    return ",".join(sorted(kinds)) or "none"


def check_load(folder: Path, sizes: Sizes) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        from hybridstack.finetune.model import load_classifier, load_tokenizer

        built = make_tiny_checkpoint(folder, sizes)
        out: dict[str, Any] = {"checkpoint": built}
        if "tokenizer.json" in built["files"] or built["stored_dtype"] != "F16":
            return {**out, "status": "fail",
                    "reason": "the test checkpoint is not float16 + spm-only (test bug)"}
        tokenizer = load_tokenizer(folder)
        out["tokenizer"] = {"class": type(tokenizer).__name__, "cls": tokenizer.cls_token_id,
                            "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id,
                            "example_ids": tokenizer("Explain the recipe.")["input_ids"]}
        model = load_classifier(folder, LABELS, multilabel=False)
        dtypes = Counter(str(p.dtype).replace("torch.", "") for p in model.parameters())
        out["param_dtypes"] = dict(dtypes)
        out["n_params"] = sum(p.numel() for p in model.parameters())
        bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
        if bad:
            out.update(status="fail", reason=f"{len(bad)} of {sum(dtypes.values())} parameters "
                       f"not float32 after load_classifier (e.g. {bad[0]}: "
                       f"{dict(model.named_parameters())[bad[0]].dtype})")
        else:
            n = sum(dtypes.values())
            out["detail"] = (f"{n}/{n} params float32 (stored F16); spm-only tokenizer -> "
                             f"{type(tokenizer).__name__}")
        return out

    return run


# -- a few mixed-precision steps -------------------------------------------------------------


def encoded_rows(tokenizer, n_rows: int, max_length: int):
    """Pairwise synthetic rows rendered exactly as the finetune stage renders them."""
    from hybridstack.finetune.data import EncodedRows, Renderer
    from hybridstack.synthetic import pairwise_frame

    frame = pairwise_frame(n_rows, seed=2)
    fields = ["prompt", "response_a", "response_b"]
    renderer = Renderer(tokenizer, fields, (0.2, 0.4, 0.4), max_length, head_fraction=0.5)
    ids, _ = renderer.render({f: frame[f].fillna("").astype(str).tolist() for f in fields})
    targets = frame[LABELS].to_numpy(dtype=np.float32)
    return EncodedRows(ids, targets)


def check_train(folder: Path, precision: str, sizes: Sizes) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader
        from transformers import get_scheduler

        from hybridstack.finetune.data import Collator
        from hybridstack.finetune.model import (
            load_classifier,
            load_tokenizer,
            make_loss,
            optimizer_groups,
            probabilities,
        )

        reset_accelerate()
        accelerator = Accelerator(mixed_precision=precision, cpu=sizes.dry_run)
        set_seed(0)
        tokenizer = load_tokenizer(folder)
        rows = encoded_rows(tokenizer, sizes.train_rows, sizes.train_length)
        model = load_classifier(folder, LABELS, multilabel=False)
        start_dtypes = dict(Counter(str(p.dtype).replace("torch.", "") for p in model.parameters()))
        optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-4)
        loader = DataLoader(rows, batch_size=sizes.train_batch, shuffle=False,
                            collate_fn=Collator(tokenizer))
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1,
                                  num_training_steps=len(loader))
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                                  scheduler)
        loss_fn = make_loss(False)
        before = next(p for p in model.parameters() if p.ndim == 2).detach().float().clone()
        model.train()
        losses, skipped = [], 0
        for batch in loader:
            if time.monotonic() > deadline:
                return {"status": "fail", "reason": f"time box hit after {len(losses)} steps",
                        "losses": losses}
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                loss = loss_fn(logits.float(), batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            skipped += bool(accelerator.optimizer_step_was_skipped)
            losses.append(round(loss.item(), 5))
        after = next(p for p in model.parameters() if p.ndim == 2).detach().float()
        # the predict path: eval forward under the accelerator's autocast
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            batch = next(iter(loader))
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            probs = probabilities(logits.float(), False)
        out = {
            "steps": len(losses), "losses": losses, "skipped_steps": skipped,
            "weights_changed": bool((after != before).any()),
            "param_dtypes_at_start": start_dtypes,
            "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device),
            "eval_probs_finite": bool(torch.isfinite(probs).all()),
        }
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            out["grad_scale"] = float(scaler.get_scale())
        finite = all(math.isfinite(x) for x in losses)
        out["detail"] = (f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
                         + (f", {skipped} skipped by GradScaler" if skipped else ""))
        if not finite or not out["eval_probs_finite"]:
            out.update(status="fail", reason="non-finite loss or predictions")
        elif not out["weights_changed"]:
            out.update(status="fail", reason="no optimizer step changed the weights")
        return out

    return run


# -- LoRA / QLoRA on a tiny decoder ----------------------------------------------------------


def check_lora(root: Path, sizes: Sizes, quantization: str | None) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            return {"status": "skipped",
                    "reason": "peft is missing: pip install 'hybridstack[llm]'"}
        if quantization is not None:
            if sizes.dry_run:
                return {"status": "skipped", "reason": "QLoRA needs CUDA (dry run on CPU)"}
            if importlib.util.find_spec("bitsandbytes") is None:
                return {"status": "skipped",
                        "reason": "bitsandbytes is missing: pip install bitsandbytes (llm extra)"}
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from torch.utils.data import DataLoader

        from hybridstack.config import FinetuneConfig
        from hybridstack.finetune import lora
        from hybridstack.finetune.data import Collator, EncodedRows, TurnRenderer
        from hybridstack.finetune.model import load_tokenizer, make_loss, optimizer_groups
        from hybridstack.synthetic import pairwise_frame, write_tiny_decoder

        folder = root / "tiny_llama_fp16"
        frame = pairwise_frame(120, seed=3)
        fields = ["prompt", "response_a", "response_b"]
        if not folder.exists():
            texts = [str(t) for f in fields for t in frame[f]]
            write_tiny_decoder(folder, texts, "llama", dtype="float16",
                               hidden_size=sizes.lora_hidden)
        reset_accelerate()
        accelerator = Accelerator(mixed_precision="no" if sizes.dry_run else "fp16",
                                  cpu=sizes.dry_run)
        set_seed(0)
        tokenizer = lora.prepare_tokenizer(load_tokenizer(folder))
        renderer = TurnRenderer(tokenizer, fields, (0.2, 0.4, 0.4), sizes.train_length, 0.5)
        ids, _ = renderer.render({f: frame[f].fillna("").astype(str).tolist() for f in fields})
        rows = EncodedRows(ids[:sizes.train_rows],
                           frame[LABELS].to_numpy(dtype=np.float32)[:sizes.train_rows])
        cfg = FinetuneConfig(model=str(folder), method="lora", quantization=quantization,
                             gradient_checkpointing=True, lora={"r": 8, "alpha": 16})
        model = lora.build_lora_classifier(folder, LABELS, False, cfg, tokenizer.pad_token_id)
        trainable = {n: str(p.dtype).replace("torch.", "") for n, p in model.named_parameters()
                     if p.requires_grad}
        frozen = dict(Counter(str(p.dtype).replace("torch.", "") for p in model.parameters()
                              if not p.requires_grad))
        n_trainable, n_total = lora.count_parameters(model)
        optimizer = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=1e-3)
        loader = DataLoader(rows, batch_size=sizes.train_batch, collate_fn=Collator(tokenizer))
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        loss_fn = make_loss(False)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        model.train()
        losses = []
        for batch in loader:
            if time.monotonic() > deadline:
                return {"status": "fail", "reason": f"time box hit after {len(losses)} steps"}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            loss = loss_fn(logits.float(), batch["labels"])
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(loss.item(), 5))
        moved = any(bool((p != 0).any()) for p in lora_b)
        out = {"steps": len(losses), "losses": losses, "trainable_parameters": n_trainable,
               "total_parameters": n_total, "frozen_dtypes": frozen,
               "trainable_dtypes": sorted(set(trainable.values())),
               "detail": f"{len(losses)} steps, {n_trainable} of {n_total} parameters trained, "
                         f"frozen {frozen}"}
        if set(trainable.values()) != {"float32"}:
            out.update(status="fail", reason=f"trainable parameters not float32: {trainable}")
        elif not all(math.isfinite(x) for x in losses):
            out.update(status="fail", reason="non-finite loss")
        elif not moved:
            out.update(status="fail", reason="the adapters did not change (no gradient?)")
        return out

    return run


# -- 2-process data-parallel fine-tune through the CLI ---------------------------------------


def hybridstack_command() -> list[str]:
    """The venv's ``hybridstack`` entry point (next to this interpreter), else ``python -m``."""
    script = Path(sys.executable).parent / "hybridstack"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hybridstack"]


def write_ddp_config(root: Path, model: Path, sizes: Sizes) -> Path:
    import tomli_w

    from hybridstack.synthetic import write_competition

    raw = write_competition(root / "data", "pairwise", sizes.ddp_train, sizes.ddp_test, seed=0)
    raw.update({
        "experiment": "gpu_smoke_ddp",
        "workdir": str(root / "work"),
        "cv": {"n_splits": 4},
        "tfidf": {"enabled": False},
        "embed": {"enabled": False},
        "stack": {"enabled": False},
        "finetune": {
            "enabled": True, "model": str(model), "name": "tiny", "max_length": 128, "epochs": 1,
            "batch_size": 8, "eval_batch_size": 32, "lr": 1e-4, "folds": [0],
            "mixed_precision": "auto",  # bf16 on compute capability >= 8, fp16 below
        },
    })
    path = root / "gpu_smoke_ddp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def check_ddp(root: Path, model: Path, sizes: Sizes, procs: list,
              keep_log: Path) -> Callable[[float], dict]:
    """``keep_log``: where the run's full output is copied when it fails."""

    def run(deadline: float) -> dict:
        out = ddp_run(root, model, sizes, procs, deadline)
        if out.get("status") == "fail" and (root / "ddp.log").is_file():
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "ddp.log", keep_log)
            out["log"] = str(keep_log)
        return out

    return run


def ddp_run(root: Path, model: Path, sizes: Sizes, procs: list, deadline: float) -> dict:
    if not (model / "config.json").is_file():
        return {"status": "fail", "reason": "no tiny checkpoint (load_float32 failed first)"}
    cfg_path = write_ddp_config(root, model, sizes)
    command = [*hybridstack_command(), "run", "finetune", "-c", str(cfg_path),
               "--num-processes", "2", *(["--cpu"] if sizes.dry_run else [])]
    log_path = root / "ddp.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if sizes.dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
    print("   $ " + " ".join(command), flush=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        # own session: a timeout kills torchrun and both workers together; cwd outside the
        # repo so `python -m` in the workers imports the installed hybridstack, not ./hybridstack
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=str(root), start_new_session=True)
        procs.append(proc)
        try:
            code = proc.wait(timeout=max(1.0, remaining(deadline)))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = None
        finally:
            procs.remove(proc)
    wall = round(time.monotonic() - started, 2)
    tail = log_path.read_text(errors="replace").splitlines()[-25:]
    out: dict[str, Any] = {"command": " ".join(command), "exit_code": code, "wall_seconds": wall,
                           "backend": "gloo (cpu, dry run)" if sizes.dry_run else "nccl"}
    if code is None:
        return {**out, "status": "fail", "reason": f"timed out after {wall:.0f}s",
                "log_tail": tail}
    if code != 0:
        return {**out, "status": "fail", "reason": f"exit status {code}", "log_tail": tail}
    model_dir = root / "work" / "runs" / "gpu_smoke_ddp" / "models" / "tiny"
    try:
        settings = json.loads((model_dir / "config.json").read_text())["settings"]
        scores = json.loads((model_dir / "scores.json").read_text())
        oof = np.load(model_dir / "oof.npy")
    except (OSError, KeyError, ValueError) as err:
        return {**out, "status": "fail", "log_tail": tail,
                "reason": f"exit 0 but no model outputs: {short_error(err)}"}
    out.update(num_processes=settings.get("num_processes"),
               mixed_precision=settings.get("mixed_precision"),
               score=scores.get("overall"), metric=scores.get("metric_name"),
               rows_validated=scores.get("rows_validated"),
               done=(model_dir / "DONE").is_file())
    score = f"{out['score']:.4f}" if isinstance(out["score"], float) else out["score"]
    out["detail"] = (f"exit 0 in {wall:.1f}s, {out['num_processes']} processes, "
                     f"precision {out['mixed_precision']}, {out['metric']} {score}")
    covered = ~np.isnan(oof).all(axis=1)  # the validation rows of fold 0
    if (out["num_processes"] != 2 or not out["done"] or not covered.any()
            or not np.isfinite(oof[covered]).all()):
        out.update(status="fail", reason="finished without 2 processes / DONE / finite OOF",
                   log_tail=tail)
    return out


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- throughput ------------------------------------------------------------------------------


def check_throughput(sizes: Sizes, precision: str) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        device = torch.device("cpu" if sizes.dry_run else "cuda")
        order = ["no"] if sizes.dry_run else [precision]
        if not sizes.dry_run and precision == "fp16" and native_bf16():
            order.append("bf16")  # only if fp16 fails
        attempts = {}
        for mode in order:
            try:
                result = measure(sizes, device, mode, deadline)
                if result.get("status") != "fail":
                    return {**result, "attempts": attempts} if attempts else result
                attempts[mode] = result.get("reason")
            except Exception as err:  # fp16 may fail where bf16 works
                attempts[mode] = short_error(err)
            free_memory()
        return {"status": "fail", "reason": "; ".join(f"{k}: {v}" for k, v in attempts.items()),
                "attempts": attempts}

    return run


def measure(sizes: Sizes, device: torch.device, mode: str, deadline: float) -> dict:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from hybridstack.finetune.model import optimizer_groups

    torch.manual_seed(0)
    config = DebertaV2Config(**sizes.bench, num_labels=len(LABELS))
    with torch.device(device):
        model = DebertaV2ForSequenceClassification(config)
    model = model.float().to(device)
    n_params = sum(p.numel() for p in model.parameters())
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    try:
        scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")
    except (AttributeError, TypeError):  # torch < 2.3
        scaler = torch.cuda.amp.GradScaler(enabled=mode == "fp16")
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=2e-5)
    gen = torch.Generator().manual_seed(0)
    b, n, vocab = sizes.bench_batch, sizes.bench_length, config.vocab_size

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(5, vocab, (size, n), generator=gen)
        labels = torch.randint(0, len(LABELS), (size,), generator=gen)
        return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)

    train_batches = [batch(b) for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step(i: int) -> torch.Tensor:
        ids, mask, labels = train_batches[i % len(train_batches)]
        with autocast():
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    losses = []
    for i in range(sizes.warmup):
        losses.append(train_step(i))
    sync(device)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    t0, done = time.perf_counter(), 0
    for i in range(sizes.timed):
        if time.monotonic() > deadline - 10:  # leave time for the eval measurement
            break
        losses.append(train_step(i))
        done += 1
    sync(device)
    train_seconds = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    if done == 0:
        return {"status": "fail", "reason": "time box hit during warm-up", "precision": mode}
    if not all(math.isfinite(x) for x in losses):
        return {"status": "fail", "reason": f"non-finite training loss under {mode}",
                "precision": mode, "losses": losses}
    peak_train = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    optimizer.state.clear()  # its moments: memory the eval pass does not need
    free_memory()
    model.eval()
    eval_batches = [batch(sizes.eval_batch) for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for i in range(sizes.eval_warmup):
            with autocast():
                model(input_ids=eval_batches[i % 2][0], attention_mask=eval_batches[i % 2][1])
        sync(device)
        t1, eval_done = time.perf_counter(), 0
        for i in range(sizes.eval_timed):
            if time.monotonic() > deadline:
                break
            with autocast():
                logits = model(input_ids=eval_batches[i % 2][0],
                               attention_mask=eval_batches[i % 2][1]).logits
            eval_done += 1
        sync(device)
        eval_seconds = time.perf_counter() - t1
    out = {
        "precision": mode, "device": str(device), "n_params": n_params,
        "seq_len": n, "train_batch": b, "eval_batch": sizes.eval_batch,
        "model": "deberta-v3-small-sized" if not sizes.dry_run else "tiny (dry run)",
        "train_steps_timed": done, "train_seconds": round(train_seconds, 3),
        "train_samples_per_s": round(done * b / train_seconds, 2),
        "train_step_ms": round(1000 * train_seconds / done, 1),
        "eval_steps_timed": eval_done,
        "eval_samples_per_s": (round(eval_done * sizes.eval_batch / eval_seconds, 2)
                               if eval_done else None),
        "final_loss": round(losses[-1], 4),
    }
    if eval_done and not torch.isfinite(logits.float()).all():
        out.update(status="fail", reason=f"non-finite eval logits under {mode}")
    if scale_before is not None:  # a drop means GradScaler skipped (cheaper) timed steps
        out["grad_scale"] = [scale_before, scaler.get_scale()]
    if device.type == "cuda":
        out["peak_train_gib"] = round(peak_train, 2)
        out["peak_eval_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if done < sizes.timed:
        out["note"] = f"time box: {done} of {sizes.timed} timed steps"
    out["detail"] = (f"train {out['train_samples_per_s']} samples/s ({mode}, b{b}x{n}), "
                     f"eval {out['eval_samples_per_s']} samples/s (b{sizes.eval_batch})")
    return out


# -- output ----------------------------------------------------------------------------------


def print_table(data: dict) -> None:
    env = data.get("env", {})
    if env.get("gpus"):
        where = (f"{', '.join(env['gpus'])} (sm {', '.join(env['compute_capability'])}), "
                 f"torch {env['torch']} cuda {env['torch_cuda']}")
    else:
        where = f"{env.get('mode')}: no CUDA, torch {env.get('torch')}"
    print(f"\ngpu smoke: {where}, transformers {env.get('transformers')}, "
          f"accelerate {env.get('accelerate')}")
    print(f"{'check':<14} {'status':<8} detail")
    print(f"{'-' * 14} {'-' * 8} {'-' * 56}")
    for name, entry in data.get("checks", {}).items():
        detail = entry.get("reason") or entry.get("detail") or ""
        if entry.get("reason") and entry.get("detail"):
            detail = f"{entry['reason']} [{entry['detail']}]"
        seconds = entry.get("seconds")
        suffix = f" ({seconds:.1f}s)" if isinstance(seconds, float | int) else ""
        print(f"{name:<14} {entry.get('status', '?'):<8} {detail}{suffix}")
    print(f"total {data.get('total_seconds')}s; "
          + ("all checks that ran passed" if not data.get("failed") else
             f"FAILED: {', '.join(data['failed'])}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU at tiny sizes, fp32 only (also the mode without CUDA)")
    parser.add_argument("--time-limit", type=float, default=240.0,
                        help="seconds for the whole run; a watchdog writes the JSON and exits 124")
    parser.add_argument("--precision", choices=["fp16", "bf16"], default="fp16",
                        help="throughput autocast dtype (fp16 falls back to bf16 if it fails)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a temp folder, removed afterwards)")
    parser.add_argument("--setup-seconds", type=float, default=None,
                        help="venv build/install time, recorded in the JSON (gpu_smoke.sh)")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()  # per-load reports of the fresh head
    transformers.logging.disable_progress_bar()
    started = time.monotonic()
    deadline = started + args.time_limit - 5  # the last seconds: writing the report
    dry_run = args.dry_run or not torch.cuda.is_available()
    if not args.dry_run and dry_run:
        print("no CUDA device visible: running the CPU dry run (tiny sizes, fp32 only)", flush=True)
    sizes = Sizes(dry_run)
    report = Report(args.out, started)
    report.data["time_limit_s"] = args.time_limit
    if args.setup_seconds is not None:
        report.data["setup_seconds"] = round(args.setup_seconds, 1)
    procs: list[subprocess.Popen] = []
    scratch: list[Path] = []
    planned = [c for c in CHECKS if dry_run or c != "train_fp32"]
    if dry_run:
        for name in ("train_fp16", "train_bf16"):
            report.check(name, status="skipped", reason="dry run on CPU: fp32 only")

    def watchdog() -> None:
        if report.written:  # the run finished as the timer fired
            return
        name = report.current or "environment"
        report.check(name, status="fail", reason=f"watchdog: the run passed --time-limit "
                     f"{args.time_limit:.0f}s during this check")
        for later in planned:
            if later not in report.data["checks"]:
                report.check(later, status="fail", reason="not run: the watchdog ended the run")
        for proc in list(procs):
            kill_group(proc)
        report.write(124)
        for folder in scratch:  # os._exit skips the finally below
            shutil.rmtree(folder, ignore_errors=True)
        os._exit(124)

    timer = threading.Timer(args.time_limit, watchdog)
    timer.daemon = True
    timer.start()
    report.data["env"] = environment(dry_run)

    own_root = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="gpu_smoke_")) if own_root else args.workdir
    if own_root:
        scratch.append(root)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "tiny_deberta_fp16"
    box, least = sizes.boxes, sizes.minimum
    try:
        run_check(report, "load_float32", box["load_float32"], deadline, least["load_float32"],
                  check_load(model_dir, sizes))
        if dry_run:
            run_check(report, "train_fp32", box["train"], deadline, least["train"],
                      check_train(model_dir, "no", sizes))
        else:
            run_check(report, "train_fp16", box["train"], deadline, least["train"],
                      check_train(model_dir, "fp16", sizes))
            if native_bf16():
                run_check(report, "train_bf16", box["train"], deadline, least["train"],
                          check_train(model_dir, "bf16", sizes))
            else:
                major, minor = torch.cuda.get_device_capability()
                report.check("train_bf16", status="skipped",
                             reason=f"no bf16 (compute capability {major}.{minor} < 8: "
                             "emulated only)")
        run_check(report, "train_lora", box["train"], deadline, least["train"],
                  check_lora(root, sizes, None))
        run_check(report, "train_qlora", box["train"], deadline, least["train"],
                  check_lora(root, sizes, "4bit"))
        reset_accelerate()
        n_gpus = torch.cuda.device_count() if not dry_run else 0
        if dry_run or n_gpus >= 2:
            run_check(report, "ddp_2gpu", box["ddp_2gpu"], deadline, least["ddp_2gpu"],
                      check_ddp(root / "ddp", model_dir, sizes, procs,
                                args.out.with_name(args.out.stem + "_ddp.log")))
        else:
            report.check("ddp_2gpu", status="skipped", reason=f"{n_gpus} GPU")
        run_check(report, "throughput", box["throughput"], deadline, least["throughput"],
                  check_throughput(sizes, args.precision))
    finally:
        timer.cancel()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
    code = 1 if report.failed() else 0
    report.write(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
