"""One tower of a llama.cpp mmproj GGUF (general.architecture clip), read as a checkpoint of its own.

`convert_hf_to_gguf.py --mmproj` writes the vision tower (projector gemma4v, tensors v.* and mm.*) and
the audio tower (gemma4a, a.* and mm.a.*) into one file; vision.py and audio.py each read their tower
through this class: the file's checks, the tensor table under our names, float tensors on demand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .gguf_file import GGUFFile

MMPROJ_ARCH = "clip"
AUDIO_PREFIXES = ("a.", "mm.a.")  # the audio tower's tensors; the rest of an mmproj is the vision tower's
_SCALARS = ("input_min", "input_max", "output_min", "output_max")  # clipping bounds, 0-d tensors


class MmprojTower:
    """A subclass names its tower (`tower`: the metadata keys' middle word, `projector`: the projector type
    it reads) and supplies the tower's tensors and config; the layouts where llama.cpp's differ from ours
    come back through `_our_shape` / `_to_ours`."""

    tower = ""
    projector = ""

    def __init__(self, path: str | Path, text_hidden_size: int | None = None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such mmproj file")
        self.file = GGUFFile(self.path)
        meta = self.metadata = self.file.metadata
        if meta.get("general.architecture") != MMPROJ_ARCH:
            raise ModelLoadError(f"{self.path.name}: general.architecture is {meta.get('general.architecture')!r}, "
                                 f"not an mmproj file ({MMPROJ_ARCH!r})")
        projector = self._projector_type()
        if projector != self.projector:
            raise ModelLoadError(f"clip.{self.tower}.projector_type: {projector!r} is not supported "
                                 f"(expected {self.projector!r})")
        self._gguf: dict[str, str] = {}
        for gguf_name in self.file.tensors:
            if not self._holds(gguf_name):
                continue
            ours = self._from_gguf(gguf_name)
            if ours is None:
                raise ModelLoadError(f"{gguf_name}: tensor not known for the {self.projector} projector")
            self._gguf[ours] = gguf_name
        self.config = self._config(text_hidden_size)

    # ---- what a tower supplies ---------------------------------------------------------------
    def _projector_type(self) -> Any:
        return self.metadata.get(f"clip.{self.tower}.projector_type")

    def _holds(self, gguf_name: str) -> bool:
        """Whether a tensor of the file is this tower's."""
        raise NotImplementedError

    def _from_gguf(self, gguf_name: str) -> str | None:
        raise NotImplementedError

    def _config(self, text_hidden_size: int | None):
        raise NotImplementedError

    def _our_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def _to_ours(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t

    # ---- metadata ----------------------------------------------------------------------------
    def _need(self, key: str) -> Any:
        value = self.metadata.get(key)
        if value is None:
            raise ModelLoadError(f"{key}: missing from the mmproj GGUF metadata")
        return value

    def _shape(self, gguf_name: str) -> tuple[int, ...]:
        info = self.file.tensors.get(gguf_name)
        if info is None:
            raise ModelLoadError(f"{gguf_name}: missing from the mmproj GGUF")
        return tuple(int(s) for s in info.shape)

    def _projection(self, text_hidden_size: int | None, what: str = "") -> int:
        """The width the tower projects to, refused where it is not the text model's hidden size."""
        key = f"clip.{self.tower}.projection_dim"
        projection = int(self._need(key))
        if text_hidden_size is not None and projection != text_hidden_size:
            raise ModelLoadError(f"{key}: the mmproj projects {what}to {projection}, but the text model's hidden "
                                 f"size is {text_hidden_size} (an mmproj of another model?)")
        return projection

    # ---- the checkpoint interface (names, shape, tensor) -------------------------------------
    def names(self) -> list[str]:
        return list(self._gguf)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._shape(self._gguf[name])
        return () if name.endswith(_SCALARS) else self._our_shape(name, shape)

    def tensor(self, name: str) -> torch.Tensor:
        t = torch.from_numpy(self.file.dequantized(self._gguf[name]).copy())
        if name.endswith(_SCALARS):
            return t.reshape(())  # the converter stores the clipping bounds as 1-element tensors
        return self._to_ours(name, t)
