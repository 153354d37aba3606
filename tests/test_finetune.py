"""Stage finetune on a tiny randomly initialised DeBERTa-v2 with an in-test sentencepiece vocab."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import (
    AutoModelForSequenceClassification,
    DebertaV2Config,
    DebertaV2Model,
    DebertaV2Tokenizer,
)

from hybridstack.config import load_config
from hybridstack.errors import HybridstackError
from hybridstack.finetune import loop
from hybridstack.finetune.data import (
    LengthGroupedBatchSampler,
    Renderer,
    allocate_budget,
    truncate_head_tail,
)
from hybridstack.finetune.launch import check_devices
from hybridstack.finetune.model import class_weights, load_classifier, load_tokenizer
from hybridstack.runs import ExperimentDir
from hybridstack.stages import finetune as stage
from hybridstack.synthetic import multiclass_frame, multilabel_frame, pairwise_frame

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer DeBERTa-v2 (hidden 32) with a sentencepiece vocab trained on synthetic text."""
    folder = tmp_path_factory.mktemp("tiny_deberta")
    corpus = folder / "corpus.txt"
    texts = [*multiclass_frame(150)["text"], *multilabel_frame(150)["comment_text"],
             *pairwise_frame(100)["response_a"]]
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=300, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]",
        bos_piece="[CLS]", eos_piece="[SEP]", user_defined_symbols=["[MASK]"], hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))
    vocab = [(sp.id_to_piece(i), 0.0 if sp.id_to_piece(i) in SPECIALS else sp.get_score(i))
             for i in range(sp.get_piece_size())]
    tokenizer = DebertaV2Tokenizer(vocab=vocab)
    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                             pad_token_id=tokenizer.pad_token_id)
    model_dir = folder / "model"
    DebertaV2Model(config).save_pretrained(model_dir)  # a backbone, as on the hub
    tokenizer.save_pretrained(model_dir)
    return model_dir


def finetune_section(model_dir: Path, **extra) -> dict:
    settings = {"enabled": True, "model": str(model_dir), "max_length": 48, "epochs": 3,
                "batch_size": 16, "eval_batch_size": 64, "lr": 1e-3, "warmup_ratio": 0.1,
                "folds": [0], "patience": 3}
    return {**settings, **extra}


def run_stage(cfg):
    stage.run(cfg)
    model = ExperimentDir(cfg.run_dir).model(stage.model_folder_name(cfg.finetune))
    return model, np.load(model.oof_path), np.load(model.test_path)


# -- rendering ----------------------------------------------------------------------------


def test_budget_fills_short_segments_first_and_splits_the_rest_by_share():
    assert allocate_budget([1000, 1000, 1000], (0.2, 0.4, 0.4), 100) == [20, 40, 40]
    assert allocate_budget([10, 1000, 1000], (0.2, 0.4, 0.4), 100) == [10, 45, 45]
    assert allocate_budget([10, 20, 1000], (0.2, 0.4, 0.4), 100) == [10, 20, 70]
    assert allocate_budget([5, 5, 5], (0.2, 0.4, 0.4), 100) == [5, 5, 5]
    assert sum(allocate_budget([33, 77, 91], (0.2, 0.4, 0.4), 101)) == 101


def test_head_tail_truncation_keeps_both_ends():
    ids = list(range(100))
    assert truncate_head_tail(ids, 10, 0.5) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert truncate_head_tail(ids, 10, 0.7) == [*range(7), 97, 98, 99]
    assert truncate_head_tail(ids, 10, 1.0) == list(range(10))
    assert truncate_head_tail(ids, 10, 0.0) == list(range(90, 100))
    assert truncate_head_tail(ids[:5], 10, 0.5) == ids[:5]


