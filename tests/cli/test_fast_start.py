"""What a command imports: `gemma4 --help`, `gemma4 list` and `import gemma4` leave torch alone, and a plain
text run loads no server, grammar, template, image or video module. Each runs in a fresh interpreter."""

import json
import os
import subprocess
import sys

from paths import ROOT

HEAVY = ["torch", "fastapi", "uvicorn", "llguidance", "jinja2", "transformers", "PIL", "gemma4.server",
         "gemma4.structured", "gemma4.images", "gemma4.video", "gemma4.multimodal"]


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
    code = f"from gemma4.cli import main\nassert main(['run', '-m', {str(tiny_gguf)!r}, '-n', '2', '--raw', 'Hi']) == 0"
    assert loaded_after(code) == ["torch"]
