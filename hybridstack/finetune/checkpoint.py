"""Per-fold checkpoints: ``fold_<k>/last/`` to resume, ``fold_<k>/best/`` to predict.

``last/`` is ``accelerator.save_state`` (model, optimizer, scheduler, grad scaler, every
process's RNG) plus ``trainer_state.json`` (epoch, early-stopping state, config hash).
``best/`` is ``save_pretrained`` of the best epoch's model and its tokenizer, loadable by
``AutoModelForSequenceClassification.from_pretrained``. Both are written into a hidden
temp folder and renamed into place, so a kill never leaves a half checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

from hybridstack.errors import HybridstackError
from hybridstack.runs import read_json, write_json

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Everything besides tensors that resuming a fold needs."""

    epoch: int = 0  # epochs completed
    best_score: float | None = None
    best_epoch: int = 0  # 1-based; 0 = none yet
    bad_epochs: int = 0  # epochs since the last improvement
    stopped: bool = False  # early stopping fired
    history: list[dict] = field(default_factory=list)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder over ``final`` (folders cannot be os.replace'd)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a kill between the two renames of :func:`replace_dir` (the old copy is complete)."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        old.rename(final)


class FoldCheckpoints:
    """Writes and reads one fold's checkpoints; every process calls every method."""

    def __init__(self, accelerator: Accelerator, fold_dir: Path, config_hash: str,
                 partial_model: bool = False):
        self.accelerator = accelerator
        self.fold_dir = Path(fold_dir)
        self.config_hash = config_hash
        # LoRA: last/ holds only the trainable weights (lora.adapter_only_checkpoints)
        self.partial_model = partial_model

    @property
    def last_dir(self) -> Path:
        return self.fold_dir / "last"

    @property
    def best_dir(self) -> Path:
        return self.fold_dir / "best"

    def resume(self) -> TrainState:
        """Load ``last/`` into the prepared objects and return its state (fresh state if none)."""
        if self.accelerator.is_main_process:
            recover_dir(self.last_dir)
            recover_dir(self.best_dir)
        self.accelerator.wait_for_everyone()
        state_path = self.last_dir / STATE_FILE
        if not state_path.is_file():
            return TrainState()
        saved = read_json(state_path)
        if saved.get("config_hash") != self.config_hash:
            raise HybridstackError(
                f"{self.last_dir} is a resume checkpoint of a different finetune config "
                f"(hash {saved.get('config_hash')}, now {self.config_hash}); delete that folder "
                "to restart the fold, or restore the settings it was made with"
            )
        if self.partial_model:
            self.accelerator.load_state(str(self.last_dir), strict=False)
        else:
            self.accelerator.load_state(str(self.last_dir))
        state = TrainState(**saved["state"])
        log.info("%s: resumed after epoch %d", self.fold_dir.name, state.epoch)
        return state

    def save_last(self, state: TrainState) -> None:
        """Checkpoint everything needed to continue after ``state.epoch`` epochs."""

        def fill(tmp: Path) -> None:
            self.accelerator.save_state(str(tmp))  # per-process RNG files: every rank writes
            if self.accelerator.is_main_process:
                write_json(tmp / STATE_FILE, {"config_hash": self.config_hash, "state": asdict(state)})

        self._write_dir(self.last_dir, fill, every_process=True)

    def save_best(self, model, tokenizer,
                  writer: Callable[[object, object, Path], None] | None = None) -> None:
        """``save_pretrained`` of the model (unwrapped from DDP) and its tokenizer.

        ``writer(model, tokenizer, folder)`` replaces it (LoRA: the adapters and the base's id).
        """

        def fill(tmp: Path) -> None:
            unwrapped = self.accelerator.unwrap_model(model)
            if writer is not None:
                writer(unwrapped, tokenizer, tmp)
                return
            unwrapped.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))

        self._write_dir(self.best_dir, fill, every_process=False)

    def clear_last(self) -> None:
        """Drop the resume checkpoint once the fold's predictions are saved (it is large)."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.last_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _write_dir(self, final: Path, fill: Callable[[Path], None], every_process: bool) -> None:
        tmp = final.with_name(f".{final.name}.tmp")
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if every_process or main:
            fill(tmp)
        self.accelerator.wait_for_everyone()
        if main:
            replace_dir(tmp, final)
        self.accelerator.wait_for_everyone()
