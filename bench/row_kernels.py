"""The int8-activation row kernels, 256-bit (AVX2) against 512-bit (AVX-512 VNNI), in one process: CPU time of the
calling thread per product, one thread, best of a few rounds, the two kernels alternating.

    python bench/row_kernels.py [MODEL] [--tensors NAME ...] [--rows 1 2 4 8]

MODEL is a GGUF file (default: the embedded model; its output head and one layer's products). Each tensor is
converted as the loader converts it; the activations are random. Where the CPU lacks AVX-512 VNNI only the 256-bit
kernels are timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EMBEDDED = ["token_embd.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.0.attn_output.weight"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tensors", nargs="+", default=None)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import gemma4.native
    from gemma4.checkpoint.gguf_blocks import from_gguf
    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.native import isa
    from gemma4.store import embedded_path

    kernel = gemma4.native.compiled()
    if kernel is None:
        sys.exit("the native kernels are not built here")
    kinds = ["avx2", "avx512"] if isa.has(*isa.WIDE_ROWS_FLAGS) else ["avx2"]
    f = GGUFFile(args.model or embedded_path())
    names = args.tensors or (EMBEDDED if args.model is None else [n for n in f.tensors if n.startswith("blk.0.")])
    print(f"# {isa.describe()}; one thread; load {os.getloadavg()[0]:.2f}; ms per product (CPU time), best of {args.rounds}")
    for name in names:
        info = f.tensors[name]
        if len(info.shape) != 2 or info.type.name in ("F32", "F16", "BF16"):
            continue
        w = from_gguf(f.raw(name), info.type, tuple(info.shape))
        k = info.shape[-1]
        for m in args.rows:
            x = torch.randn(m, k)
            reps = max(1, int(2e7 // (w.q.numel() * m)))
            best = dict.fromkeys(kinds, float("inf"))
            for _ in range(args.rounds):
                for kind in kinds:
                    kernel.set_row_kernels(kind)
                    start = time.thread_time()
                    for _ in range(reps):
                        kernel.qmm_q8(x, w.q, w.scale, w.zero, w.bits, w.group, w.sub)
                    best[kind] = min(best[kind], (time.thread_time() - start) / reps)
            line = ", ".join(f"{kind} {best[kind] * 1e3:.3f}" for kind in kinds)
            ratio = f", x{best['avx2'] / best['avx512']:.2f}" if len(kinds) == 2 else ""
            print(f"{name} {info.type.name} {tuple(info.shape)} rows {m}: {line}{ratio}", flush=True)
    kernel.set_row_kernels(isa.row_kernels())


if __name__ == "__main__":
    main()
