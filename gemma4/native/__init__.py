"""The CPU backend: AVX2 kernels in C++ (csrc/, one file per concern, bindings.cpp exporting them), compiled on
first use by torch.utils.cpp_extension and cached in torch's build cache under a name tagged by a hash of the
sources and flags, so a changed source rebuilds and two versions never share a build.

- products with quantised weights read as packed, int8 activations summed in integers, routed experts in one call
  (quant_products.cpp; the 512-bit forms where the CPU has AVX-512 VNNI, row_products_avx512.cpp), and float
  activations against packed or bf16 weights (float_products.cpp);
- attention of a few queries over the cache as it is stored (attention.cpp), RoPE and RMSNorm (rope_norms.cpp),
  a decoder layer's dense parts in three calls (fused_layer.cpp), decode's cache writes (cache_writes.cpp);
- GGUF K-quant blocks to our layouts at load (gguf_blocks.cpp);
- many-row products on the matrix engine: dequantised to bf16 once per call, multiplied on AMX tiles by MKL's
  bf16 GEMM with float32 sums and output (matrix_engine.cpp; AVX-512 functions compiled for that target and
  called only where the CPU has it, isa.py), or kept int8 on AMX int8 tiles with the int8 kernels' activations
  (amx_products.cpp, built where the host has AMX).

compiled() is the module or None: GEMMA4_NO_NATIVE=1 or a CPU without AVX2/FMA take the plain torch path
quietly; a failed build says so on stderr, once per process, and takes it too. `python -m gemma4.native`
builds and reports (`make kernels`). ops.py holds the Python wrappers and the rules that pick a kernel.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"

# -fopenmp: at::parallel_for is OpenMP in torch's CPU build and a header template here; compiled without
# it, every product ran on one thread. The extension links libgomp.so.1, which resolves to the copy torch
# has already loaded, so one thread pool serves both.
BASE_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def host_cflags() -> list[str]:
    """The build targets the CPU it runs on (it is compiled there, on first use): the integer dot products take
    VNNI's one-instruction form where the CPU has AVX-VNNI or AVX-512 VNNI (the same integers as AVX2's
    maddubs + madd), and the AMX int8 tile products (amx_products.cpp, their functions compiled for that target)
    are built where the CPU has AMX. The flags are part of the build's name, so another CPU gets a build of its own."""
    from .isa import AMX_INT8_FLAGS, has

    flags = []
    if has("avx_vnni"):
        flags = ["-mavxvnni", "-DGEMMA4_VNNI_AVX"]
    elif has("avx512_vnni", "avx512vl"):
        flags = ["-mavx512vnni", "-mavx512vl", "-DGEMMA4_VNNI_AVX512"]
    if has(*AMX_INT8_FLAGS):
        flags.append("-DGEMMA4_AMX")
    return flags


CFLAGS = BASE_CFLAGS + host_cflags()

_lock = threading.Lock()
_module = None  # the compiled module, False when it is not built (opted out, no AVX2, failed build)
_warned = False


def compiled():
    """The compiled CPU kernels, or None (GEMMA4_NO_NATIVE=1, no AVX2/FMA, or a failed build, which is reported)."""
    global _module
    if _module is None:
        with _lock:
            if _module is None:
                module = _load()
                if module is not None:  # the row kernels GEMMA4_ROW_KERNELS names (isa.py), chosen once
                    from .isa import row_kernels

                    module.set_row_kernels(row_kernels())
                _module = module or False
    return _module or None


def skip_reason(environ=os.environ) -> str | None:
    """Why the kernels are not to be built here (quietly), or None."""
    if environ.get("GEMMA4_NO_NATIVE") == "1":
        return "GEMMA4_NO_NATIVE=1"
    if not _cpu_has_avx2():
        return "this CPU lacks AVX2/FMA"
    return None


def sources(source_dir: Path = SOURCE_DIR) -> list[Path]:
    """The translation units of the extension: every .cpp of source_dir (headers are included by them)."""
    return sorted(Path(source_dir).glob("*.cpp"))


