"""The GGUF container: header, metadata, tensor table, memory-mapped tensor bytes.

The `gguf` package supplies the format's constants and the block dequantisation; this module only
walks the header. (gguf's own GGUFReader builds a numpy view for every string of a metadata array,
which takes ~16 s on a 262K-token vocabulary; walking it directly takes well under a second.)
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError


def _gguf_constants():
    """gguf.constants without the rest of the gguf package: the package's __init__ imports its writer, its
    quantisers and, through its model-card reader, PyYAML (~0.1 s of a cold start), none of which reading a
    file needs. The module goes into sys.modules under its own name, so a later `import gguf` shares it."""
    name = "gguf.constants"
    spec = None if name in sys.modules or "gguf" in sys.modules else importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, Path(spec.submodule_search_locations[0]) / "constants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


_constants = _gguf_constants()
GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType = (_constants.GGML_QUANT_SIZES, _constants.GGMLQuantizationType,
                                                         _constants.GGUFValueType)

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALARS = {
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.FLOAT64: ("<d", np.float64),
    GGUFValueType.BOOL: ("<?", np.bool_),
}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest dimension first)
    type: GGMLQuantizationType
    offset: int  # from the start of the file
    n_bytes: int


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{self.path.name}: cannot open ({e})") from None
        self._view = memoryview(self._buf)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{self.path.name}: damaged or truncated GGUF header ({e})") from None

    # ---- primitive reads (from a memoryview of the map: slicing the numpy map costs ~4 us a read) ----
    def _take(self, n: int):
        if self._pos + n > len(self._view):
            raise ValueError("unexpected end of file")
        out = self._view[self._pos:self._pos + n]
        self._pos += n
        return out

    def _scalar(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return str(self._take(self._scalar("<Q")), "utf-8")

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary: 262K of them), read in one loop."""
        view, pos, end, out = self._view, self._pos, len(self._view), []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise ValueError("unexpected end of file")
            (n,) = length(view, pos)
            if pos + 8 + n > end:
                raise ValueError("unexpected end of file")
            out.append(str(view[pos + 8:pos + 8 + n], "utf-8"))
            pos += 8 + n
        self._pos = pos
        return out

    def _value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            etype = GGUFValueType(self._scalar("<I"))
            count = self._scalar("<Q")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                arr = np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype)
                return arr.tolist()
            if etype == GGUFValueType.STRING:
                return self._strings(count)
            return [self._value(etype) for _ in range(count)]
        return self._scalar(_SCALARS[vtype][0])

    # ---- layout ------------------------------------------------------------------------
    def _parse(self) -> None:
        """The header, read once per file version and kept (filecache): a 262K-token vocabulary takes a
        noticeable part of a cold start to walk, and far less to read back."""
        from ..filecache import cached

        self.version, self.metadata, infos, data_start = cached("gguf-header", self.path, self._read_header)
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ttype, offset in infos:
            ttype = GGMLQuantizationType(ttype)
            block, size = GGML_QUANT_SIZES[ttype]
            n = int(np.prod(dims)) if dims else 1
            info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), ttype, data_start + offset,
                              n // block * size)
            if info.offset + info.n_bytes > len(self._buf):
                raise ModelLoadError(f"{self.path.name}: truncated (tensor {name} ends past the end of the file)")
            self.tensors[name] = info

    def _read_header(self) -> tuple:
        """(version, metadata, [(name, dims, type, offset)], where the tensor data starts), plain values."""
        self._pos = 0
        magic = self._take(4)
        if magic != MAGIC:
            raise ModelLoadError(f"{self.path.name}: not a GGUF file (bad magic {magic!r})")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{self.path.name}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
            ttype = int(GGMLQuantizationType(self._scalar("<I")))
            infos.append((name, dims, ttype, self._scalar("<Q")))
        align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        return version, metadata, infos, (self._pos + align - 1) // align * align

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as the `gguf` package's dequantiser expects them: rows of packed blocks."""
        info = self.tensors[name]
        data = self._buf[info.offset:info.offset + info.n_bytes]
        if info.type == GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(info.shape)
        if info.type == GGMLQuantizationType.F16:
            return data.view(np.float16).reshape(info.shape)
        block, size = GGML_QUANT_SIZES[info.type]
        return data.reshape(*info.shape[:-1], info.shape[-1] // block * size)

    def dequantized(self, name: str) -> np.ndarray:
        """The tensor in float32, in its shape (a block type the `gguf` package cannot decode is refused)."""
        info = self.tensors[name]
        if info.type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):  # raw() has them as floats already
            return np.asarray(self.raw(name), dtype=np.float32).reshape(info.shape)
        from gguf.quants import dequantize

        try:
            data = dequantize(self.raw(name), info.type)
        except NotImplementedError:
            raise ModelLoadError(f"{name}: tensor type {info.type.name} cannot be dequantised") from None
        return np.asarray(data, dtype=np.float32).reshape(info.shape)
