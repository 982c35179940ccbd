"""The native kernels' build: a failure is loud (one line on stderr per process, a non-zero exit from
`python -m gemma4.native`), an opt-out is quiet, and the module's name follows its sources. The broken
sources are one small file without includes, so the compiler fails in a fraction of a second."""

import os
import subprocess
import sys

import pytest

import gemma4.native as native
from paths import ROOT



@pytest.fixture
def broken(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cpp").write_text("int f( {\n")
    return src


def test_failed_build_says_so_once(broken, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GEMMA4_NO_NATIVE", raising=False)
    monkeypatch.setattr(native, "_cpu_has_avx2", lambda: True)
    monkeypatch.setattr(native, "_warned", False)
    assert native._load(broken, str(tmp_path / "build")) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert "native CPU kernels could not be built" in err[0] and "plain torch path" in err[0]
    assert "broken.cpp" in err[0] and "error" in err[0]  # the compiler's first error, where it points
    assert native._load(broken, str(tmp_path / "build")) is None
    assert capsys.readouterr().err == ""  # once per process


def test_opt_out_is_quiet(broken, monkeypatch, capsys):
    monkeypatch.setenv("GEMMA4_NO_NATIVE", "1")
    monkeypatch.setattr(native, "_warned", False)
    assert native._load(broken) is None
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("GEMMA4_NO_NATIVE")
    monkeypatch.setattr(native, "_cpu_has_avx2", lambda: False)  # an AVX2-less CPU: the plain path, quietly
    assert native._load(broken) is None
    assert capsys.readouterr().err == ""


def test_entry_point_fails_loudly(broken, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_NO_NATIVE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if native.skip_reason(env) is not None:
        pytest.skip(native.skip_reason(env))
    run = subprocess.run([sys.executable, "-m", "gemma4.native", "--source-dir", str(broken),
                          "--build-dir", str(tmp_path / "build")], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0
    assert "could not be built" in run.stderr and "broken.cpp" in run.stderr


def test_module_name_follows_sources(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    for p in native.SOURCE_DIR.iterdir():
        if p.suffix in (".cpp", ".h"):
            (src / p.name).write_bytes(p.read_bytes())
    assert native.module_name(src) == native.module_name()
    assert [p.name for p in native.sources(src)] == [p.name for p in native.sources()]
    (src / "common.h").write_text((src / "common.h").read_text() + "\n// changed\n")
    assert native.module_name(src) != native.module_name()  # a header counts too


def test_finished_build_is_imported_without_torch_build_checks():
    """A finished build is found by its name and imported directly: cpp_extension.load is never called."""
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_NO_NATIVE"}
    if native.skip_reason(env) is not None:
        pytest.skip(native.skip_reason(env))
    name = native.module_name()
    if not (native.kept_dir() / f"{name}.so").is_file() and not (native.build_root() / name / f"{name}.so").is_file():
        pytest.skip("the kernels are not built yet (`make kernels`)")
    code = ("import torch.utils.cpp_extension as c\n"
            "def refuse(*a, **k):\n    raise AssertionError('cpp_extension.load was called')\n"
            "c.load = refuse\n"
            "import gemma4.native as n\nassert n.compiled() is not None\nprint(n.compiled().__file__)")
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(native.kept_dir() / f"{name}.so")


def test_build_under_way_or_damaged_is_not_imported(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_CACHE", str(tmp_path / "kept"))
    name = "gemma4_native_000000000000"
    folder = tmp_path / name
    folder.mkdir()
    assert native.prebuilt(name, folder) is None  # nothing built
    (folder / f"{name}.so").write_bytes(b"\x7fELF not really")
    assert native.prebuilt(name, folder) is None  # a damaged file: the build path takes over
    (folder / "lock").write_text("")
    assert native.prebuilt(name, folder) is None  # torch is building it
    assert native._keep(name, folder) is None  # and it is not copied while it is
