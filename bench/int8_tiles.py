"""The matrix engine's ways with quantised weights against the row-by-row int8 kernel, on the 26B-A4B shapes:
CPU time (time.process_time, one thread, best of a few) of one product per way and row count.

    .venv/bin/python bench/int8_tiles.py [--rows 8,16,32,64,128,256,512] [--formats q8_0,q4_k,q5_0] [--reps 3]

Ways: `tiles` (AMX int8 tiles, amx_products.cpp), `bf16` (dequantised to bf16 per call, MKL's AMX GEMM,
matrix_engine.cpp), `bf16 tiles` (int4 weights: AMX bf16 tiles, amx_bf16_products.cpp), `rows` (the int8-activation
kernel, qmm_q8). Prints one line per shape, format and row
count with each way's milliseconds and G MAC/s, the machine's load average beside (a shared machine: CPU time
survives load better than wall time). ops.INT8_TILES_MAX_ROWS and BF16_TILES_MAX_ROWS are read off these lines.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

# (name, N, K): an expert's gate_up and down, the dense MLP's gate and down, the sliding layers' q projection
SHAPES = [("experts gate_up", 1408, 2816), ("experts down", 2816, 704), ("mlp gate", 2112, 2816),
          ("mlp down", 2816, 2112), ("attn q", 4096, 2816)]


def weight(n: int, k: int, fmt: str, seed: int = 0):
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from gemma4.checkpoint.gguf_blocks import from_gguf

    from gemma4.quant.formats import QuantWeight

    g = torch.Generator().manual_seed(seed)
    if fmt == "q4_k":  # random blocks (the gguf package does not write Q4_K): the kernels' cost is the layout's
        return QuantWeight(4, 256, torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
                           torch.rand(n, k // 256, generator=g) * 1e-3, -torch.rand(n, k // 256, generator=g) * 1e-3,
                           torch.randint(0, 64, (n, k // 16), dtype=torch.int8, generator=g))
    qtype = {"q8_0": T.Q8_0, "q5_0": T.Q5_0, "q4_0": T.Q4_0}[fmt]
    w = torch.randn(n, k, generator=g) * 0.02
    return from_gguf(quantize(w.numpy(), qtype), qtype, (n, k))


def cpu_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="8,16,32,64,128,256,512")
    ap.add_argument("--formats", default="q8_0,q4_k,q5_0")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import gemma4.native
    from gemma4.native import isa, ops

    kernel = gemma4.native.compiled()
    engine = ops.matrix_engine()
    tiles = ops.int8_tiles()
    print(f"# {isa.describe()}; tiles {'yes' if tiles else 'no'}, bf16 engine {'yes' if engine else 'no'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, n, k in SHAPES:
        for fmt in args.formats.split(","):
            if fmt == "q4_k" and k % 256:
                continue
            w = weight(n, k, fmt)
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
                ways = {"rows": lambda: kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub)}
                if engine is not None:
                    xb = x.bfloat16()
                    ways["bf16"] = lambda: engine.engine_mm_grouped(xb, w.q, w.scale, w.zero, w.bits, w.group, w.sub,
                                                                    [0], [0, rows])
                if tiles is not None:
                    ways["tiles"] = lambda: tiles.amx_mm_grouped(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub,
                                                                 [0], [0, rows])
                if tiles is not None and engine.amx_bf16_ready() and w.bits == 4:
                    ways["bf16 tiles"] = lambda: engine.amx_bf16_grouped(x, None, w.q, w.scale, w.zero, w.bits, w.group,
                                                                         w.sub, [0], [0, rows])
                cells = []
                for way, fn in ways.items():
                    ms = cpu_ms(fn, args.reps)
                    cells.append(f"{way} {ms:7.2f} ms {rows * n * k / ms / 1e6:5.0f} GMAC/s")
                print(f"{name:16s} {n:5d}x{k:<5d} {fmt:5s} rows {rows:4d}: " + " | ".join(cells)
                      + f"  (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
