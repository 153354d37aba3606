"""``hybridstack audit <experiment_dir>``: check a finished experiment for the classic mistakes.

Every check reports PASS, FAIL or SKIP with a one-line detail; the command exits 1 when
any check fails. Nothing is written: the data is re-read from the config snapshot.

* ``artifacts``: every file under a final name loads (temp files of killed runs are listed).
* ``folds``: folds.npy has one row per train row, the data fingerprint equals dataset.json's,
  and folds re-derived from the config snapshot equal folds.npy.
* ``groups``: no fold group (pairwise: the prompt) spans two folds.
* ``oof <model>``: OOF rows cover whole folds (NaN only for untrained folds), hold
  probabilities, and rescore to the per-fold scores recorded in scores.json.
* ``permutation <model>``: the cheap heads (TF-IDF logistic regression, embedding heads on
  the cached features) retrained on shuffled labels with the same folds must score at
  chance. A leak (e.g. kNN label features built over validation rows) scores above it.
* ``near-duplicates``: share of test rows with a train row at cosine >= 0.95 (cached
  embeddings of the embed stage; SKIP without them).
* ``submission``: submission.csv passes the task's validation against the sample.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import joblib
import numpy as np
import pandas as pd

from hybridstack.errors import HybridstackError, one_line
from hybridstack.experiment import Experiment, dataset_record, reopen_experiment
from hybridstack.folds import make_folds
from hybridstack.heads.base import fit_oof
from hybridstack.runs import DONE_FILE, ExperimentDir, ModelDir, read_json

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
SCORE_TOLERANCE = 1e-4  # recorded vs rescored per-fold metric
NULL_PERMUTATIONS = 100  # label shuffles within folds that give the chance distribution
CHANCE_Z = 4.0  # a shuffled-label model this many null standard deviations above chance fails
CHANCE_FLOOR = 0.005  # ... and at least this far above (metric units), for very large data
DUPLICATE_COSINE = 0.95
QUERY_BATCH = 4096  # test rows per faiss search, so memory stays bounded


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str


# -- reading without writing -------------------------------------------------------------------


def load_experiment(run_dir: str | Path) -> tuple[Experiment, dict[str, Any]]:
    """The experiment in ``run_dir`` re-read read-only, and its dataset.json.

    The fingerprint is recomputed from the data as they are now (checked against the record).
    """
    exp_dir = ExperimentDir(Path(run_dir))
    needed = (exp_dir.config_path, exp_dir.dataset_path, exp_dir.folds_path)
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise HybridstackError(
            f"{run_dir} is not an experiment folder (no {', '.join(missing)}); "
            "pass runs/<experiment> after running a stage"
        )
    return reopen_experiment(exp_dir.path), read_json(exp_dir.dataset_path)


def model_dirs(exp_dir: ExperimentDir) -> list[ModelDir]:
    """Every base model folder with an oof.npy, then the stack's."""
    found = sorted(p for p in exp_dir.models_dir.glob("*") if (p / "oof.npy").is_file())
    models = [ModelDir(p) for p in found]
    return models + ([exp_dir.stack] if exp_dir.stack.oof_path.is_file() else [])


# -- artifacts -------------------------------------------------------------------------------


def is_temp_name(path: Path, root: Path) -> bool:
    """True for leftovers of an interrupted atomic write (``.name.XXXX.tmp``, ``.last.tmp/``)."""
    return any(part.startswith(".") and part.endswith((".tmp", ".old"))
               for part in path.relative_to(root).parts)