def test_pairwise_rendering_respects_budgets_and_swaps(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    renderer = Renderer(tokenizer, ["prompt", "response_a", "response_b"], (0.2, 0.4, 0.4),
                        max_length=40, head_fraction=0.5)
    long_a = " ".join(f"match{i}" for i in range(200))
    fields = {"prompt": ["Explain the recipe?"], "response_a": [long_a], "response_b": ["Clearly detailed."]}
    (ids,), (swapped,) = renderer.render(fields, swap=("response_a", "response_b"))
    sep, cls = tokenizer.sep_token_id, tokenizer.cls_token_id
    assert len(ids) == 40 and ids[0] == cls and ids.count(sep) == 3 and ids[-1] == sep
    prompt, resp_a, resp_b = (tokenizer(fields[f][0], add_special_tokens=False)["input_ids"]
                              for f in ("prompt", "response_a", "response_b"))
    # short prompt and response B keep every token; A gets the rest, head and tail
    kept_a = 40 - 4 - len(prompt) - len(resp_b)
    assert ids == [cls, *prompt, sep, *truncate_head_tail(resp_a, kept_a, 0.5), sep, *resp_b, sep]
    assert swapped == [cls, *prompt, sep, *resp_b, sep, *truncate_head_tail(resp_a, kept_a, 0.5), sep]


def test_class_weights_are_inverse_frequency_summing_to_k():
    Y = np.zeros((100, 3), dtype=np.float32)
    Y[:50, 0], Y[:10, 1] = 1, 1  # rates 0.5, 0.1, 0 (counted as 1/100)
    w = class_weights(Y)
    inverse = np.array([2.0, 10.0, 100.0])
    np.testing.assert_allclose(w, inverse / inverse.sum() * 3, rtol=1e-6)
    assert w.sum() == pytest.approx(3.0)


def test_length_grouped_batches_cover_every_row_once_and_reduce_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000).tolist()
    grouped = LengthGroupedBatchSampler(lengths, 8, seed=1)
    plain = LengthGroupedBatchSampler(lengths, 8, seed=1, group_by_length=False)
    batches = list(grouped)
    assert len(batches) == len(grouped)
    assert sorted(i for b in batches for i in b) == list(range(1000))

    def padded_tokens(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    assert padded_tokens(batches) < 0.7 * padded_tokens(list(plain))
    assert list(grouped) == batches  # same seed and epoch: same batches
    grouped.set_epoch(1)
    assert list(grouped) != batches


def test_dropout_override_reaches_hidden_states_and_head(tiny_model):
    model = load_classifier(tiny_model, ["a", "b"], multilabel=False, dropout=0.3)
    assert model.config.hidden_dropout_prob == 0.3 and model.dropout.p == 0.3
    assert model.config.attention_probs_dropout_prob == 0.1  # the checkpoint's (own key)
    assert model.config.problem_type == "single_label_classification"


# -- training -----------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest


def _prior_log_loss(target: np.ndarray) -> float:
    """Chance level: predicting the class frequencies for every row."""
    return _log_loss(target, np.tile(target.mean(axis=0), (len(target), 1)))


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_learns_single_text_tasks_above_chance(make_config, tiny_model, kind):
    cfg, _ = make_config(kind, n_train=300, n_test=30,
                         finetune=finetune_section(tiny_model, epochs=4, batch_size=8, lr=3e-3))
    model, oof, test = run_stage(cfg)
    score = model.load_scores()["overall"]
    target = _train_target(cfg)[np.load(ExperimentDir(cfg.run_dir).folds_path) == 0]
    assert test.shape == (30, target.shape[1])
    if kind == "multilabel":
        assert score > 0.6  # chance is 0.5 mean ROC-AUC
    else:
        assert score < _prior_log_loss(target) - 0.1


def test_pairwise_swap_averaging_is_symmetric(make_config, tiny_model, append_swapped_test_rows):
    cfg, _ = make_config("pairwise", n_train=90, n_test=10,
                         finetune=finetune_section(tiny_model, epochs=1, max_length=96))
    append_swapped_test_rows(cfg)
    _, oof, test = run_stage(cfg)
    np.testing.assert_allclose(test.sum(axis=1), 1.0, atol=1e-5)
    # a row and its A/B-swapped twin get the same probabilities with winner A/B exchanged
    np.testing.assert_allclose(test[10:], test[:10][:, [1, 0, 2]], atol=1e-6)
    assert not np.array_equal(test[:, 0], test[:, 1])  # not trivially symmetric: A != B


def _train_target(cfg) -> np.ndarray:
    from hybridstack.experiment import open_experiment

    return open_experiment(cfg).train.Y


def _log_loss(Y: np.ndarray, P: np.ndarray) -> float:
    P = np.clip(P, 1e-7, 1)
    return float(-(Y * np.log(P)).sum(axis=1).mean())


def test_oof_rows_are_the_validation_rows_in_order(make_config, tiny_model):
    cfg, _ = make_config("multilabel", n_train=90, n_test=12,
                         finetune=finetune_section(tiny_model, epochs=1, folds=[1]))
    model, oof, test = run_stage(cfg)
    folds = np.load(ExperimentDir(cfg.run_dir).folds_path)
    covered = ~np.isnan(oof).any(axis=1)
    np.testing.assert_array_equal(covered, folds == 1)
    # predicting the validation rows one by one with the saved best model gives the same rows
    best = AutoModelForSequenceClassification.from_pretrained(model.path / "fold_1" / "best").eval()
    tokenizer = load_tokenizer(model.path / "fold_1" / "best")
    renderer = Renderer(tokenizer, ["text"], (1.0,), 48, 0.5)
    from hybridstack.experiment import open_experiment

    exp = open_experiment(cfg)
    ids, _ = renderer.render(exp.train.subset(np.flatnonzero(folds == 1)).fields)
    with torch.no_grad():
        direct = np.stack([torch.sigmoid(best(input_ids=torch.tensor([row])).logits)[0].numpy()
                           for row in ids])
    np.testing.assert_allclose(oof[covered], direct, atol=1e-5)


def test_resume_after_a_kill_gives_the_same_predictions(make_config, tiny_model,
                                                        killed_after_first_epoch):
    section = finetune_section(tiny_model, epochs=3)
    reference_cfg, _ = make_config("pairwise", n_train=90, n_test=12, finetune=section,
                                   experiment="uninterrupted")
    _, ref_oof, ref_test = run_stage(reference_cfg)

    cfg, _ = make_config("pairwise", n_train=90, n_test=12, finetune=section, experiment="killed")
    killed_after_first_epoch(cfg)
    fold_dir = ExperimentDir(cfg.run_dir).model(stage.model_folder_name(cfg.finetune)).fold_dir(0)
    assert (fold_dir / "last" / "trainer_state.json").is_file()

    model, oof, test = run_stage(cfg)
    np.testing.assert_allclose(oof, ref_oof, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(test, ref_test, atol=1e-6)
    history = model.load_scores()["fold_info"]["0"]
    assert history["best_iteration"] >= 1


def test_resume_folder_from_another_config_is_one_error_line(make_config, tiny_model, monkeypatch):
    cfg, path = make_config("multiclass", n_train=60, n_test=6,
                            finetune=finetune_section(tiny_model, epochs=2))

    def die(self, state):
        raise KeyboardInterrupt

    real_save = loop.FoldCheckpoints.save_last
    monkeypatch.setattr(loop.FoldCheckpoints, "save_last",
                        lambda self, state: (real_save(self, state), die(self, state)))
    with pytest.raises(KeyboardInterrupt):
        stage.run(cfg)
    monkeypatch.undo()
    changed = load_config(path, ["finetune.lr=2e-3"])
    with pytest.raises(HybridstackError, match="different finetune config") as err:
        stage.run(changed)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["lmsys.toml", "jigsaw.toml"])
def test_shipped_recipes_validate_once_data_paths_exist(make_config, name):
    import tomllib

    from hybridstack.config import config_from_dict

    kind = "pairwise" if name == "lmsys.toml" else "multilabel"
    local, _ = make_config(kind, n_train=30, n_test=6)
    raw = tomllib.loads((Path(__file__).parents[1] / "configs" / name).read_text())
    paths = ("train", "test", "sample_submission")
    assert all(raw["data"][k].startswith("/kaggle/input/") for k in paths)
    raw["data"].update({k: str(getattr(local.data, k)) for k in paths})
    cfg = config_from_dict(raw)
    assert cfg.task.kind == kind and cfg.embed.model == "intfloat/e5-small-v2"
    assert stage.model_folder_name(cfg.finetune) in {"deberta_v3_small", "mdeberta_v3_base"}


# -- bad input ----------------------------------------------------------------------------


def test_missing_model_folder_is_one_error_line(make_config, tmp_path):
    cfg, _ = make_config("multiclass", n_train=30, n_test=6,
                         finetune={"enabled": True, "model": str(tmp_path / "no_such_model")})
    with pytest.raises(HybridstackError, match="model folder not found") as err:
        stage.run(cfg)
    assert "\n" not in str(err.value)


def test_unloadable_tokenizer_is_one_error_line(make_config, tiny_model, tmp_path):
    weights_only = tmp_path / "weights_only"
    AutoModelForSequenceClassification.from_pretrained(tiny_model).save_pretrained(weights_only)
    cfg, _ = make_config("multiclass", n_train=30, n_test=6,
                         finetune={"enabled": True, "model": str(weights_only)})
    with pytest.raises(HybridstackError, match="tokenizer") as err:
        stage.run(cfg)
    assert "\n" not in str(err.value)


def test_more_processes_than_devices_is_one_error_line(make_config):
    _, path = make_config("multiclass", n_train=30, n_test=6)
    if torch.cuda.device_count() < 64:
        with pytest.raises(HybridstackError, match="GPU") as err:
            check_devices(64, cpu=False)
        assert "\n" not in str(err.value)
    with pytest.raises(HybridstackError, match="CPU cores"):
        check_devices(100_000, cpu=True)
    from hybridstack.cli import main

    assert main(["run", "finetune", "-c", str(path), "--num-processes", "100000", "--cpu"]) == 2


def test_token_ids_are_written_once_reused_on_resume_and_removed_after_done(make_config,
                                                                            tiny_model, monkeypatch):
    cfg, _ = make_config("pairwise", n_train=60, n_test=10,
                         finetune=finetune_section(tiny_model, epochs=1, swap_augment=True))
    model_path = ExperimentDir(cfg.run_dir).model(stage.model_folder_name(cfg.finetune)).path
    writes, seen = [], {}
    real_write, real_train = stage.write_token_cache, stage.train_folds

    def counting_write(folder, *args):
        writes.append(folder)
        real_write(folder, *args)

    def session_timeout(exp, accelerator, model_dir, model, tokenizer, views, *args):
        seen.update(views)
        raise KeyboardInterrupt  # a Kaggle session cut off mid-training

    monkeypatch.setattr(stage, "write_token_cache", counting_write)
    monkeypatch.setattr(stage, "train_folds", session_timeout)
    with pytest.raises(KeyboardInterrupt):
        stage.run(cfg)
    (folder,) = writes
    assert folder.parent == model_path / stage.TOKENS_DIR
    assert (folder / "train" / "ids.npy").is_file() and (folder / "test" / "ids.npy").is_file()
    # every view is a memory-mapped slice; the swapped half follows the rows in the same file
    assert isinstance(seen["train"].flat, np.memmap) and seen["train_swapped"].flat is seen["train"].flat
    assert len(seen["train"]) == len(seen["train_swapped"]) == 60 and len(seen["test"]) == 10
    expected = stage.encode_experiment(stage.stage_experiment(cfg, "finetune"),
                                       load_tokenizer(tiny_model))
    for name in ("train", "train_swapped", "test", "test_swapped"):
        assert seen[name].to_lists() == expected[name].to_lists()

    monkeypatch.setattr(stage, "train_folds", real_train)
    stage.run(cfg)  # the resumed run reads the same files, then finishes the model
    assert len(writes) == 1
    assert (model_path / "DONE").is_file() and not (model_path / stage.TOKENS_DIR).exists()


# -- multi-process (slow) -----------------------------------------------------------------


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(make_config, tiny_model):
    # lr ~ 0: weights stay at their (seeded) init, so any row mix-up across processes shows
    section = finetune_section(tiny_model, epochs=1, lr=1e-12, weight_decay=0.0)
    one_cfg, _ = make_config("pairwise", n_train=150, n_test=37, finetune=section, experiment="one")
    _, one_oof, one_test = run_stage(one_cfg)
    two_cfg, two_path = make_config("pairwise", n_train=150, n_test=37, finetune=section,
                                    experiment="two")
    completed = subprocess.run([sys.executable, "-m", "hybridstack", "run", "finetune", "-c",
                                str(two_path), "--num-processes", "2", "--cpu"],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    model = ExperimentDir(two_cfg.run_dir).model(stage.model_folder_name(two_cfg.finetune))
    two_oof, two_test = np.load(model.oof_path), np.load(model.test_path)
    assert two_oof.shape == one_oof.shape and two_test.shape == (37, 3)
    np.testing.assert_array_equal(np.isnan(two_oof), np.isnan(one_oof))
    np.testing.assert_allclose(two_oof, one_oof, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(two_test, one_test, atol=1e-5)
    assert model.load_scores()["rows_validated"] == int((~np.isnan(one_oof).any(axis=1)).sum())
