#!/usr/bin/env bash
# GPU smoke test of the fine-tune path (bench/gpu_smoke.py) in a fresh venv, on the machine's
# own CUDA torch; at most ~5 minutes on a Kaggle 2 x T4, less on an H100. From the repo root:
#
#   bash bench/gpu_smoke.sh [gpu_smoke.py options, e.g. --out FILE | --dry-run]
#
# 1. builds the hybridstack wheel and installs it with --no-deps into a venv created with
#    --system-site-packages (torch comes from the machine and is never installed: a
#    constraint pins it to the version already there, so pip fails rather than replace it);
# 2. installs only what `hybridstack run finetune` imports (FINETUNE_DEPS below), with the
#    version ranges of the wheel's own metadata;
#    then, best effort, peft and bitsandbytes (the llm extra) for the LoRA / QLoRA steps;
# 3. runs bench/gpu_smoke.py in that venv (results: bench/results/gpu_smoke.json).
#
# Environment:
#   PYTHON=python3     the interpreter with a CUDA torch (Kaggle: the default python3)
#   WHEELHOUSE=dir     install offline: pip --no-index --find-links dir (else PyPI). The folder
#                      needs wheels of FINETUNE_DEPS and their dependencies not already on the
#                      machine, and setuptools>=70.1 if the machine's setuptools is older
#   VENV=dir           where to build the venv (default: a temp folder, removed afterwards)
#   TOTAL_SECONDS=295  the whole run's budget; gpu_smoke.py gets what the install left
set -euo pipefail

started=$(date +%s)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
PYTHON=${PYTHON:-python3}
TOTAL_SECONDS=${TOTAL_SECONDS:-295}

# Distributions the fine-tune path imports (hybridstack/finetune/*, stages/finetune.py and what
# they import from hybridstack: config, tasks, experiment, folds, heads/base, runs, tables,
# models, stages/common, versions, cli). matplotlib: the `hybridstack` command builds its parser
# from every sub-command module, and hybridstack.commands.report imports matplotlib at the top.
# tokenizers/safetensors come with transformers anyway; protobuf + sentencepiece turn the
# Hub's spm-only DeBERTa-v3 tokenizer into a fast one.
FINETUNE_DEPS=(transformers accelerate tokenizers safetensors sentencepiece protobuf numpy pandas
  scipy scikit-learn joblib pydantic tomli-w tqdm iterative-stratification matplotlib)

say() { printf '[gpu_smoke.sh] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found"
probe='import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.device_count())'
torch_info=$("$PYTHON" -c "$probe" 2>/dev/null) \
  || die "$PYTHON cannot import torch; this script uses the machine's CUDA torch and never" \
         "installs one (set PYTHON=...)"
read -r torch_version cuda_ok n_gpus <<<"$torch_info"
say "torch $torch_version from $PYTHON; CUDA available: $cuda_ok, GPUs: $n_gpus"
[ "$cuda_ok" = True ] || say "no CUDA device: gpu_smoke.py will run its CPU dry run"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke_build.XXXXXX")
if [ -z "${VENV:-}" ]; then
  VENV=$tmp/venv
fi
trap 'rm -rf "$tmp"' EXIT

# -- venv on the system site-packages --------------------------------------------------------
if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
  die "VENV=$VENV exists and is not a venv; not replacing it"
fi
rm -rf "$VENV"
say "creating $VENV"
if ! "$PYTHON" -m venv --system-site-packages "$VENV" 2>"$tmp/venv.err"; then
  # no ensurepip (Debian without python3-venv): the machine's own pip is visible through
  # --system-site-packages and installs into the venv when run by the venv's interpreter
  say "venv with pip failed ($(tail -n 1 "$tmp/venv.err")); retrying --without-pip"
  rm -rf "$VENV"
  "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
fi
py=$VENV/bin/python
"$py" -m pip --version >/dev/null 2>&1 || die "no pip usable in $VENV (install python3-venv or pip)"

pip_opts=(--disable-pip-version-check --no-input --quiet)
if [ -n "${WHEELHOUSE:-}" ]; then
  [ -d "$WHEELHOUSE" ] || die "WHEELHOUSE=$WHEELHOUSE is not a folder"
  pip_opts+=(--no-index --find-links "$(cd "$WHEELHOUSE" && pwd)")
  say "installing offline from $WHEELHOUSE"
fi
# Keep the machine's torch: pip may not replace it, whatever accelerate asks for.
echo "torch==$torch_version" >"$tmp/constraints.txt"

# -- the wheel, built from a clean copy of the sources (no build/ left in the repo) ----------
mkdir -p "$tmp/src" "$tmp/dist"
cp pyproject.toml "$tmp/src/"
[ -f README.md ] && cp README.md "$tmp/src/"
cp -r hybridstack "$tmp/src/"
find "$tmp/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
build_ok=0
if "$py" - <<'EOF' 2>/dev/null; then
import sys
import setuptools
major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (70, 1) else 1)  # bdist_wheel built in, no `wheel` needed
EOF
  if "$py" -m pip wheel "${pip_opts[@]}" --no-deps --no-build-isolation -w "$tmp/dist" "$tmp/src"
  then
    build_ok=1
  else
    say "build without isolation failed; retrying in an isolated build env"
  fi
