"""Collective traffic per decoded token of a split model: measured on a tiny model, then the arithmetic for
the real Gemma 4 26B-A4B split over 2 nodes, 4 nodes and 8 GPUs, and what 10 and 100 Gbit/s links give.

Measured: a random tiny model in the 26B-A4B pattern (bench/random_model.py, SHAPE_TINY) split over 2 ranks
on this machine (gloo), tensor and expert parallel; gemma4.distributed.traffic counts the bytes rank 0 hands
to each collective over a run of greedy decode steps (after the prefill). The same formula as the paper
arithmetic is printed beside it: the two must agree, which checks the formula.

Per decoded token and rank (payload bytes; a activation width in bytes, H hidden, L layers, all MoE):
  tensor parallel N:  all-reduce  H a (embedding) + L (H a after attention + 2 H a after the MLP block:
                      the dense MLP's and the experts' partial sums in one call);  gather  V/N a (logits to
                      rank 0);  broadcast: the step's ids and positions and the hidden state for the head.
  expert parallel N:  all-reduce  L H a (the experts' partial sums); the head is whole on rank 0.
On the wire, a ring all-reduce of P bytes moves 2 (N-1)/N P through each rank's link, and the gather brings
(N-1) V/N a into rank 0's link. Each collective also pays latency: 2 (N-1) hops of a ring.

    python bench/distributed_traffic.py            # measure (about a minute) and print the arithmetic
    python bench/distributed_traffic.py --paper    # the arithmetic only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from random_model import SHAPE_26B_A4B, SHAPE_TINY, write_hf_folder  # noqa: E402

REAL = dict(SHAPE_26B_A4B, num_hidden_layers=30, vocab_size=262144)
CONTROL_BYTES = 750  # one step's pickled message (ids, positions, cache and rows), measured on the tiny run
HOP_LATENCY_S = 25e-6  # one TCP hop on a 10/100 GbE LAN, an assumption (RDMA: a few µs)
LINKS = {"10 Gbit/s": 10e9 / 8, "100 Gbit/s": 100e9 / 8}
SPLITS = [("2 nodes", 2), ("4 nodes", 4), ("8 GPUs", 8)]


def per_token(shape: dict, n: int, tensor: bool, a: int) -> dict[str, float]:
    """Payload bytes rank 0 hands to each kind of collective per decoded token (see the module's docstring)."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    moe = shape.get("enable_moe_block", False)
    if tensor:
        return {"all_reduce": h * a * (1 + layers * (3 if moe else 2)), "gather": -(-vocab // n) * a,
                "broadcast": CONTROL_BYTES + h * a}
    return {"all_reduce": layers * h * a if moe else 0.0, "broadcast": CONTROL_BYTES}


def collectives(shape: dict, tensor: bool) -> int:
    layers = shape["num_hidden_layers"]
    return (1 + 2 * layers + 1 + 4) if tensor else (layers + 2)  # + the step's and the head's broadcasts


def wire(payload: dict[str, float], n: int) -> float:
    """Bytes through the busiest link (rank 0's) per token."""
    return (2 * (n - 1) / n * payload.get("all_reduce", 0) + (n - 1) * payload.get("gather", 0)
            + (n - 1) * payload.get("broadcast", 0))


def measure(tokens: int) -> dict[str, dict[str, float]]:
    import torch

    import gemma4
    from gemma4.distributed import traffic

    shape = dict(SHAPE_TINY, num_hidden_layers=6, vocab_size=512)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = write_hf_folder(Path(d) / "tiny", 6, 512, dict(bos=2, eos=1, pad=0), tiny=True)
        for name, split in (("tensor", dict(tensor_parallel=2)), ("experts", dict(expert_parallel=2))):
            model = gemma4.load(path, progress=False, **split)
            try:
                prompt = torch.randint(3, 512, (32,), generator=torch.Generator().manual_seed(0)).tolist()
                steps = model.generate(prompt, max_tokens=tokens + 2, temperature=0, ignore_eos=True, stream=True)
                next(steps), next(steps)  # the step of the prefill also ran the first decode step: 2 tokens
                traffic.reset()
                n = sum(1 for o in steps if o.token_id is not None)  # decode steps (not the closing output)
                out[name] = {k: v / n for k, v in traffic.bytes.items()}
                out[name]["calls"] = sum(traffic.calls.values()) / n
            finally:
                model.decoder.close()
    return {"shape": shape, **out}


def fmt(b: float) -> str:
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paper", action="store_true", help="the arithmetic only, no measurement")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps measured (default 16)")
    args = ap.parse_args()
    if not args.paper:
        got = measure(args.tokens)
        print(f"Measured, tiny model (hidden {got['shape']['hidden_size']}, {got['shape']['num_hidden_layers']} MoE "
              f"layers, vocabulary {got['shape']['vocab_size']}, float32), 2 ranks, per decoded token on rank 0:")
        for name in ("tensor", "experts"):
            m, p = got[name], per_token(got["shape"], 2, name == "tensor", 4)
            parts = ", ".join(f"{k} {fmt(m.get(k, 0))} (formula {fmt(p.get(k, 0))})" for k in ("all_reduce", "gather")
                              if k in p)
            print(f"  {name:>7} parallel: {parts}; broadcast {fmt(m.get('broadcast', 0))}; "
                  f"{m['calls']:.0f} collectives")
        print()
    print(f"Gemma 4 26B-A4B (hidden {REAL['hidden_size']}, {REAL['num_hidden_layers']} MoE layers, "
          f"{REAL['num_experts']} experts top-{REAL['top_k_experts']}, vocabulary {REAL['vocab_size']}), "
          f"bf16 activations, per decoded token (batch 1):")
    print(f"{'split':<9} {'mode':<8} {'all-reduce':>11} {'gather':>9} {'wire':>9}  "
          + "  ".join(f"{k + ' tok/s':>17}" for k in LINKS) + "  (bandwidth / with latency)")
    for label, n in SPLITS:
        for tensor in (True, False):
            p = per_token(REAL, n, tensor, 2)
            w = wire(p, n)
            calls = collectives(REAL, tensor)
            latency = calls * 2 * (n - 1) * HOP_LATENCY_S
            rates = "  ".join(f"{speed / w:>8.0f} / {1 / (w / speed + latency):>6.0f}" for speed in LINKS.values())
            print(f"{label:<9} {'tensor' if tensor else 'experts':<8} {fmt(p['all_reduce']):>11} "
                  f"{fmt(p.get('gather', 0)):>9} {fmt(w):>9}  {rates}")
    print(f"\nLatency: {HOP_LATENCY_S * 1e6:.0f} µs per ring hop assumed; batch B multiplies the bytes by B and not "
          "the latency. Expert parallel keeps attention whole on every rank (each rank holds all the KV).")


if __name__ == "__main__":
    main()
