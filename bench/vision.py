"""Image encoding on the Gemma 4 26B-A4B vision shape: time to encode one image, and its soft tokens.

Random weights in the vision tower's shape for the 26B and 31B models — width 1152, 16 heads of 72,
patch 16, pooling 3x3, a 10240-entry position table, standardisation after pooling, projected to the
text width 2816 — with the depth and MLP width of the SigLIP-So400m encoder it descends from (27
layers, 4304), which is what gives the ~550M vision parameters the model card states. The tower is
written once as an mmproj GGUF (F16, as llama.cpp's converter writes it by default) and both engines
read that same file:

- gemma4: the tower from the mmproj (float32 compute), our preprocessing of the image and one encode;
- llama.cpp (libmtmd through llama-cpp-python): the same mmproj beside a random 26B-A4B-shape text
  GGUF (bench/prepare.py's, two layers: mtmd only checks the text width), the image as an RGB bitmap,
  tokenised and encoded with mtmd_encode_chunk.

The figure is the median wall time of the encode over --repeats runs, after one warm-up; both use
the machine's cores (llama.cpp n_threads = torch threads).

Both are given the same budget of soft tokens per image (--image-tokens, default 280 as the model's
processor config says; llama.cpp's own default budget is larger and gives an 896x896 image 361).

    python bench/vision.py [--size 896] [--repeats 3] [--layers 27] [--image-tokens 280]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from prepare import cache_dir, ensure_llama_cpp, log, shape_model  # noqa: E402
from gemma4.config.vision import VisionConfig  # noqa: E402

TEXT_HIDDEN = 2816
SEED = 0


def vision_config(layers: int) -> VisionConfig:
    return VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers, num_attention_heads=16,
                        num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
                        position_embedding_size=10240, text_hidden_size=TEXT_HIDDEN, standardize=True)


class RandomVision:
    """A vision checkpoint reader (names, shapes, tensors in our names) of random weights."""

    def __init__(self, config: VisionConfig):
        from gemma4.model.vision import VisionModel

        self.config = config
        with torch.device("meta"):
            self._shapes = {k: tuple(v.shape) for k, v in VisionModel(config).state_dict().items()}

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def tensor(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(SEED + sum(map(ord, name)))
        shape = self._shapes[name]
        if name.endswith("std_scale"):
            return torch.ones(shape)
        if name.endswith(("norm.weight", "std_bias")):
            return torch.zeros(shape)
        return torch.randn(shape, generator=g) * 0.02


def mmproj_file(layers: int) -> Path:
    from gemma4.checkpoint.vision import write_mmproj

    out = cache_dir() / f"gemma4-26b-a4b-vision-L{layers}" / "mmproj-F16.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"writing {out} (random weights, once)")
        write_mmproj(RandomVision(vision_config(layers)), out, "F16")
    return out


def picture(size: int):
    """A smooth RGB image of size x size with noise (something for resizing to do)."""
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / (size - 1), y * 255 / (size - 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, size=base.shape), 0, 255).astype(np.uint8)


def ours(mmproj: Path, pixels: np.ndarray, repeats: int, max_soft_tokens: int) -> tuple[float, torch.Tensor]:
    from gemma4.checkpoint.vision import MmprojCheckpoint
    from gemma4.images import Image, preprocess
    from gemma4.model.vision import load_vision

    ckpt = MmprojCheckpoint(mmproj, TEXT_HIDDEN)
    tower = load_vision(ckpt, torch.float32, torch.device("cpu"))
    cfg = ckpt.config
    image = Image.from_array(pixels)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            p = preprocess(image, cfg.patch_size, cfg.pooling_kernel_size, max_soft_tokens)
            out = tower.encode(p.pixel_values, p.positions)
            if i:
                times.append(time.perf_counter() - t0)
    return statistics.median(times), out.float()


def llamacpp(mmproj: Path, text_gguf: Path, pixels: np.ndarray, repeats: int,
             max_soft_tokens: int) -> tuple[float, torch.Tensor] | None:
    if ensure_llama_cpp(install=False) is None:
        return None
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(str(text_gguf), n_ctx=1024, n_threads=threads, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = threads
    params.print_timings = False
    params.warmup = False
    params.image_max_tokens = max_soft_tokens  # the same budget as ours (llama.cpp's own default is larger)
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not load {mmproj}")
    h, w, _ = pixels.shape
    data = np.ascontiguousarray(pixels).tobytes()
    bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
    chunks = mtmd.mtmd_input_chunks_init()
    marker = mtmd.mtmd_default_marker()
    text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
        raise RuntimeError("llama.cpp could not tokenise the image")
    image_chunk = None
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            image_chunk = chunk
    if image_chunk is None:
        raise RuntimeError("llama.cpp made no image chunk")
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        if mtmd.mtmd_encode_chunk(ctx, image_chunk) != 0:
            raise RuntimeError("llama.cpp failed to encode the image")
        if i:
            times.append(time.perf_counter() - t0)
    n = mtmd.mtmd_input_chunk_get_n_tokens(image_chunk)
    embd = mtmd.mtmd_get_output_embd(ctx)
    out = torch.from_numpy(np.ctypeslib.as_array(embd, shape=(n * TEXT_HIDDEN,)).copy()).view(n, TEXT_HIDDEN)
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    mtmd.mtmd_free(ctx)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=896, help="the image's side in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=27, help="vision layers (27 in the real tower)")
    ap.add_argument("--image-tokens", type=int, default=280, help="soft tokens per image at most, for both")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    mmproj = mmproj_file(args.layers)
    pixels = picture(args.size)
    t_ours, e_ours = ours(mmproj, pixels, args.repeats, args.image_tokens)
    peer = llamacpp(mmproj, shape_model(layers=2, formats=("Q8_0",)).gguf["Q8_0"], pixels, args.repeats,
                    args.image_tokens)
    print(f"\nImage encoding, Gemma 4 26B-A4B vision shape ({args.layers} layers, random weights, mmproj F16), "
          f"one {args.size}x{args.size} image, {torch.get_num_threads()} threads, median of {args.repeats}:")
    print(f"{'engine':<12}{'seconds':>10}{'soft tokens':>13}")
    print(f"{'gemma4':<12}{t_ours:>10.2f}{e_ours.shape[0]:>13}")
    if peer is None:
        print("llama.cpp: llama-cpp-python is not installed (make parity builds it)")
        return
    t_peer, e_peer = peer
    print(f"{'llama.cpp':<12}{t_peer:>10.2f}{e_peer.shape[0]:>13}")
    print(f"ratio gemma4/llama.cpp speed: {t_peer / t_ours:.2f}x")
    if e_peer.shape == e_ours.shape:
        diff = (e_ours - e_peer).abs().max().item()
        rel = ((e_ours - e_peer).norm() / e_peer.norm()).item()
        print(f"soft-token embeddings, gemma4 vs llama.cpp: max |diff| {diff:.3g}, relative L2 {rel:.3g} "
              f"(values of size {e_peer.abs().max().item():.3g})")


if __name__ == "__main__":
    main()
