"""Memory of a loaded model, ours against llama.cpp, and decoding with the model's pages limited.

    .venv/bin/python bench/memory.py [--layers 2] [--format Q4_K_M] [--prompt 256] [--decode 16]
                                     [--fractions 1,0.5,0.25] [--allowance 1GiB] [--skip-limits]

1. The table: per model (the prepared 26B-A4B shape, the embedded model) and engine (ours converting in memory,
   as before the converted-weights cache; ours mapping that cache, started a second time; llama.cpp over its
   memory map): anonymous memory (RssAnon) and file-backed (RssFile) after load and after a prompt of
   --prompt tokens and --decode greedy tokens, peak RSS (VmHWM), load seconds.
2. Decoding under a memory limit: each engine in a memory cgroup (v1, /sys/fs/cgroup/memory; needs root) whose
   limit is a fraction of the shape file plus --allowance for the process itself (Python, torch, the tokenizer,
   buffers, KV), the page cache counted; the model file's pages are dropped from the page cache first, so each
   run reads what it uses. Ours runs with --max-memory = the fraction of the file. Decode tok/s, and ours' expert
   hit rate. A run the limit kills is reported as such.

Each measurement is a process of its own, one after the other, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import prepare  # noqa: E402

THREADS = 2
CGROUP = Path("/sys/fs/cgroup/memory")


def _status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


def _prompt(n: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [2] + [rng.randrange(10, min(vocab, 200000)) for _ in range(n - 1)]


def child_ours(path: str, prompt: int, decode: int, max_memory: int | None) -> dict:
    import torch

    import gemma4
    from gemma4.checkpoint import converted
    from gemma4.engine import prefill
    from gemma4.native import compiled

    torch.set_num_threads(THREADS)
    compiled()
    before_load = _status()
    t = time.perf_counter()
    model = gemma4.load(path, progress=False, max_memory=max_memory)
    load_s = time.perf_counter() - t
    after_load = _status()
    decoder = model.decoder
    ids = _prompt(prompt, model.config.vocab_size)
    with torch.inference_mode():
        cache = decoder.new_cache(batch=1, capacity=prompt + decode + 4)
        logits = decoder.logits(prefill(decoder, cache, torch.tensor([ids]), torch.arange(prompt)[None]))[:, -1]
        residency = getattr(decoder, "residency", None)
        if residency is not None:
            residency.reset_stats()
        t = time.perf_counter()
        for i in range(decode):
            h = decoder(logits.argmax(-1).view(1, 1), torch.tensor([[prompt + i]]), cache)
            logits = decoder.logits(h[:, -1])
        decode_s = time.perf_counter() - t
    out = dict(load_s=load_s, before_load=before_load, after_load=after_load, after_run=_status(),
               tok_s=decode / decode_s,
               conversions=converted.conversions)
    if residency is not None:
        s = residency.stats
        out.update(hit_rate=s.hit_rate, hot=s.hot_slots, experts=s.total_experts, locked=s.locked)
    return out


def child_llama(path: str, prompt: int, decode: int, max_memory: int | None) -> dict:
    import llama_cpp
    import numpy as np

    before_load = _status()
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=prompt + decode + 16, n_batch=prompt, n_ubatch=prompt,
                          n_threads=THREADS, n_threads_batch=THREADS, verbose=False, seed=0)
    load_s = time.perf_counter() - t
    after_load = _status()
    n_vocab = llm.n_vocab()

    def pick() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    llm.eval(_prompt(prompt, n_vocab))
    tok = pick()
    t = time.perf_counter()
    for _ in range(decode):
        llm.eval([tok])
        tok = pick()
    decode_s = time.perf_counter() - t
    return dict(load_s=load_s, before_load=before_load, after_load=after_load, after_run=_status(),
                tok_s=decode / decode_s)


def _run(engine: str, path: Path, args, env: dict, max_memory: int | None = None, cgroup: Path | None = None):
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import memory as b; "
            f"print(json.dumps(b.child_{engine}({str(path)!r}, {args.prompt}, {args.decode}, {max_memory!r})))")
    cmd = [sys.executable, "-c", code]
    if cgroup is not None:  # the shell joins the group, then becomes the measured process
        cmd = ["sh", "-c", f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"', "sh", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "OMP_NUM_THREADS": str(THREADS), **env})
    if r.returncode != 0:
        killed = r.returncode in (-9, 137)
        return {"error": "killed (out of memory under the limit)" if killed else r.stderr.strip()[-300:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _drop_cache(*paths: Path) -> None:
    """Evict the files' clean pages, so the next process reads (and is charged for) what it uses."""
    for p in paths:
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _converted_files(cache: Path) -> list[Path]:
    return list(cache.glob("*/weights.bin"))


