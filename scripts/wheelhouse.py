"""Build an offline wheelhouse for Kaggle notebooks (no internet there; torch comes with the image).

    python scripts/wheelhouse.py [--out dist/wheelhouse] [--python-version 3.12] [--extras demo]

The folder gets the hybridstack wheel, one wheel per runtime dependency (the transitive closure,
each at its constraints.txt pin) and a copy of constraints.txt.  torch, triton and nvidia-* are
never included and the walk does not follow torch's own requirements: Kaggle's image brings its
CUDA build of torch.  The closure is read from the installed distributions' metadata (so run it
in the venv that `make install` made), with markers evaluated for the *target* Python; after the
download the same walk is repeated over the wheels' own METADATA to prove nothing is missing.

Everything is downloaded into a temp folder beside the target, which replaces the target only
when all went well.  Offline install (torch already present):

    pip install --no-index --find-links WHEELHOUSE -c WHEELHOUSE/constraints.txt hybridstack
"""
from __future__ import annotations

import argparse
import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
ROOT_NAME = "hybridstack"
# Newest first: pip ranks earlier --platform tags higher, as a native glibc-2.28 machine would.
# pip itself adds manylinux2010/manylinux1 under manylinux2014 but never fills the gaps between
# manylinux_2_X tags, so every step is listed (wheels tagged only manylinux_2_27/_2_28 exist).
# Kaggle's (Ubuntu) image has a newer glibc than 2.28, so all of these install there.
DEFAULT_PLATFORMS = tuple(f"manylinux_2_{m}_x86_64" for m in range(28, 16, -1)) + (
    "manylinux2014_x86_64",
)

# name -> its Requires-Dist strings; None when that distribution is unknown.
RequiresFn = Callable[[str], "list[str] | None"]


class WheelhouseError(Exception):
    """A problem the user must fix; main() prints it as one line."""


def excluded(name: str) -> bool:
    """torch comes with Kaggle's image; so do its triton and nvidia-* (CUDA) wheels."""
    name = canonicalize_name(name)
    return name in {"torch", "triton", "pytorch-triton"} or name.startswith("nvidia-")


# ---------------------------------------------------------------------------------------------
# marker environment


