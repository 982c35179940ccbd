"""Profile of one prefill chunk late in a long prompt: where its time goes, per part of each layer.

    python bench/profile_prefill.py [MODEL] [--context 16384] [--chunk 512] [--rounds 2]

MODEL: a GGUF (default: bench/prepare.py's 26B-A4B-shape Q4_K_M file, 2 layers). The cache is filled to
the context minus one chunk with random keys and values (attention's cost does not depend on them; a real
prefill of 16K tokens takes minutes), then the last chunk runs, the best of --rounds, inside
prefill_products() as a prefill's chunks do. Prints milliseconds per part: each layer's attention
(sliding / full: its cache write and read, scores, softmax and P.V), the MoE block (router and experts),
and the rest (projections, norms, dense MLP, head).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from long_context import fill_synthetic  # noqa: E402


def timed(table: dict, key: str, fn):
    def call(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            table[key] += time.perf_counter() - t
    return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--float-attention", action="store_true", help="attention on the float32 path (the engine's off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import prepare

    import gemma4
    from gemma4.native import isa, ops

    if args.float_attention:
        ops.ENGINE_ATTENTION_MIN_ROWS = float("inf")
    path = args.model or str(prepare.cache_dir() / "gemma4-26b-a4b-shape-L2" / "model-Q4_K_M.gguf")
    model = gemma4.load(path, progress=False)
    dec = model.decoder
    cfg = dec.config
    table: dict[str, float] = defaultdict(float)
    for i, layer in enumerate(dec.layers):
        kind = "sliding" if cfg.is_sliding(i) else "full"
        att = layer.self_attn
        att.over_cache = timed(table, f"attention {kind} (layer {i})", att.over_cache)
        if layer.moe:
            layer.router.forward = timed(table, "moe router", layer.router.forward)
            layer.experts.forward = timed(table, "moe experts", layer.experts.forward)

    g = torch.Generator().manual_seed(1)
    filled = args.context - args.chunk
    best = None
    with torch.inference_mode():
        for _ in range(args.rounds):
            cache = dec.new_cache(batch=1, capacity=args.context)
            fill_synthetic(cache, filled, dec.dtype, g)
            ids = torch.randint(10, 1000, (1, args.chunk), generator=g)
            table.clear()
            t = time.perf_counter()
            with ops.prefill_products():
                dec(ids, torch.arange(filled, args.context)[None], cache)
            total = time.perf_counter() - t
            if best is None or total < best[0]:
                best = (total, dict(table))
            del cache
    total, parts = best
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{Path(path).name}: one {args.chunk}-token chunk at context {args.context}, {args.threads} threads, "
          f"best of {args.rounds}, attention {'float32' if args.float_attention else 'engine'}; load {load}; ISA {isa.describe()}")
    attention = sum(v for k, v in parts.items() if k.startswith("attention"))
    moe = sum(v for k, v in parts.items() if k.startswith("moe"))
    print(f"| part | ms | share |\n|---|---|---|")
    for k in sorted(parts, key=lambda k: (not k.startswith("attention"), k)):
        print(f"| {k} | {parts[k] * 1e3:.0f} | {parts[k] / total:.0%} |")
    rest = total - attention - moe
    print(f"| rest (projections, norms, dense MLP, head) | {rest * 1e3:.0f} | {rest / total:.0%} |")
    print(f"| total | {total * 1e3:.0f} | {args.chunk / total:.0f} tok/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
