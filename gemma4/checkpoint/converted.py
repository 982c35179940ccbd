"""Converted weights, written once to a cache file and memory-mapped from there.

GGUF's blocks interleave each block's scale with its integers; our kernels read the integers and the
scales as separate arrays (quant/formats.py), so a quantised tensor is converted once (gguf_blocks.py)
and the result written here. A later start maps the file: the weights are the page cache's pages, shared
with every process that maps them and dropped by the kernel under memory pressure, never an anonymous
copy. The entry is keyed by the source file's path, size and mtime and by CONVERTER_VERSION (bump it when
a conversion's output changes); it is written to a temporary folder and renamed into place, so a reader
never sees half of one.

    ~/.cache/gemma4/converted/<stem>-<key>/index.json   tensor name -> bits, group, arrays (offset, dtype, shape)
                                          /weights.bin  the arrays, each aligned to 64 bytes

GEMMA4_CONVERTED: the cache folder; "off" converts in memory, as before this cache existed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..quant.formats import QuantWeight

CONVERTER_VERSION = 1
ALIGN = 64
FIELDS = ("q", "scale", "zero", "sub")
_DTYPES = {torch.uint8: "u1", torch.int8: "i1", torch.float16: "f2", torch.float32: "f4", torch.bfloat16: "bf16"}

conversions = 0  # entries written by this process (tests read it: a second start must not convert)


def cache_root() -> Path | None:
    value = os.environ.get("GEMMA4_CONVERTED")
    if value == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "gemma4" / "converted"


def entry_dir(source: Path, root: Path) -> Path:
    st = source.stat()
    ident = f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    return root / f"{source.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


class ConvertedWeights:
    """The mapped entry: name -> QuantWeight whose tensors are views of the mapped file."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = json.loads((folder / "index.json").read_text())
        if index.get("version") != CONVERTER_VERSION:
            raise ValueError(f"{folder}: converter version {index.get('version')}, expected {CONVERTER_VERSION}")
        self._index = index["tensors"]
        size = (folder / "weights.bin").stat().st_size
        # Read-only and shared: the pages are the page cache's; a write would fault rather than copy.
        self._map = np.memmap(folder / "weights.bin", dtype=np.uint8, mode="r") if size else None

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> QuantWeight:
        entry = self._index[name]
        return QuantWeight(entry["bits"], entry["group"], *(self._array(entry[f]) for f in FIELDS))

    def _array(self, spec) -> torch.Tensor | None:
        if spec is None:
            return None
        offset, dtype, shape = spec
        n = int(np.prod(shape)) if shape else 1
        itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
        raw = self._map[offset:offset + n * itemsize]
        with warnings.catch_warnings():  # torch warns that the array is not writeable: it is never written
            warnings.simplefilter("ignore", UserWarning)
            if dtype == "bf16":
                return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
            return torch.from_numpy(raw.view(dtype)).reshape(shape)

    def nbytes(self) -> int:
        return 0 if self._map is None else len(self._map)


def open_or_convert(source: Path, names: Iterable[str], convert: Callable[[str], QuantWeight | None],
                    root: Path | None = None) -> ConvertedWeights | None:
    """The mapped entry of `source` holding every name that converts (convert(name) -> QuantWeight, or None
    for a tensor that stays float), written first where it is missing; None where no cache is kept or it
    cannot be written (then the caller converts in memory)."""
    root = cache_root() if root is None else root
    if root is None:
        return None
    folder = entry_dir(source, root)
    if not (folder / "index.json").is_file():
        try:
            _write(folder, names, convert, source)
        except OSError as e:
            print(f"gemma4: cannot write converted weights to {folder} ({e}); converting in memory",
                  file=sys.stderr)
            return None
    return ConvertedWeights(folder)


def _write(folder: Path, names: Iterable[str], convert: Callable[[str], QuantWeight | None], source: Path) -> None:
    global conversions
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {}
        with open(tmp / "weights.bin", "wb") as f:
            for name in names:
                w = convert(name)
                if w is None:
                    continue
                tensors[name] = dict(bits=w.bits, group=w.group, **{
                    field: _append(f, t) for field, t in zip(FIELDS, w.tensors())})
                del w
                _trim()  # a conversion's temporaries go back to the system, not into the heap
            f.flush()
            os.fsync(f.fileno())
        (tmp / "index.json").write_text(json.dumps(dict(version=CONVERTER_VERSION, source=str(source.resolve()),
                                                        tensors=tensors)))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "index.json").is_file():  # not another process's entry that won the race
                raise
        conversions += 1
        _prune(folder, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(keep: Path, source: Path) -> None:
    """Entries of earlier versions of the same file go (a process still mapping one keeps its pages)."""
    for other in keep.parent.glob(f"{source.stem}-*"):
        try:
            if other != keep and json.loads((other / "index.json").read_text()).get("source") == str(source.resolve()):
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError):
            continue


def _append(f, t: torch.Tensor | None):
    if t is None:
        return None
    pad = -f.tell() % ALIGN
    f.write(b"\0" * pad)
    offset = f.tell()
    t = t.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype is torch.bfloat16 else t
    f.write(memoryview(raw.numpy()).cast("B"))
    return [offset, _DTYPES[t.dtype], list(t.shape)]


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