def target_environment(python_version: str | None = None) -> dict[str, str]:
    """Marker environment for the running interpreter, or for CPython `python_version` on
    manylinux x86_64 (what `pip download --python-version ... --platform manylinux...` targets)."""
    env = dict(default_environment())
    if not python_version:
        return env
    parts = python_version.split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise WheelhouseError(f"--python-version {python_version!r}: expected X.Y, e.g. 3.12")
    full = ".".join(parts + ["0"] * (3 - len(parts)))
    env.update(python_version=".".join(parts[:2]), python_full_version=full,
               implementation_name="cpython", implementation_version=full,
               platform_python_implementation="CPython", os_name="posix",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    return env


def applies(req: Requirement, env: dict[str, str], extras: Iterable[str] = ()) -> bool:
    """Whether `req` is needed in `env` when its owner is installed with `extras`."""
    return _needed(req, env, {"", *(canonicalize_name(e) for e in extras)})


def _needed(req: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    """`extras` may hold "" (the base install, no extra)."""
    if req.marker is None:
        return "" in extras
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in extras)


# ---------------------------------------------------------------------------------------------
# requirement graph


def project_requires(project: Path) -> list[str]:
    """hybridstack's Requires-Dist, read from pyproject.toml (what the wheel will say, even if the
    editable install's metadata is stale)."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    reqs = list(meta.get("dependencies", []))
    for extra, deps in meta.get("optional-dependencies", {}).items():
        for d in deps:  # a dependency's own marker joins the extra's
            req, _, marker = d.partition(";")
            both = f"({marker.strip()}) and extra == {extra!r}" if marker.strip() else f"extra == {extra!r}"
            reqs.append(f"{req.strip()} ; {both}")
    return reqs


def installed_requires(project: Path | None = ROOT) -> RequiresFn:
    """Requires-Dist of the installed distributions (the root comes from pyproject.toml)."""
    def requires(name: str) -> list[str] | None:
        if project is not None and canonicalize_name(name) == ROOT_NAME:
            return project_requires(project)
        try:
            return list(importlib.metadata.distribution(name).requires or [])
        except importlib.metadata.PackageNotFoundError:
            return None
    return requires


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def root_extras(requires: RequiresFn, extras: Iterable[str]) -> list[str]:
    """Check the requested extras against the root's metadata."""
    extras = [canonicalize_name(e) for e in extras if e]
    known = set()
    for line in requires(ROOT_NAME) or []:
        for m in re.finditer(r"extra\s*==\s*['\"]([^'\"]+)['\"]", line):
            known.add(canonicalize_name(m.group(1)))
    unknown = sorted(set(extras) - known)
    if unknown:
        raise WheelhouseError(f"unknown extra(s) {', '.join(unknown)} of {ROOT_NAME} "
                              f"(it has: {', '.join(sorted(known)) or 'none'})")
    return extras


def closure(requires: RequiresFn, env: dict[str, str], extras: Iterable[str] = (),
            root: str = ROOT_NAME) -> dict[str, tuple[str, list[Requirement]]]:
    """Walk the requirement graph from `root[extras]`.

    Returns {canonical name: (the package that first needed it, [the requirements naming it])} for
    every dependency (the root left out), sorted by name.  Excluded packages (torch, ...) are left
    out and not followed.
    """
    root = canonicalize_name(root)
    found: dict[str, tuple[str, list[Requirement]]] = {}
    expanded: dict[str, set[str]] = {}          # name -> extras walked so far ("" = the base)
    todo: list[tuple[str, set[str]]] = [(root, {canonicalize_name(e) for e in extras})]
    while todo:
        name, want = todo.pop()
        old = expanded.get(name, set())
        new = ({""} | want) - old
        if not new:
            continue
        lines = requires(name)
        if lines is None:
            parent = found[name][0] if name in found else "?"
            raise WheelhouseError(
                f"{name} (needed by {parent}) is not installed here, so its requirements cannot "
                f"be read; install the project first: pip install -c constraints.txt -e '.[test]'")
        expanded[name] = old | new
        for line in lines:
            try:
                req = Requirement(line)
            except InvalidRequirement as err:
                raise WheelhouseError(f"{name}: bad requirement {line!r}: {err}") from None
            if not _needed(req, env, new) or (old and _needed(req, env, old)):
                continue                        # not needed, or walked on an earlier visit
            dep = canonicalize_name(req.name)
            if excluded(dep) or dep == root:
                continue
            found.setdefault(dep, (name, []))[1].append(req)
            todo.append((dep, {canonicalize_name(e) for e in req.extras}))
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------
# pins


def read_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} from `name==version` lines (comments and blanks skipped)."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            raise WheelhouseError(f"{path}:{n}: not a requirement: {raw.strip()!r}") from None
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator not in ("==", "===") or "*" in specs[0].version:
            raise WheelhouseError(f"{path}:{n}: expected an exact pin name==version, got {line!r}")
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def pinned(deps: dict[str, tuple[str, list[Requirement]]], pins: dict[str, str],
           constraints: Path | str = "constraints.txt") -> dict[str, str]:
    """{name: version} for every dependency; one error line naming all that are missing or whose
    pin contradicts a requirement."""
    missing = [f"{d} (needed by {parent})" for d, (parent, _) in deps.items() if d not in pins]
    if missing:
        raise WheelhouseError(f"not pinned in {constraints}: {', '.join(missing)}; add name==version "
                              f"lines (pip freeze in the venv shows the installed ones)")
    bad = []
    for dep, (_, reqs) in deps.items():
        for req in reqs:
            if not req.specifier.contains(pins[dep], prereleases=True):
                bad.append(f"{dep}=={pins[dep]} does not satisfy {req}")
    if bad:
        raise WheelhouseError(f"{constraints}: {'; '.join(bad)}")
    return {dep: pins[dep] for dep in deps}


