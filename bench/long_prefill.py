"""Prefill rate of long prompts, ours against llama.cpp, on the prepared 26B-A4B-shape file (same tokens).

    .venv/bin/python bench/long_prefill.py [--lengths 512,4096,8192] [--format Q8_0] [--layers 2] [--rounds 2]
                                           [--model embedded|PATH]

Each engine runs in a process of its own, in turn (ours, llama.cpp, ours, ...), on one random prompt per
length (the same ids for both); a round's figures are from one process, each length prefilled once.
Needs bench/prepare.py's shape folder and llama-cpp-python (`make parity` builds it); prints one row per
length with both engines' best rate over the rounds and their ratio, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import prepare  # noqa: E402

SEED = 0
THREADS = 2


def prompts(lengths: list[int], vocab: int) -> list[list[int]]:
    """One random prompt per length, the same in every process (ids past the specials)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(10, min(vocab, 200000), (n,), generator=g).tolist() for n in lengths]


def ours(path: str, lengths: list[int]) -> list[float]:
    import time

    import torch

    import gemma4
    from gemma4.engine import prefill

    torch.set_num_threads(THREADS)
    model = gemma4.load(path, progress=False)
    rates = []
    for ids in prompts(lengths, model.config.vocab_size):
        cache = model.decoder.new_cache(batch=1, capacity=len(ids))
        t = time.perf_counter()
        with torch.inference_mode():
            prefill(model.decoder, cache, torch.tensor([ids]), torch.arange(len(ids))[None])
        rates.append(len(ids) / (time.perf_counter() - t))
    return rates


def llama(path: str, lengths: list[int]) -> list[float]:
    import time

    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=max(lengths) + 16, n_batch=512, n_ubatch=512, n_threads=THREADS,
                          n_threads_batch=THREADS, verbose=False, seed=0)
    rates = []
    for ids in prompts(lengths, llm.n_vocab()):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        rates.append(len(ids) / (time.perf_counter() - t))
    return rates


def _child(engine: str, path: str, lengths: list[int]) -> list[float]:
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import long_prefill as b; "
            f"print(json.dumps(b.{engine}({path!r}, {lengths!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{engine}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,4096,8192")
    p.add_argument("--format", default="Q8_0")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default=None, help="another GGUF instead of the shape file ('embedded': the embedded model)")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    folder = prepare.cache_dir() / f"gemma4-26b-a4b-shape-L{args.layers}"
    path = folder / f"model-{args.format}.gguf"
    if args.model:
        path = prepare.embedded_gguf() if args.model == "embedded" else Path(args.model)
    if not path.exists():
        print(f"error: {path} is missing: run bench/prepare.py --layers {args.layers} --formats {args.format}",
              file=sys.stderr)
        return 2
    best = {"ours": [0.0] * len(lengths), "llama": [0.0] * len(lengths)}
    for _ in range(args.rounds):
        for engine in ("ours", "llama"):
            rates = _child(engine, str(path), lengths)
            best[engine] = [max(a, b) for a, b in zip(best[engine], rates)]
    from gemma4.native import isa

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {THREADS} threads, ISA {isa.describe()}; "
          f"{isa.kernel_plan()}; "
          f"{path.name}{'' if args.model else f' of the 26B-A4B shape, {args.layers} layers'}; best of {args.rounds} rounds")
    print("| prompt tokens | gemma4 tok/s | llama.cpp tok/s | ratio |\n|---|---|---|---|")
    for n, a, b in zip(lengths, best["ours"], best["llama"]):
        print(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