fi
if [ "$build_ok" = 0 ]; then
  "$py" -m pip wheel "${pip_opts[@]}" --no-deps -w "$tmp/dist" "$tmp/src" \
    || die "cannot build the hybridstack wheel (with WHEELHOUSE, add a setuptools>=70.1 wheel)"
fi
wheel=$(ls "$tmp"/dist/hybridstack-*.whl)

# -- the fine-tune dependencies, with the version ranges the wheel declares ------------------
"$py" - "$wheel" "${FINETUNE_DEPS[@]}" >"$tmp/requirements.txt" <<'EOF'
import re
import sys
import zipfile

wheel, wanted = sys.argv[1], sys.argv[2:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    lines = zf.read(meta).decode().splitlines()
declared = {}
for line in lines:
    if line.startswith("Requires-Dist:"):
        req = line.split(":", 1)[1].strip()
        if ";" in req:  # extras (test, bench, demo) and markers: not ours
            continue
        declared[norm(re.match(r"[A-Za-z0-9._-]+", req).group())] = req
for name in wanted:
    print(declared.get(norm(name), name))
EOF
say "installing: $(tr '\n' ' ' <"$tmp/requirements.txt")(and the wheel, --no-deps)"
"$py" -m pip install "${pip_opts[@]}" -c "$tmp/constraints.txt" -r "$tmp/requirements.txt" \
  || die "installing the fine-tune dependencies failed (see pip above); a conflict on torch means" \
         "a dependency wants another torch than the machine's $torch_version, never replaced here"
"$py" -m pip install "${pip_opts[@]}" --no-deps "$wheel"
# The LoRA and QLoRA steps need the llm extra (peft; bitsandbytes for QLoRA). Either may fail to
# install (no wheel for this machine, offline without it): its step then says it is skipped.
for dep in "peft>=0.21" "bitsandbytes>=0.45"; do
  "$py" -m pip install "${pip_opts[@]}" -c "$tmp/constraints.txt" "$dep" \
    || say "could not install $dep: the smoke step that needs it will be skipped"
done

# the venv must use the machine's torch and its own hybridstack (run outside the repo, where
# ./hybridstack would shadow the installed one)
(cd "$tmp" && "$py" - "$VENV") <<'EOF' || die "the venv misses the machine's torch or the new wheel"
import os
import sys

import torch

import hybridstack

venv = os.path.realpath(sys.argv[1])
inside = lambda module: os.path.realpath(module.__file__).startswith(venv + os.sep)  # noqa: E731
for module in (torch, hybridstack):
    where = os.path.dirname(module.__file__)
    print(f"[gpu_smoke.sh] {module.__name__} {getattr(module, '__version__', '')} at {where}",
          file=sys.stderr)
sys.exit(0 if not inside(torch) and inside(hybridstack) else 1)
EOF

setup=$(( $(date +%s) - started ))
left=$(( TOTAL_SECONDS - setup ))
(( left >= 90 )) || left=90  # a slow install still gets a run; its checks shrink to fit
say "venv ready in ${setup}s; running gpu_smoke.py with a ${left}s budget"

# cwd: the repo root (gpu_smoke.py imports hybridstack from the venv: sys.path[0] is bench/)
limit=()  # a backstop: gpu_smoke.py's own watchdog writes the JSON and exits first
command -v timeout >/dev/null && limit=(timeout -k 10 $(( left + 15 )))
set +e
# TMPDIR: its scratch folders go where the EXIT trap removes them, even after a kill
mkdir -p "$tmp/scratch"
PATH="$VENV/bin:$PATH" TMPDIR="$tmp/scratch" ${limit[@]+"${limit[@]}"} \
  "$py" "$repo/bench/gpu_smoke.py" --time-limit "$left" --setup-seconds "$setup" "$@"
code=$?
set -e
say "gpu_smoke.py exit status $code; total $(( $(date +%s) - started ))s"
exit "$code"
