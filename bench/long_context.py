"""Long contexts on the Gemma 4 26B-A4B attention shape: KV bytes, peak memory, prefix reuse.

Random weights, the published widths, reduced depth (default 2 layers: one sliding, one full).
Figures are per layer and extrapolated to the real 30 layers (25 sliding, 5 full), in bf16:

- KV bytes per token of a full layer measured from the cache against the minimum (K=V: 2 KV heads x
  512 x 2 bytes = 2 KiB per layer, 10 KiB for the 5), and the fixed bytes of a sliding ring;
- peak RSS above the weights at 8K, 32K and 128K tokens of context: the cache is filled to the
  context minus one chunk, then the last prefill chunk runs (the largest chunk of a prefill: its
  attention spans the whole context) and one decode step;
- llama.cpp's KV buffers for the same shape (llama-cpp-python, verbose), when a GGUF of it is found
  ($GEMMA4_BENCH_CACHE or ~/.cache/gemma4-bench/gemma4-26b-a4b-shape-L6/model-Q8_0.gguf);
- time to first token of a second question on a cached document against the first, through the
  engine's automatic prefix reuse (bench/api_prefix_reuse.py: the same through the Python API);
  on the shape's Q4_K_M file where bench/prepare.py made it, the first per layer and times 30, and
  llama.cpp's on the same file and ids in the same run.

    python -m bench.long_context [--contexts 8192,32768,131072] [--ttft-context 32768] [--layers 2]

Writes bench/LONG_CONTEXT.md (or --results) with the date and the load, and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
             global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
             enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704)
REAL_SLIDING, REAL_FULL = 25, 5
CHUNK = 512
VOCAB = 4096  # the embedding does not touch the KV; a small one keeps memory for the context


def config(layers: int):
    from gemma4.config.text import ModelConfig

    types = ["full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention" for i in range(layers)]
    return ModelConfig.from_hf(dict(
        architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", vocab_size=VOCAB, num_hidden_layers=layers,
        layer_types=types, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, final_logit_softcapping=30.0,
        max_position_embeddings=262144, tie_word_embeddings=True, hidden_size_per_layer_input=0,
        num_kv_shared_layers=0, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}},
        bos_token_id=2, eos_token_id=1, pad_token_id=0, **SHAPE))


def random_decoder(layers: int, dtype=torch.bfloat16):
    from gemma4.model.decoder import Decoder

    torch.manual_seed(0)
    with torch.device("meta"):
        dec = Decoder(config(layers))
    dec = dec.to_empty(device="cpu").to(dtype)
    for name, p in dec.named_parameters():  # as gemma4.load holds them (model/load.py): norms stay float32
        if name.endswith("norm.weight"):
            p.data = p.data.float()
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0)
        fresh = Decoder.__new__(Decoder)  # non-persistent buffers (RoPE frequencies) are recomputed
        for i, layer in enumerate(dec.layers):
            from gemma4.model.layers import rope_inv_freq

            cfg = dec.config
            layer.self_attn.inv_freq = rope_inv_freq(cfg.rope_of(i), cfg.head_dim_of(i))
            if layer.layer_scalar is not None:
                layer.layer_scalar.fill_(1.0)
        del fresh
    return dec.eval()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill_synthetic(cache, filled: int, dtype, g: torch.Generator) -> None:
    """Random K/V for positions below `filled` in every layer of cache (memory and time do not depend on the values)."""
    for start in range(0, filled, 4096):
        end = min(filled, start + 4096)
        pos = torch.arange(start, end)[None]
        for layer in cache.layers:
            shape = (1, layer.v.shape[1], end - start, layer.v.shape[3])
            k = torch.randn(shape, generator=g).to(dtype) if layer.k is not None else None
            layer.write(k, torch.randn(shape, generator=g).to(dtype), pos)


def memory_child(context: int, layers: int) -> dict:
    """One context in this process (peak RSS is per process): fill, last chunk, one decode step."""
    dec = random_decoder(layers)
    cfg = dec.config
    base = _rss_mib()
    with torch.inference_mode():
        cache = dec.new_cache(batch=1, capacity=context + 3)  # + the decode steps
        filled = context - CHUNK
        g = torch.Generator().manual_seed(1)  # the fill, then the last chunk's ids
        fill_synthetic(cache, filled, dec.dtype, g)
        pool_tokens = cache.table.num_blocks * cache.table.block  # what the full layers' pools hold
        kv = {i: cache.layers[i].nbytes() / (1 if cfg.is_sliding(i) else pool_tokens) for i in range(layers)}
        filled_rss = _rss_mib()
        ids = torch.randint(3, VOCAB, (1, CHUNK), generator=g)
        t0 = time.perf_counter()
        dec(ids, torch.arange(filled, context)[None], cache)
        chunk_s = time.perf_counter() - t0
        steps = []
        for n in range(3):  # the median of three steps (later positions of the same context)
            t0 = time.perf_counter()
            dec(ids[:, n:n + 1], torch.tensor([[context + n]]), cache)
            steps.append(time.perf_counter() - t0)
        step_s = sorted(steps)[1]
    full = [i for i in range(layers) if not cfg.is_sliding(i)]
    sliding = [i for i in range(layers) if cfg.is_sliding(i)]
    full_per_token = sum(kv[i] for i in full) / len(full) if full else 0
    ring = sum(kv[i] for i in sliding) / len(sliding) if sliding else 0
    return dict(context=context, layers=layers, weights_rss_mib=base, kv_rss_mib=filled_rss - base,
                peak_above_weights_mib=_peak_mib() - base, full_bytes_per_token=full_per_token,
                sliding_ring_bytes=ring, last_chunk_s=chunk_s, decode_step_s=step_s)


def llama_cpp_kv(context: int) -> dict | None:
    """llama.cpp's KV buffer sizes per layer for a GGUF of this shape, from its verbose log (None: no
    file). Any depth of `make bench`'s shape files serves; its full (non-SWA) cache is logged first."""
    root = Path(os.environ.get("GEMMA4_BENCH_CACHE") or Path.home() / ".cache" / "gemma4-bench")
    files = sorted(root.glob("gemma4-26b-a4b-shape-L*/model-Q8_0.gguf"))
    if not files:
        return None
    code = ("from llama_cpp import Llama\n"
            f"Llama(model_path={str(files[0])!r}, n_ctx={context}, n_threads=2, n_batch={CHUNK}, n_ubatch={CHUNK}, "
            "verbose=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    sizes = [re.search(r"size =\s*([\d.]+) MiB \(\s*\d+ cells,\s*(\d+) layers", line)
             for line in r.stderr.splitlines() if line.startswith("llama_kv_cache") and "size =" in line]
    sizes = [(float(m.group(1)), int(m.group(2))) for m in sizes if m]
    if not sizes:
        return None
    (full_mib, full_layers), rest = sizes[0], sizes[1:]
    sliding = sum(mib for mib, _ in rest) / max(1, sum(n for _, n in rest))
    return dict(full_layer_mib=full_mib / full_layers, sliding_layer_mib=sliding, file=files[0].parent.name,
                swa_full="full-size SWA" in r.stderr)


def shape_gguf(layers: int) -> Path | None:
    """bench/prepare.py's Q4_K_M file of the 26B-A4B shape at this depth, where it was prepared."""
    root = Path(os.environ.get("GEMMA4_BENCH_CACHE") or Path.home() / ".cache" / "gemma4-bench")
    path = root / f"gemma4-26b-a4b-shape-L{layers}" / "model-Q4_K_M.gguf"
    return path if path.exists() else None


def ttft(context: int, layers: int, question: int = 32) -> dict:
    """Time to first token of two questions on one document through the engine's thread (prefix reuse), on the
    shape's Q4_K_M file where prepared (else random float32 weights), and llama.cpp's on the same file and ids."""
    from gemma4.kv import PrefixStore
    from gemma4.sampling import SamplingParams
    from gemma4.engine import Engine, Request

    class Model:  # what the engine needs of a model
        def __init__(self, decoder):
            self.decoder, self.tokenizer, self.eos_token_ids = decoder, None, {1}

    gguf = shape_gguf(layers)
    if gguf is not None:
        import gemma4

        model = Model(gemma4.load(str(gguf), progress=False).decoder)
    else:
        model = Model(random_decoder(layers, torch.float32))
    g = torch.Generator().manual_seed(2)
    doc = torch.randint(3, VOCAB, (context,), generator=g).tolist()
    store = PrefixStore(max_bytes=8 * 2**30)
    sched = Engine(model, max_batch=1, prefix_store=store, prefill_chunk=CHUNK).start()
    times = []
    try:
        for seed in (3, 4):
            q = torch.randint(3, VOCAB, (question,), generator=torch.Generator().manual_seed(seed)).tolist()
            done = threading.Event()
            t0 = time.perf_counter()
            sched.submit(Request(doc + q, SamplingParams(max_tokens=1, temperature=0), lambda out: done.set()))
            done.wait()
            times.append(time.perf_counter() - t0)
    finally:
        sched.stop()
    q = torch.randint(3, VOCAB, (question,), generator=torch.Generator().manual_seed(3)).tolist()
    print(f"[long_context] TTFT {context}: ours first {times[0]:.2f} s, second {times[1]:.3f} s", file=sys.stderr,
          flush=True)
    return dict(context=context, layers=layers, first_s=times[0], second_s=times[1], speedup=times[0] / times[1],
                reused_tokens=sched.stats.prefix_reused_tokens, model=gguf.name if gguf else "random float32",
                llama_s=llama_ttft(gguf, doc + q) if gguf else None)


def llama_ttft(path: Path, ids: list[int]) -> float | None:
    """llama.cpp's time to first token (the prompt's prefill and its last logits) in a process of its own."""
    code = ("import json, sys, time\nfrom llama_cpp import Llama\nids = json.loads(sys.stdin.read())\n"
            f"llm = Llama(model_path={str(path)!r}, n_ctx=len(ids) + 16, n_batch={CHUNK}, n_ubatch={CHUNK}, "
            "n_threads=2, n_threads_batch=2, verbose=False)\n"
            "t = time.perf_counter(); llm.eval(ids); print(time.perf_counter() - t)\n")
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                       timeout=7200)
    return float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None


