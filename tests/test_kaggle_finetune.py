"""The fine-tune on real-checkpoint shapes: float16-stored weights, an spm-only tokenizer,
dropout that means hidden + classifier, a non-finite loss that stops the fold in one line,
the process count in the hash, and `run all --num-processes`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hybridstack import cli
from hybridstack.config import load_config
from hybridstack.errors import HybridstackError
from hybridstack.experiment import open_experiment
from hybridstack.finetune import loop
from hybridstack.finetune.model import load_classifier, load_tokenizer
from hybridstack.runs import ExperimentDir
from hybridstack.stages import finetune as stage
from hybridstack.synthetic import multiclass_frame, pairwise_frame, write_tiny_deberta_v3


@pytest.fixture(scope="module")
def hub_deberta(tmp_path_factory) -> Path:
    """A tiny DeBERTa-v3 stored as on the Hub: float16 weights, spm.model only."""
    texts = [*multiclass_frame(150)["text"], *pairwise_frame(80)["response_a"]]
    return write_tiny_deberta_v3(tmp_path_factory.mktemp("hub") / "deberta-v3-tiny", texts)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest


def section(model: Path, **extra) -> dict:
    return {"enabled": True, "model": str(model), "max_length": 48, "epochs": 1,
            "batch_size": 16, "eval_batch_size": 64, "lr": 1e-3, "folds": [0], **extra}


def safetensors_dtypes(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {str(fh.get_slice(name).get_dtype()) for name in fh.keys()}


def test_hub_shaped_checkpoint_is_float16_and_spm_only(hub_deberta):
    assert sorted(p.name for p in hub_deberta.iterdir()) == [
        "config.json", "model.safetensors", "spm.model", "tokenizer_config.json"]
    assert safetensors_dtypes(hub_deberta) == {"F16"}
    tokenizer = load_tokenizer(hub_deberta)  # converted from spm.model offline
    ids = tokenizer("the food was great")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]


def test_float16_weights_load_as_float32(hub_deberta):
    model = load_classifier(hub_deberta, ["a", "b", "c"], multilabel=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_missing_protobuf_is_one_line_naming_it(hub_deberta, monkeypatch):
    import transformers

    def tiktoken_error(*args, **kwargs):  # what transformers says when protobuf is absent
        raise ValueError("`tiktoken` is required to read a `tiktoken` file.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tiktoken_error)
    with pytest.raises(HybridstackError, match="protobuf") as err:
        load_tokenizer(hub_deberta)
    assert "\n" not in str(err.value) and "tiktoken" not in str(err.value)


def test_dropout_means_hidden_and_classifier_attention_has_its_own_key(hub_deberta):
    model = load_classifier(hub_deberta, ["a", "b"], multilabel=False, dropout=0.3)
    assert model.config.hidden_dropout_prob == 0.3
    assert model.config.cls_dropout == 0.3 and model.dropout.p == 0.3  # the head
    assert model.config.attention_probs_dropout_prob == 0.1  # the checkpoint's
    assert model.config.pooler_dropout == 0.0  # the checkpoint's
    both = load_classifier(hub_deberta, ["a", "b"], multilabel=False, dropout=0.3,
                           attention_dropout=0.05)
    assert both.config.attention_probs_dropout_prob == 0.05
    assert both.config.hidden_dropout_prob == 0.3


def test_finetune_of_float16_checkpoint_saves_float32_best(make_config, hub_deberta):
    cfg, _ = make_config("pairwise", n_train=60, n_test=8, finetune=section(hub_deberta))
    stage.run(cfg)
    model = ExperimentDir(cfg.run_dir).model(stage.model_folder_name(cfg.finetune))
    best = model.fold_dir(0) / "best"
    assert safetensors_dtypes(best) == {"F32"}
    assert np.isfinite(np.load(model.test_path)).all()
    assert not (model.fold_dir(0) / "last").exists()  # resume state dropped once the fold finished


def test_non_finite_loss_stops_the_fold_in_one_line_and_keeps_finished_folds(
        make_config, hub_deberta, monkeypatch):
    cfg, path = make_config("multiclass", n_train=60, n_test=6,
                            finetune=section(hub_deberta, folds=[0, 1]))
    real_train_fold = stage.train_fold
    trained = []

    def diverge_on_fold_1(*args):
        fold = args[-1]
        trained.append(fold)
        if fold == 1:  # as an fp16 overflow would: the forward loss turns NaN
            monkeypatch.setattr(loop, "make_loss", lambda *a, **k: lambda logits, Y: logits.sum() * np.nan)
        return real_train_fold(*args)

    monkeypatch.setattr(stage, "train_fold", diverge_on_fold_1)
    with pytest.raises(HybridstackError) as err:
        stage.run(cfg)
    message = str(err.value)
    assert "\n" not in message and "fold 1" in message and "nan" in message
    assert "finetune.mixed_precision=no" in message and "lower finetune.lr" in message
    model = ExperimentDir(cfg.run_dir).model(stage.model_folder_name(cfg.finetune))
    assert (model.fold_dir(0) / "pred.npz").is_file() and not model.is_done()
    assert not (model.fold_dir(1) / "last").exists()  # the diverged fold restarts

    monkeypatch.undo()
    trained.clear()
    monkeypatch.setattr(stage, "train_fold", lambda *args: trained.append(args[-1]) or real_train_fold(*args))
    # the fix the message names; the finished fold 0 is reused, not retrained
    stage.run(load_config(path, ['finetune.mixed_precision="no"']))
    assert trained == [1] and model.is_done()


def test_check_finite_stops_every_process_when_one_diverges():
    class OtherRankDiverged:
        num_processes = 2

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + 1  # this rank is finite, the other one is not

    with pytest.raises(loop.NonFiniteLoss, match="another process"):
        loop.check_finite(OtherRankDiverged(), torch.tensor(0.5), step=3)


def test_process_count_joins_the_hash_and_one_process_keeps_the_old_hash(make_config, hub_deberta):
    import hashlib

    cfg, _ = make_config("multiclass", n_train=30, n_test=6, finetune=section(hub_deberta),
                         cv={"early_stopping": "held_out_fold"})
    exp = open_experiment(cfg)
    assert stage.fold_config_hash(exp, 2) != stage.fold_config_hash(exp, 1)
    # the formula of the first release (its best epoch was chosen on the held-out fold):
    # runs it finished are not refitted after the upgrade when that choice is kept
    old = cfg.finetune.model_dump(mode="json", exclude={"enabled", "folds", "num_workers"})
    for added in ("attention_dropout", "method", "lora", "quantization", "teacher",
                  "teacher_weight"):  # keys added later, at their defaults
        old.pop(added)
    legacy = hashlib.sha256((exp.fingerprint + json.dumps(old, sort_keys=True)).encode())
    assert stage.fold_config_hash(exp, 1) == legacy.hexdigest()[:16]
    exp.cfg.cv.early_stopping = "inner"  # the default now: the epoch is chosen elsewhere
    assert stage.fold_config_hash(exp, 1) != legacy.hexdigest()[:16]


def test_run_all_launches_only_the_finetune_on_n_processes(make_config, monkeypatch):
    cfg, path = make_config("multiclass", n_train=40, n_test=8, finetune={"enabled": True})
    launched = []

    def fake_launch(exp, num_processes, cpu=False):
        launched.append((exp.cfg.experiment, num_processes, cpu))
        return 0

    import hybridstack.pipeline as pipeline

    monkeypatch.setattr(pipeline, "launch_multiprocess", fake_launch)
    assert cli.main(["run", "all", "-c", str(path), "--num-processes", "2", "--cpu"]) == 0
    assert launched == [(cfg.experiment, 2, True)]
    assert (cfg.run_dir / "models" / "tfidf_logreg" / "DONE").is_file()  # ran in this process
    assert cli.main(["run", "tfidf", "-c", str(path), "--num-processes", "2"]) == 2


def test_a_failed_multiprocess_finetune_stops_run_all(make_config, monkeypatch):
    cfg, path = make_config("multiclass", n_train=40, n_test=8, finetune={"enabled": True},
                            stack={"enabled": True})
    import hybridstack.pipeline as pipeline

    monkeypatch.setattr(pipeline, "launch_multiprocess", lambda *a, **k: 3)
    assert cli.main(["run", "all", "-c", str(path), "--num-processes", "2", "--cpu"]) == 3
    assert not (cfg.run_dir / "stack").exists()