def _gib(n) -> str:
    return f"{n / 2**30:6.2f}"


def table(models: dict[str, Path], args, cache: Path) -> list[str]:
    rows = ["| model | engine | load s | anon before load GiB | anon after load GiB | file after load GiB | "
            "anon after run GiB | file after run GiB | peak RSS GiB | decode tok/s |", "|---" * 10 + "|"]
    for name, path in models.items():
        size = path.stat().st_size
        runs = [("ours, converted in memory (before)", "ours", {"GEMMA4_CONVERTED": "off"})]
        _run("ours", path, argparse.Namespace(prompt=8, decode=1), {"GEMMA4_CONVERTED": str(cache)})  # writes the entry
        runs += [("ours, mapped (second start)", "ours", {"GEMMA4_CONVERTED": str(cache)}),
                 ("llama.cpp (mmap)", "llama", {})]
        for label, engine, env in runs:
            r = _run(engine, path, args, env)
            if "error" in r:
                rows.append(f"| {name} ({size / 2**30:.2f} GiB) | {label} | {r['error']} |")
                continue
            a, b = r["after_load"], r["after_run"]
            rows.append(f"| {name} ({size / 2**30:.2f} GiB) | {label} | {r['load_s']:.2f} | "
                        f"{_gib(r['before_load']['RssAnon'])} | {_gib(a['RssAnon'])} | "
                        f"{_gib(a['RssFile'])} | {_gib(b['RssAnon'])} | {_gib(b['RssFile'])} | {_gib(b['VmHWM'])} | "
                        f"{r['tok_s']:.2f} |")
            print(rows[-1], flush=True)
    return rows


def limited(path: Path, args, cache: Path) -> list[str]:
    if not (CGROUP / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        return ["(no memory cgroup v1 here, or not root: the limited runs are skipped)"]
    from gemma4.kv import parse_bytes

    size, allowance = path.stat().st_size, parse_bytes(args.allowance)
    rows = [f"| limit (file {size / 2**30:.2f} GiB + {allowance / 2**30:.2f} GiB allowance) | engine | decode tok/s | "
            "expert hit rate | peak RSS GiB |", "|---|---|---|---|---|"]
    for fraction in [float(f) for f in args.fractions.split(",")]:
        weights = int(fraction * size)
        for label, engine, env, budget in [("ours --max-memory", "ours", {"GEMMA4_CONVERTED": str(cache)}, weights),
                                           ("llama.cpp (mmap)", "llama", {}, None)]:
            group = CGROUP / f"gemma4-bench-{os.getpid()}"
            group.mkdir(exist_ok=True)
            try:
                (group / "memory.limit_in_bytes").write_text(str(weights + allowance))
                _drop_cache(path, *_converted_files(cache))
                r = _run(engine, path, args, env, budget, group)
            finally:
                _empty(group)
            head = f"| {int(fraction * 100)}%: {(weights + allowance) / 2**30:.2f} GiB | {label}"
            if "error" in r:
                rows.append(f"{head} | {r['error']} | | |")
            else:
                hit = f"{100 * r['hit_rate']:.1f}% ({r['hot']}/{r['experts']} hot)" if "hit_rate" in r else ""
                rows.append(f"{head} | {r['tok_s']:.2f} | {hit} | {_gib(r['after_run']['VmHWM'])} |")
            print(rows[-1], flush=True)
    return rows


def _empty(group: Path) -> None:
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--format", default="Q4_K_M")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--fractions", default="1,0.5,0.25")
    p.add_argument("--allowance", default="1GiB")
    p.add_argument("--skip-limits", action="store_true")
    p.add_argument("--cache", default=None, help="the converted-weights folder (default: a fresh one under the "
                                                 "bench cache, so the first start converts)")
    args = p.parse_args(argv)
    shape = prepare.cache_dir() / f"gemma4-26b-a4b-shape-L{args.layers}" / f"model-{args.format}.gguf"
    if not shape.exists():
        print(f"error: {shape} is missing: run bench/prepare.py --layers {args.layers} --formats {args.format}",
              file=sys.stderr)
        return 2
    cache = Path(args.cache) if args.cache else prepare.cache_dir() / "converted"
    models = {f"26B-A4B shape L{args.layers} {args.format}": shape, "embedded": prepare.embedded_gguf()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {THREADS} threads; "
          f"prompt {args.prompt} + {args.decode} tokens", flush=True)
    rows = table(models, args, cache)
    if not args.skip_limits:
        rows += [""] + limited(shape, args, cache)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
