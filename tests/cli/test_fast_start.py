"""What a command imports: `gemma4 --help`, `gemma4 list` and `import gemma4` leave torch alone, and a plain
text run loads no server, grammar, template, image, video or drafter module, nor the gguf package beyond its
constants (its __init__ brings PyYAML). Each runs in a fresh interpreter."""

import json
import os
import subprocess
import sys

from paths import ROOT

HEAVY = ["torch", "fastapi", "uvicorn", "llguidance", "jinja2", "transformers", "PIL", "gemma4.server",
         "gemma4.structured", "gemma4.images", "gemma4.video", "gemma4.multimodal",
         "gemma4.speculative.drafters", "gguf.gguf_writer", "yaml"]


def loaded_after(code: str, env: dict | None = None) -> list[str]:
    """The HEAVY modules present after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_help_does_not_import_torch():
    code = ("from gemma4.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n")
    assert loaded_after(code) == []


def test_import_and_list_do_not_import_torch(tmp_path):
    assert loaded_after("import gemma4\nassert gemma4.__version__") == []
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code = "from gemma4.cli import main\nassert main(['list']) == 0"
    assert loaded_after(code, {"GEMMA4_MODELS": str(tmp_path)}) == []


def test_public_names_still_import():
    import gemma4

    assert callable(gemma4.load) and gemma4.SamplingParams().max_tokens > 0
    assert set(gemma4.__all__) <= set(dir(gemma4))


def test_plain_run_loads_only_what_it_needs(tiny_gguf):
    code = (f"from gemma4.cli import main\nassert main(['run', '-m', {str(tiny_gguf)!r}, '-n', '2', '--raw', 'Hi']) == 0\n"
            "from gemma4.checkpoint import names\n"  # nor compiles the vision and audio tensor-name patterns
            "assert all(t._compiled is None for t in (names._V_HF, names._V_GGUF, names._A_HF, names._A_GGUF))")
    assert loaded_after(code) == ["torch"]


def test_gguf_constants_read_alone_are_the_package_s():
    """A GGUF is read with gguf.constants alone; the package imported later shares that module's types."""
    code = ("import sys\nfrom gemma4.checkpoint import gguf_file\n"
            "assert 'gguf' not in sys.modules and 'yaml' not in sys.modules\n"
            "import gguf\nfrom gguf.quants import dequantize\n"
            "assert gguf.GGMLQuantizationType is gguf_file.GGMLQuantizationType\n"
            "assert gguf.GGUFValueType is gguf_file.GGUFValueType and gguf.GGML_QUANT_SIZES is gguf_file.GGML_QUANT_SIZES\n"
            "import numpy as np\n"
            "half = np.array([1.5, -2.0], dtype=np.float16).view(np.uint8)\n"
            "assert dequantize(half, gguf_file.GGMLQuantizationType.F16).tolist() == [1.5, -2.0]")
    assert "yaml" in loaded_after(code)  # the whole package, once asked for


def test_collector_paused_while_loading_then_back_on(tiny_gguf, monkeypatch):
    import gc

    import gemma4
    from gemma4.cli import main

    real, seen = gemma4.load, []

    def load(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(gemma4, "load", load)
    frozen = gc.get_freeze_count()
    assert main(["run", "-m", str(tiny_gguf), "-n", "1", "--raw", "Hi"]) == 0
    assert seen == [False] and gc.isenabled()
    assert main(["run", "-m", str(tiny_gguf), "-n", "1", "--temp", "-1", "Hi"]) == 2  # fails before loading
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen  # a caller's objects are left to the collector


def test_own_process_freezes_what_start_up_made(tiny_gguf):
    """As the command line's own process, the objects made by start-up are frozen: the collections of the rest
    of the process, and the interpreter's at exit, skip them."""
    code = ("import gc, sys\nfrom gemma4.cli import main\n"
            f"sys.argv = ['gemma4', 'run', '-m', {str(tiny_gguf)!r}, '-n', '1', '--raw', 'Hi']\n"
            "assert main() == 0 and gc.isenabled() and gc.get_freeze_count() > 10000")
    assert loaded_after(code) == ["torch"]