def check_installed(versions: dict[str, str]) -> None:
    """The walk reads the installed metadata, which only describes the pinned release if that is
    the one installed."""
    off = []
    for dep, want in versions.items():
        have = installed_version(dep)
        if have is not None and _norm(have) != _norm(want):
            off.append(f"{dep} {have} (pinned {want})")
    if off:
        raise WheelhouseError(f"installed versions differ from constraints.txt, so their metadata "
                              f"may not match the pins: {', '.join(off)}; run pip install -c "
                              f"constraints.txt -e '.[test]' first")


def _norm(version: str) -> str:
    try:
        return str(Version(version).public)   # 2.13.0+cpu == 2.13.0
    except InvalidVersion:
        return version


# ---------------------------------------------------------------------------------------------
# pip


def pip_download_cmd(versions: dict[str, str], dest: Path | str, python_version: str | None = None,
                     platforms: Iterable[str] = DEFAULT_PLATFORMS,
                     python: str = sys.executable) -> list[str]:
    """`pip download --no-deps` of exactly these pins.  Wheels only (`--only-binary=:all:`) in both
    modes: an sdist could not be built offline on Kaggle.  With `python_version`, for that CPython
    on manylinux x86_64."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if python_version:
        cmd += ["--python-version", python_version, "--implementation", "cp"]
        for tag in platforms:
            cmd += ["--platform", tag]
    return cmd + [f"{name}=={version}" for name, version in sorted(versions.items())]


def pip_wheel_cmd(project: Path, dest: Path | str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "pip", "wheel", "--no-deps", str(project), "-w", str(dest)]


def project_copy(project: Path, dest: Path) -> Path:
    """The files git would ship (tracked plus untracked-but-not-ignored) copied to `dest`, so the
    wheel is built without writing build/ and *.egg-info into the checkout, and without picking
    up stale modules from an old build/lib."""
    out = subprocess.run(["git", "-C", str(project), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True)
    if out.returncode == 0:
        for rel in filter(None, out.stdout.decode().split("\0")):
            src = project / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:                                      # not a git checkout
        shutil.copytree(project, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".*_cache"))
    return dest


def _run(cmd: list[str], what: str, quiet: bool) -> None:
    print(f"wheelhouse: {what}", flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None,
                         stderr=subprocess.STDOUT if quiet else None, text=True)
    if out.returncode:
        if quiet and out.stdout:
            sys.stderr.write(out.stdout[-6000:])
        raise WheelhouseError(f"{what} failed (exit {out.returncode}): {' '.join(cmd[:6])} ...")


# ---------------------------------------------------------------------------------------------
# the wheels' own metadata


def wheel_requires(folder: Path) -> RequiresFn:
    """Requires-Dist read from the METADATA inside the wheels of `folder`."""
    by_name: dict[str, list[str]] = {}
    for wheel in folder.glob("*.whl"):
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist()
                        if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            msg = email.message_from_bytes(zf.read(meta))
        by_name[name] = msg.get_all("Requires-Dist") or []
    return lambda name: by_name.get(canonicalize_name(name))


def verify(folder: Path, env: dict[str, str], extras: list[str], versions: dict[str, str]) -> None:
    """The folder holds wheels only, none excluded, and the walk over the wheels' own metadata
    needs nothing that is not in it."""
    wheels: dict[str, str] = {}
    for f in folder.iterdir():
        if f.name == "constraints.txt":
            continue
        if f.suffix != ".whl":
            raise WheelhouseError(f"not a wheel in the download: {f.name}")
        name, version, _, _ = parse_wheel_filename(f.name)
        if excluded(name):
            raise WheelhouseError(f"{f.name} must not be in the wheelhouse (Kaggle brings torch)")
        wheels[canonicalize_name(name)] = str(version)
    want = set(versions) | {ROOT_NAME}
    if set(wheels) != want:
        raise WheelhouseError(f"wheelhouse mismatch: missing {sorted(want - set(wheels))}, "
                              f"unexpected {sorted(set(wheels) - want)}")
    in_folder = wheel_requires(folder)
    # a name with no wheel here walks as a leaf; the set difference below names it
    from_wheels = closure(lambda name: in_folder(name) or [], env, extras)
    extra = sorted(set(from_wheels) - set(versions))
    if extra:
        raise WheelhouseError(f"the wheels' own metadata also needs {', '.join(extra)}, which the "
                              f"installed metadata did not; pin and install them")


# ---------------------------------------------------------------------------------------------
# main


def plan(constraints: Path, project: Path, python_version: str | None,
         extras: list[str]) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """(marker environment, checked extras, {dependency: pinned version})."""
    env = target_environment(python_version)
    requires = installed_requires(project)
    extras = root_extras(requires, extras)
    versions = pinned(closure(requires, env, extras), read_pins(constraints), constraints)
    check_installed(versions)
    return env, extras, versions


def build(out: Path, constraints: Path, project: Path, python_version: str | None,
          extras: list[str], platforms: list[str], quiet: bool) -> tuple[int, int]:
    env, extras, versions = plan(constraints, project, python_version, extras)
    target = f"CPython {env['python_version']} manylinux x86_64" if python_version else \
        f"this interpreter (Python {env['python_version']})"
    print(f"wheelhouse: {len(versions)} dependencies of {ROOT_NAME}"
          f"{'[' + ','.join(extras) + ']' if extras else ''} for {target}: "
          + " ".join(f"{k}=={v}" for k, v in versions.items()), flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)                           # mkdtemp makes it 0700
    try:
        with tempfile.TemporaryDirectory(prefix="wheelhouse-src-") as src:
            _run(pip_wheel_cmd(project_copy(project, Path(src)), tmp),
                 f"building the {ROOT_NAME} wheel", quiet)
        _run(pip_download_cmd(versions, tmp, python_version, platforms),
             f"downloading {len(versions)} wheels", quiet)
        shutil.copy2(constraints, tmp / "constraints.txt")
        verify(tmp, env, extras, versions)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    files = [f for f in out.iterdir() if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist" / "wheelhouse",
                   help="wheelhouse folder (replaced as a whole; default dist/wheelhouse)")
    p.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    p.add_argument("--project", type=Path, default=ROOT)
    p.add_argument("--python-version", default=None,
                   help="target CPython X.Y on manylinux x86_64 (default: this interpreter)")
    p.add_argument("--extras", default="", help="comma-separated extras of hybridstack, e.g. demo")
    p.add_argument("--platform", action="append", dest="platforms", default=None,
                   help="pip --platform tag with --python-version (repeatable; default "
                        "manylinux_2_28 ... manylinux_2_17 and manylinux2014, x86_64)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the pinned closure and the pip command; download nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="show pip's output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extras = [e.strip() for e in args.extras.replace(" ", ",").split(",") if e.strip()]
    platforms = args.platforms or list(DEFAULT_PLATFORMS)
    start = time.perf_counter()
    try:
        if args.dry_run:
            _, _, versions = plan(args.constraints, args.project, args.python_version, extras)
            for name, version in versions.items():
                print(f"{name}=={version}")
            print(" ".join(pip_download_cmd(versions, args.out, args.python_version, platforms)))
            return 0
        n, size = build(args.out, args.constraints, args.project, args.python_version, extras,
                        platforms, quiet=not args.verbose)
    except WheelhouseError as err:
        print(f"wheelhouse: error: {err}", file=sys.stderr)
        return 1
    print(f"wheelhouse: {args.out}: {n} files, {size / 1e6:.1f} MB "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