def module_name(source_dir: Path = SOURCE_DIR) -> str:
    """gemma4_native_<hash of every source file's name and contents, and the flags>."""
    h = hashlib.sha256()
    for p in sorted(Path(source_dir).glob("*.cpp")) + sorted(Path(source_dir).glob("*.h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    return f"gemma4_native_{h.hexdigest()[:12]}"


def build_root(environ=os.environ) -> Path:
    """Where torch's cpp_extension keeps its builds (its own rule: $TORCH_EXTENSIONS_DIR, else the user cache's
    torch_extensions/py<version>_<accelerator>)."""
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(environ["TORCH_EXTENSIONS_DIR"])
    import torch

    cache = environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
             f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(os.path.realpath(os.path.join(cache, "torch_extensions"))) / f"{py}_{accel}"


def kept_dir(environ=os.environ) -> Path:
    """Where finished builds are kept under their names, out of torch's build folders (which any checkout of the
    same sources may rebuild in place): $GEMMA4_CACHE/native/<torch version>, else under ~/.cache/gemma4."""
    import torch

    root = Path(environ.get("GEMMA4_CACHE") or Path.home() / ".cache" / "gemma4").expanduser()
    return root / "native" / f"torch-{torch.__version__}"


def _import_so(name: str, so: Path):
    import importlib.machinery
    import importlib.util

    import torch  # noqa: F401  the extension links against the libraries torch loads

    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, so, loader=loader))
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def _keep(name: str, folder: Path) -> Path | None:
    """Copies a finished build (no build under way in its folder) to kept_dir(), atomically; its path or None."""
    import shutil

    so = folder / f"{name}.so"
    if not so.is_file() or (folder / "lock").exists():  # torch holds `lock` while it builds
        return None
    kept = kept_dir() / so.name
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_name(f"{so.name}.{os.getpid()}.partial")
        shutil.copyfile(so, partial)
        os.replace(partial, kept)
    except OSError:
        return None
    return kept


def prebuilt(name: str, build_directory: str | Path | None = None):
    """The finished build of `name` imported directly, or None (not built, a build under way, or it does not
    import). Its name is a hash of the sources and flags, so a finished build is the right one; this skips
    cpp_extension's checks, which regenerate and re-run the build when another checkout of the same sources
    loads it, and cost a noticeable part of a cold start even when nothing is rebuilt. The default place keeps
    a copy of its own (kept_dir()), which no rebuild in torch's folder touches."""
    if name in sys.modules:
        return sys.modules[name]
    candidates = []
    if build_directory is None:
        kept = kept_dir() / f"{name}.so"
        candidates.append(kept if kept.is_file() else _keep(name, build_root() / name))
    else:
        folder = Path(build_directory)
        if not (folder / "lock").exists():
            candidates.append(folder / f"{name}.so")
    for so in candidates:
        if so is not None and so.is_file():
            try:
                return _import_so(name, so)
            except (ImportError, OSError):  # a build for another torch, a damaged file: build through torch
                return None
    return None


def build(source_dir: Path = SOURCE_DIR, build_directory: str | None = None, verbose: bool = False):
    """Imports the finished build of these sources, else compiles it (or finds it through torch's build
    cache) and imports it; raises on failure."""
    source_dir = Path(source_dir)
    files = sources(source_dir)
    if not files:
        raise FileNotFoundError(f"no C++ sources in {source_dir}")
    name = module_name(source_dir)
    module = prebuilt(name, build_directory)
    if module is not None:
        return module
    from torch.utils.cpp_extension import load

    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    # copies of the flags: load() appends to the lists it is given
    module = load(name=name, sources=[str(p) for p in files], extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS), extra_include_paths=[str(source_dir)], build_directory=build_directory,
                verbose=verbose)
    if build_directory is None:
        _keep(name, build_root() / name)  # the next process imports it directly
    return module


def first_error(exc: BaseException) -> str:
    """The line of a build failure worth one line: the compiler's first error, else the exception's first line."""
    text = str(exc)
    for line in text.splitlines():
        if re.search(r"\b(error|fatal error)\b:", line):
            return line.strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _load(source_dir: Path = SOURCE_DIR, build_directory: str | None = None):
    """The module, or None: quietly where skip_reason says so, with one line on stderr where the build fails."""
    global _warned
    if skip_reason() is not None:
        return None
    try:
        return build(source_dir, build_directory)
    except Exception as exc:  # no compiler, no headers, a compile error: the plain torch path serves, loudly
        if not _warned:
            _warned = True
            print(f"gemma4: the native CPU kernels could not be built ({first_error(exc)}); running on the plain "
                  "torch path, several times slower (run `python -m gemma4.native` for the full error, "
                  "GEMMA4_NO_NATIVE=1 to silence)", file=sys.stderr, flush=True)
        return None


def _cpu_has_avx2() -> bool:
    from .isa import has

    return has("avx2", "fma")