def rows(contexts=(8192, 32768, 131072), layers: int = 2, ttft_context: int = 8192, llama: bool = True) -> list[dict]:
    out = []
    for ctx in contexts:
        r = subprocess.run([sys.executable, "-m", "bench.long_context", "--child", str(ctx), "--layers", str(layers)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if r.returncode != 0:
            out.append(dict(kind="memory", context=ctx, error=r.stderr.strip().splitlines()[-1:]))
            continue
        row = dict(kind="memory", **json.loads(r.stdout.strip().splitlines()[-1]))
        if llama:
            row["llama_cpp"] = llama_cpp_kv(ctx)
        out.append(row)
    if ttft_context:
        out.append(dict(kind="ttft", **ttft(ttft_context, layers)))
    return out


def _table(rs: list[dict]) -> str:
    kib, mib = 1024, 2**20
    lines = ["Gemma 4 26B-A4B shape, bf16 KV, random weights; per layer and extrapolated to 30 layers (25 sliding, 5 full)",
             f"theory: full layer 2 KV heads x 512 x 2 B = 2.0 KiB/token (K=V), sliding ring 1024 x 8 x 256 x 2 x 2 B "
             f"= 8.0 MiB; 30 layers: 10 KiB/token + 200 MiB",
             "", f"{'context':>8} {'full KiB/tok':>12} {'ring MiB':>9} {'KV 30L GiB':>10} {'min 30L GiB':>11} "
                 f"{'peak-wts MiB':>12} {'llama.cpp 30L GiB':>17} {'chunk s':>8} {'step s':>7}"]
    for r in rs:
        if r["kind"] != "memory":
            continue
        if "error" in r:
            lines.append(f"{r['context']:>8} failed: {r['error']}")
            continue
        ctx = r["context"]
        kv30 = REAL_FULL * r["full_bytes_per_token"] * ctx + REAL_SLIDING * r["sliding_ring_bytes"]
        min30 = REAL_FULL * 2 * 512 * 2 * ctx + REAL_SLIDING * 1024 * 8 * 256 * 2 * 2
        lc = r.get("llama_cpp")
        lc30 = (f"{(REAL_FULL * lc['full_layer_mib'] + REAL_SLIDING * lc['sliding_layer_mib']) * mib / 2**30:.2f}"
                if lc else "n/a")
        lines.append(f"{ctx:>8} {r['full_bytes_per_token'] / kib:>12.2f} {r['sliding_ring_bytes'] / mib:>9.2f} "
                     f"{kv30 / 2**30:>10.2f} {min30 / 2**30:>11.2f} {r['peak_above_weights_mib']:>12.0f} {lc30:>17} "
                     f"{r['last_chunk_s']:>8.2f} {r['decode_step_s']:>7.3f}")
    for r in rs:
        if r["kind"] == "ttft":
            lines.append("")
            lines.append(f"TTFT, {r['context']}-token document + 32-token question, {r['layers']} layers "
                         f"({r.get('model', 'random float32')}): first "
                         f"{r['first_s']:.2f} s, second (prefix reused, {r['reused_tokens']} tokens) {r['second_s']:.3f} s"
                         f" -> {r['speedup']:.0f}x")
            per = r["first_s"] / r["layers"]
            line = f"  first, per layer {per:.1f} s, x30 layers {30 * per / 60:.1f} min"
            if r.get("llama_s"):
                lp = r["llama_s"] / r["layers"]
                line += (f"; llama.cpp {r['llama_s']:.2f} s, per layer {lp:.1f} s, x30 layers {30 * lp / 60:.1f} min"
                         f" -> ours {r['llama_s'] / r['first_s']:.2f}x llama.cpp's speed")
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.long_context")
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ttft-context", type=int, default=32768, help="0: skip")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "LONG_CONTEXT.md"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.child:
        print(json.dumps(memory_child(args.child, args.layers)))
        return
    rs = rows([int(c) for c in args.contexts.split(",") if c], args.layers, args.ttft_context, not args.no_llama)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join([
        "# gemma4 long contexts", "",
        "Generated by `python -m bench.long_context` (part of `make bench`). One run on a shared machine, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load}, {torch.get_num_threads()} threads. "
        "peak-wts: peak RSS above the weights (cache filled to the context minus one chunk, then the last "
        f"{CHUNK}-token prefill chunk and three decode steps); chunk s / step s: that chunk and the median step; "
        "llama.cpp: the KV buffers it allocates for a GGUF of the same shape at that context, scaled to 30 layers.",
        "", "```", _table(rs), "```", ""])
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