def _load_torch(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _load_safetensors(path: Path) -> Any:
    from safetensors.numpy import load_file

    return load_file(path)


def _load_npz(path: Path) -> None:
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            data[key]  # noqa: B018 - reading every array is the check


def _load_png(path: Path) -> None:
    data = path.read_bytes()
    if not (data.startswith(b"\x89PNG\r\n\x1a\n") and data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")):
        raise ValueError("not a complete PNG")


def _load_done(path: Path) -> None:
    if not path.read_text().strip():
        raise ValueError("empty DONE marker")


# How each kind of file is loaded; other files (tokenizer vocabularies, text) are only read.
_LOADERS: dict[str, Callable[[Path], Any]] = {
    ".npy": lambda p: np.load(p, allow_pickle=False),
    ".npz": _load_npz,
    ".json": lambda p: json.loads(p.read_text(encoding="utf-8")),
    ".toml": lambda p: tomllib.loads(p.read_text(encoding="utf-8")),
    ".joblib": joblib.load,
    ".csv": pd.read_csv,
    ".png": _load_png,
    ".safetensors": _load_safetensors,
    ".bin": _load_torch,
    ".pt": _load_torch,
    ".pkl": _load_torch,  # accelerate's random_states_<rank>.pkl are torch.save files
}


def unreadable_files(root: str | Path) -> tuple[list[str], list[Path]]:
    """Files under ``root`` with a final name that fail to load, and the temp leftovers.

    Returns
    -------
    problems : list of ``"relative/path: reason"``.
    temp_files : paths under temp names (left by killed writers; never read by a stage).
    """
    root = Path(root)
    problems, temp_files = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if is_temp_name(path, root):
            temp_files.append(path)
            continue
        loader = _LOADERS.get(path.suffix, _load_done if path.name == DONE_FILE else Path.read_bytes)
        try:
            loader(path)
        except Exception as err:  # any failure to load is the finding
            problems.append(f"{path.relative_to(root)}: {one_line(err)[:120]}")
    return problems, temp_files


def check_artifacts(exp_dir: ExperimentDir) -> Check:
    problems, temp_files = unreadable_files(exp_dir.path)
    if problems:
        return Check("artifacts", FAIL, f"{len(problems)} files do not load: {'; '.join(problems[:3])}")
    n_files = sum(1 for p in exp_dir.path.rglob("*") if p.is_file())
    left = f"; {len(temp_files)} temp files of interrupted writes (ignored)" if temp_files else ""
    return Check("artifacts", PASS, f"{n_files - len(temp_files)} files load{left}")


# -- folds and groups ------------------------------------------------------------------------


def check_folds(exp: Experiment, dataset: dict[str, Any]) -> Check:
    n_train = len(exp.train)
    if len(exp.folds) != n_train or dataset.get("n_train") != n_train:
        return Check("folds", FAIL, f"folds.npy has {len(exp.folds)} rows, dataset.json "
                     f"{dataset.get('n_train')}, the train file {n_train}")
    if dataset.get("fingerprint") != exp.fingerprint:
        old = dataset.get("shape", {})
        changed = [k for k, v in _shape(exp).items() if old.get(k) != v]
        return Check("folds", FAIL, "the data or settings changed since the run "
                     f"(changed: {', '.join(changed) or 'unknown'}); re-run in a new experiment")
    cv = exp.cfg.cv
    expected = make_folds(exp.task.stratify_target(exp.train.Y), cv.n_splits, cv.seed, exp.train.groups)
    if not np.array_equal(expected, exp.folds):
        n_moved = int((expected != exp.folds).sum())
        return Check("folds", FAIL, f"{n_moved} rows are in other folds than cv.n_splits="
                     f"{cv.n_splits}, cv.seed={cv.seed} give; folds.npy was changed or made elsewhere")
    counts = np.bincount(exp.folds.astype(np.int64))
    return Check("folds", PASS, f"{n_train} rows in {len(counts)} folds of {counts.min()}-{counts.max()} "
                 "rows; fingerprint and re-derived folds match")


def _shape(exp: Experiment) -> dict[str, Any]:
    return dataset_record(exp.cfg, exp.task, exp.train, exp.test)["shape"]


def check_groups(exp: Experiment) -> Check:
    if exp.train.groups is None:
        return Check("groups", SKIP, f"{exp.task.kind} task has no fold groups")
    folds_per_group = pd.Series(exp.folds).groupby(pd.Series(exp.train.groups)).nunique()
    spanning = folds_per_group[folds_per_group > 1]
    if len(spanning):
        example = str(spanning.index[0])[:40]
        return Check("groups", FAIL, f"{len(spanning)} groups span several folds (e.g. {example!r}): "
                     "their rows leak between training and validation")
    return Check("groups", PASS, f"{len(folds_per_group)} groups, each in one fold")


# -- out-of-fold predictions -------------------------------------------------------------------


def check_oof(exp: Experiment, model: ModelDir) -> Check:
    """Whole folds predicted or NaN, probabilities, and per-fold scores that rescore the same."""
    name = f"oof {model.name}" if model.name != "stack" else "oof stack"
    oof = np.load(model.oof_path, allow_pickle=False)
    shape = (len(exp.train), exp.task.n_classes)
    if oof.shape != shape:
        return Check(name, FAIL, f"shape {oof.shape}, expected {shape}")
    nan = np.isnan(oof)
    covered = ~nan.any(axis=1)
    if (nan.any(axis=1) & ~nan.all(axis=1)).any():
        return Check(name, FAIL, "rows with NaN in only some columns")
    if not covered.any():
        return Check(name, FAIL, "no row was validated")
    values = oof[covered]
    if values.min() < 0 or values.max() > 1:
        return Check(name, FAIL, f"values outside [0, 1] ({values.min():.3g}..{values.max():.3g})")
    trained = []
    for k in range(exp.n_splits):
        rows = exp.folds == k
        if covered[rows].any() and not covered[rows].all():
            return Check(name, FAIL, f"fold {k} is only partly predicted "
                         f"({int(covered[rows].sum())} of {int(rows.sum())} rows): not the folds.npy folds")
        if covered[rows].all():
            trained.append(k)
    if model.name != "stack":  # the stack's per_fold may refer to a re-split of its rows
        mismatch = _score_mismatch(exp, model, oof, trained)
        if mismatch:
            return Check(name, FAIL, mismatch)
    untrained = exp.n_splits - len(trained)
    note = f"; {untrained} untrained folds NaN by design" if untrained else ""
    return Check(name, PASS, f"{int(covered.sum())} rows in {len(trained)} whole folds{note}")


def _score_mismatch(exp: Experiment, model: ModelDir, oof: np.ndarray, trained: list[int]) -> str | None:
    per_fold = model.load_scores().get("per_fold", {}) if model.scores_path.is_file() else {}
    recorded = sorted(int(k) for k in per_fold)
    if per_fold and recorded != trained:
        return f"scores.json names folds {recorded} but folds {trained} are predicted"
    for k in trained:
        if str(k) not in per_fold:
            continue
        rows = exp.folds == k
        rescored = exp.task.score(exp.train.Y[rows], oof[rows])
        if not np.isclose(rescored, per_fold[str(k)], rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE):
            return (f"fold {k} rescores to {rescored:.5f} but scores.json says {per_fold[str(k)]:.5f}: "
                    "predicted on other folds or rows")
    return None


# -- label permutation -------------------------------------------------------------------------


def chance_distribution(task_score: Callable[[np.ndarray, np.ndarray], float], Y: np.ndarray,
                        P: np.ndarray, folds: np.ndarray, seed: int) -> np.ndarray:
    """Scores of ``P`` against ``Y`` shuffled within each fold, ``NULL_PERMUTATIONS`` times.

    Within-fold shuffles keep each fold's label mix, so the fold-prior effects a model
    trained on shuffled labels legitimately shows stay in the null distribution.
    """
    rng = np.random.default_rng(seed)
    fold_rows = [np.flatnonzero(folds == k) for k in np.unique(folds)]
    scores = []
    for _ in range(NULL_PERMUTATIONS):
        order = np.arange(len(Y))
        for rows in fold_rows:
            order[rows] = rng.permutation(rows)
        scores.append(task_score(Y[order], P))
    return np.asarray(scores)


def permutation_verdict(name: str, exp: Experiment, Y: np.ndarray, oof: np.ndarray,
                        folds: np.ndarray, seed: int) -> Check:
    """PASS when the shuffled-label OOF score is not better than chance beyond noise.

    Worse than chance is not a leak (a model that overfits noise), so the test is one-sided.
    """
    task = exp.task
    score = task.score(Y, oof)
    null = chance_distribution(task.score, Y, oof, folds, seed)
    sign = 1.0 if task.greater_is_better else -1.0
    gain = sign * (score - null.mean())
    margin = max(CHANCE_Z * null.std(), CHANCE_FLOOR)
    detail = (f"shuffled-label {task.metric_name} {score:.4f}, chance {null.mean():.4f} "
              f"+/- {null.std():.4f} ({len(Y)} rows)")
    if gain > margin:
        return Check(name, FAIL, f"{detail}: better than chance, so labels leak into the features")
    return Check(name, PASS, detail)


def _shuffled(exp: Experiment, rows: np.ndarray, seed: int) -> np.ndarray:
    return exp.train.Y[rows][np.random.default_rng(seed).permutation(len(rows))]


def _model_stage(model: ModelDir) -> tuple[str | None, dict[str, Any]]:
    if not model.config_path.is_file():
        return None, {}
    config = read_json(model.config_path)
    return config.get("stage"), config.get("settings", {})


def permutation_checks(exp: Experiment, max_rows: int, seed: int) -> list[Check]:
    """Retrain every TF-IDF and embedding head on shuffled labels (at most ``max_rows`` rows)."""
    rng = np.random.default_rng(seed)
    n = len(exp.train)
    rows = np.sort(rng.choice(n, max_rows, replace=False)) if n > max_rows else np.arange(n)
    Y, folds = _shuffled(exp, rows, seed), exp.folds[rows]
    checks = []
    for model in exp.dir.finished_models():
        stage, settings = _model_stage(model)
        if stage not in ("tfidf", "embed"):
            continue
        name = f"permutation {model.name}"
        built = (_tfidf_head(exp, settings) if stage == "tfidf" else _embed_head(exp, settings))
        if isinstance(built, str):
            checks.append(Check(name, SKIP, built))
            continue
        head, X = built
        result = fit_oof(head, X[rows], Y, folds, score=exp.task.score)
        checks.append(permutation_verdict(name, exp, Y, result.oof, folds, seed))
    if not checks:
        checks.append(Check("permutation", SKIP, "no finished tfidf or embed model"))
    return checks


def _tfidf_head(exp: Experiment, settings: dict[str, Any]) -> tuple[Any, Any] | str:
    from hybridstack.features.tfidf import matrix_cache_path
    from hybridstack.heads.logreg import LogRegHead

    path = matrix_cache_path(exp)
    if not path.is_file():
        return f"no cached TF-IDF matrix {path.name} for the snapshot's [tfidf] settings"
    spec = settings.get("model", {})
    head = LogRegHead(multilabel=exp.task.kind == "multilabel", C=spec.get("C", 4.0),
                      class_weight=spec.get("class_weight"), max_iter=spec.get("max_iter", 1000),
                      random_state=exp.cfg.cv.seed)
    return head, joblib.load(path).X


def cached_embed_features(exp: Experiment, encoder_key: str):
    """The embed stage's cached feature matrices for ``encoder_key``, or None.

    Located by the recorded encoder key, so auditing needs no encoder model.
    """
    from hybridstack.features.embed_matrix import EmbedFeatures, features_cache_path

    path = features_cache_path(exp, SimpleNamespace(key=encoder_key))
    return EmbedFeatures.load(path) if path.is_file() else None


def _embed_head(exp: Experiment, settings: dict[str, Any]) -> tuple[Any, Any] | str:
    from hybridstack.heads.registry import kind_named
    from hybridstack.stages.embed import make_head

    features = cached_embed_features(exp, settings.get("encoder_key", ""))
    if features is None:
        return "no cached embedding features for the snapshot's [embed] settings"
    spec = kind_named(settings.get("head", "")).spec(**settings["spec"])
    return make_head(spec, exp, features, None), features.X  # own index: audit writes nothing


# -- near-duplicates ---------------------------------------------------------------------------


def check_near_duplicates(exp: Experiment, max_rate: float) -> Check:
    """Share of test rows whose embedding key has a train row at cosine >= 0.95."""
    import faiss

    from hybridstack.features.knn_index import normalize_rows

    name = "near-duplicates"
    if exp.test is None:
        return Check(name, SKIP, "no test file")
    keys = {settings.get("encoder_key") for model in exp.dir.finished_models()
            for stage, settings in [_model_stage(model)] if stage == "embed"}
    features = next((f for key in sorted(k for k in keys if k)
                     if (f := cached_embed_features(exp, key)) is not None), None)
    if features is None or features.X_test is None:
        return Check(name, SKIP, "no cached embeddings (run the embed stage)")
    start, stop = features.key_columns
    index = faiss.IndexFlatIP(stop - start)
    index.add(normalize_rows(features.X[:, start:stop]))
    best = np.empty(len(features.X_test), dtype=np.float32)
    for lo in range(0, len(best), QUERY_BATCH):
        query = normalize_rows(features.X_test[lo:lo + QUERY_BATCH, start:stop])
        best[lo:lo + len(query)] = index.search(query, 1)[0][:, 0]
    n_dup = int((best >= DUPLICATE_COSINE).sum())
    rate = n_dup / len(best)
    detail = (f"{n_dup} of {len(best)} test rows ({rate:.1%}) have a train row at cosine >= "
              f"{DUPLICATE_COSINE} (limit {max_rate:.0%})")
    return Check(name, FAIL if rate > max_rate else PASS, detail)


# -- submission --------------------------------------------------------------------------------


def check_submission(exp: Experiment) -> Check:
    if exp.test is None:
        return Check("submission", SKIP, "no test file: cross-validation only")
    path = exp.dir.submission_path
    if not path.is_file():
        return Check("submission", FAIL, "submission.csv is missing; run a stage")
    id_col = exp.cfg.task.id_column
    sub = pd.read_csv(path, dtype={id_col: str})
    if exp.sample is not None and list(sub.columns) != list(exp.sample.columns):
        return Check("submission", FAIL, f"columns {list(sub.columns)[:6]} differ from the sample's")
    try:
        exp.task.validate_submission(sub, exp.sample, exp.test.ids)
    except HybridstackError as err:
        return Check("submission", FAIL, str(err))
    return Check("submission", PASS, f"{len(sub)} rows, ids and values valid")


# -- the command -------------------------------------------------------------------------------


def run_audit(run_dir: str | Path, permutation_rows: int = 20_000, max_duplicate_rate: float = 0.05,
              seed: int = 42) -> list[Check]:
    """Every check on the experiment folder ``run_dir``, in report order."""
    exp, dataset = load_experiment(run_dir)
    checks = [check_artifacts(exp.dir), check_folds(exp, dataset)]
    if len(exp.folds) != len(exp.train):
        return checks + [Check("rest", SKIP, "folds.npy does not match the data")]
    checks.append(check_groups(exp))
    checks += [check_oof(exp, model) for model in model_dirs(exp.dir)]
    checks += permutation_checks(exp, permutation_rows, seed)
    checks.append(check_near_duplicates(exp, max_duplicate_rate))
    checks.append(check_submission(exp))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len("check"), *(len(c.name) for c in checks))
    lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in checks]
    return "\n".join(lines)


def cmd_audit(args: argparse.Namespace) -> int:
    checks = run_audit(args.experiment_dir, args.permutation_rows, args.max_duplicate_rate, args.seed)
    print(format_table(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"{len(failed)} of {len(checks)} checks failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="check an experiment for leakage, bad folds and broken files")
    p.add_argument("experiment_dir", help="the experiment folder, e.g. runs/my_experiment")
    p.add_argument("--permutation-rows", type=int, default=20_000,
                   help="train rows the label-permutation check refits on (default: 20000)")
    p.add_argument("--max-duplicate-rate", type=float, default=0.05,
                   help="share of test rows allowed a near-duplicate train row (default: 0.05)")
    p.add_argument("--seed", type=int, default=42, help="seed of the label shuffles (default: 42)")
    p.set_defaults(func=cmd_audit)
