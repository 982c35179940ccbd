"""The real Gemma 4 vocabulary and the official Gemma 4 chat template, for the tests of the chat format, and
llama.cpp's HF-to-GGUF converter, which writes the mmproj files the audio tests read.

All ship in the llama-cpp-python sdist on PyPI (llama.cpp vendors them). They are fetched
once with pip, the few files taken out of the tarball into $GEMMA4_TEST_CACHE (default
~/.cache/gemma4-test), and never committed. `python tests/official.py` fetches them (the Makefile's test
target runs it); tests get them through the conftest fixtures, which skip with the reason when the fetch
is impossible (offline).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
_LLAMA = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
_MODELS = _LLAMA + "models/"
# cache name -> path inside the sdist
FILES = {
    "gemma4-vocab.gguf": _MODELS + "ggml-vocab-gemma-4.gguf",
    "gemma4-vocab.inp": _MODELS + "ggml-vocab-gemma-4.gguf.inp",  # llama.cpp's tokenizer test texts
    "gemma4-vocab.out": _MODELS + "ggml-vocab-gemma-4.gguf.out",  # and the ids llama.cpp gives them
    "gemma4-31b-it.jinja": _MODELS + "templates/google-gemma-4-31B-it.jinja",
}


# llama.cpp's converter (convert_hf_to_gguf.py with its conversion/ package and gguf-py/), kept as a tree
CONVERTER = "llama.cpp"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


class Unavailable(RuntimeError):
    """The files are not cached and could not be fetched; the message says why, in one line."""


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA4_TEST_CACHE") or Path.home() / ".cache" / "gemma4-test") / f"llama-cpp-{VERSION}"


def converter_dir() -> Path:
    """The cached llama.cpp tree holding convert_hf_to_gguf.py (after ensure())."""
    return cache_dir() / CONVERTER


def _cached() -> dict[str, Path] | None:
    paths = {name: cache_dir() / name for name in FILES}
    ready = all(p.is_file() for p in paths.values()) and (converter_dir() / "convert_hf_to_gguf.py").is_file()
    return paths if ready else None


def ensure() -> dict[str, Path]:
    """Cache name -> local path of every file in FILES, fetching the sdist the first time."""
    paths = _cached()
    if paths is not None:
        return paths
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--retries", "2",
                                 "--timeout", "30", "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "-d", tmp],
                                capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            last = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise Unavailable(f"could not download the llama-cpp-python {VERSION} sdist: {last}")
        with tarfile.open(sdists[0]) as tar:
            for name, member in FILES.items():
                source = tar.extractfile(member)
                if source is None:
                    raise Unavailable(f"llama-cpp-python {VERSION} sdist: {member} is not a file")
                partial = Path(tmp) / name
                partial.write_bytes(source.read())
                partial.replace(folder / name)  # atomic: a reader sees the whole file or none
            tree = Path(tmp) / CONVERTER
            for member in tar.getmembers():
                inside = member.name[len(_LLAMA):] if member.name.startswith(_LLAMA) else None
                if inside and (member.isfile() or member.isdir()) and inside.startswith(_CONVERTER_PARTS):
                    member.name = inside
                    tar.extract(member, tree, filter="data")
            if not (tree / "convert_hf_to_gguf.py").is_file():
                raise Unavailable(f"llama-cpp-python {VERSION} sdist: no convert_hf_to_gguf.py")
            if converter_dir().exists():
                import shutil

                shutil.rmtree(converter_dir())
            tree.replace(converter_dir())
    paths = _cached()
    assert paths is not None
    return paths


def main() -> int:
    try:
        paths = ensure()
    except Unavailable as e:
        print(f"tests/official.py: {e}", file=sys.stderr)
        return 1
    print(f"official Gemma 4 files in {cache_dir()} ({', '.join(paths)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
