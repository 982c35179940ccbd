"""`make bench`: gemma4's speed against its peers, in one run, on this machine.

    .venv/bin/python bench/run.py [--models embedded,shape] [--layers 6] [--reps 3] [--skip-peers] ...

Prepares what it needs first (bench/prepare.py: cached), then measures, each in its own process
(bench/measure.py):
- read bandwidth (sum of a large float32 tensor, the benchmark's thread count, median);
- for the embedded Gemma 3 270M (Q4_K_M GGUF) and the random 26B-A4B-shape model (Q4_K_M and Q8_0
  GGUF, bf16 safetensors): prefill tok/s of a 512-token prompt and decode tok/s over 128 tokens, for
  gemma4 and, on the same file, llama.cpp (GGUF) or transformers (safetensors, bf16), each the median
  of the repetitions, the ratio gemma4/peer from this run, and decode's achieved GB/s of weights read
  (bytes read per token x tok/s) against the measured bandwidth;
- the embedded model's teacher-forced top-1 agreement and KL divergence from llama.cpp's logits.
Writes the table to bench/RESULTS.md (or --results) with the date and the machine, and prints it.

The report is a list of sections (SECTIONS), each a function of the shared Context returning its
Markdown; a new measurement (long-context memory, time to first token on a cached document) is one
more function appended there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import measure  # noqa: E402
import prepare  # noqa: E402
from gemma4.native import isa  # noqa: E402

TEXT = HERE / "data" / "english.txt"
PEERS = ("llama.cpp", "transformers")
SHAPE_FORMATS = ("Q4_K_M", "Q8_0", "bf16")
QUANTIZE_FOR = {"Q4_K_M": "int4", "Q8_0": "int8"}  # --quantize match


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Comparison:
    """gemma4 and one peer on the same file."""

    model: str
    label: str  # the file's format, e.g. "Q4_K_M GGUF"
    path: Path
    peer: str | None
    ids: list[int]
    weights: dict = field(default_factory=dict)  # measure.file_weights
    ours: dict = field(default_factory=dict)
    theirs: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class Context:
    args: argparse.Namespace
    machine: dict = field(default_factory=dict)
    bandwidth: dict = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    quality: dict = field(default_factory=dict)
    prepared: dict = field(default_factory=dict)  # preparation seconds per step, this run


# ---- workers ------------------------------------------------------------------------------------
def run_worker(spec: dict, timeout: float = 3600) -> dict:
    """bench/measure.py in a fresh process; its result, or {"error": one line} when it failed."""
    cmd = [sys.executable, str(HERE / "measure.py"), json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_worker_env(spec))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(measure.RESULT_MARK):
            return json.loads(line[len(measure.RESULT_MARK):])
    return {"error": _last_words(proc.stderr + proc.stdout, proc.returncode)}


def _worker_env(spec: dict) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 2)), TOKENIZERS_PARALLELISM="false")


def _expect(proc: subprocess.Popen, err, mark: str):
    """The JSON after `mark` on the worker's next marked line, or {"error": its last words} if it ended."""
    for line in proc.stdout:
        if line.startswith(mark):
            return json.loads(line[len(mark):])
    proc.wait()
    err.seek(0)
    return {"error": _last_words(err.read(), proc.returncode)}


def _last_words(text: str, status: int) -> str:
    """The line of a failed worker's output that says why: an error or assertion if there is one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    said = [ln for ln in lines if any(w in ln for w in ("Error", "error", "ASSERT", "needs"))]
    return (said or lines or [f"exit status {status}"])[-1][:300]


def run_interleaved(specs: list[dict], reps: int) -> list[dict]:
    """Speed workers for the same file, loaded one after the other, then timed in turn, repetition by
    repetition: each engine meets the same background load, so the ratio of their medians is fair
    even on a busy machine. Returns per spec its facts plus prefill_s / decode_s, or {"error": ...}."""
    procs, results = [], []
    try:
        for spec in specs:
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen([sys.executable, str(HERE / "measure.py"), json.dumps(spec)], text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=_worker_env(spec))
            procs.append((proc, err))
            results.append(_expect(proc, err, measure.READY_MARK))
            if "error" not in results[-1]:
                results[-1].update(prefill_s=[], decode_s=[])
        for _ in range(reps):
            for (proc, err), result in zip(procs, results):
                if "error" in result:
                    continue
                proc.stdin.write("run\n")
                proc.stdin.flush()
                got = _expect(proc, err, measure.RESULT_MARK)
                if isinstance(got, dict):
                    result.clear()
                    result.update(got)
                else:
                    result["prefill_s"].append(got[0])
                    result["decode_s"].append(got[1])
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            err.close()
    return results


def tok_per_s(tokens: int, seconds: list[float]) -> float:
    return statistics.median(tokens / s for s in seconds)


# ---- what to measure ----------------------------------------------------------------------------
def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n ids of bench/data/english.txt (repeated if it is shorter), BOS first."""
    text = TEXT.read_text()
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids += tokenizer.encode(text, add_special_tokens=False)
    return ids[:n]


def plan(ctx: Context) -> None:
    from gemma4.tokenizer import Tokenizer

    args = ctx.args
    cache = Path(args.cache) if args.cache else prepare.cache_dir()
    peers = set() if args.skip_peers else set(args.peers)
    if "llama.cpp" in peers:
        prepare.ensure_llama_cpp(install=not args.no_install)
    if "embedded" in args.models:
        tok = Tokenizer.from_gguf_metadata(prepare.tokenizer_metadata(cache))
        ids = prompt_ids(tok, args.prompt_tokens)
        ctx.comparisons.append(Comparison("Gemma 3 270M (embedded)", "Q4_K_M GGUF", prepare.embedded_gguf(),
                                          "llama.cpp" if "llama.cpp" in peers else None, ids))
    if "shape" in args.models:
        gguf_formats = [f for f in args.formats if f in prepare.FORMATS]
        if "Q4_K_M" in gguf_formats and prepare.ensure_llama_cpp(install=False) is None:
            log("Q4_K_M left out: it needs llama.cpp's quantiser (llama-cpp-python is not installed)")
            gguf_formats.remove("Q4_K_M")
        for layers in args.layers:
            shape = prepare.shape_model(layers, gguf_formats, tiny=args.tiny, cache=cache)
            ctx.prepared.update({f"{shape.name}: {step}": s for step, s in shape.seconds.items()})
            ids = prompt_ids(Tokenizer.from_file(shape.hf), args.prompt_tokens)
            what = "tiny test shape" if args.tiny else "Gemma 4 26B-A4B shape"
            name = f"{what}, {layers} layer{'s' if layers > 1 else ''} (random weights)"
            # llama.cpp (this version) asserts that a gemma4 model has a sliding-window layer
            llama_loads = "sliding_attention" in json.loads((shape.hf / "config.json").read_text())["layer_types"]
            for fmt in gguf_formats:
                c = Comparison(name, f"{fmt} GGUF", shape.gguf[fmt],
                               "llama.cpp" if "llama.cpp" in peers and llama_loads else None, ids)
                if "llama.cpp" in peers and not llama_loads:
                    c.note = ("llama.cpp not run: it refuses a gemma4 model without a sliding-window layer "
                              "(GGML_ASSERT is_swa_any); take at least 2 layers")
                ctx.comparisons.append(c)
            if "bf16" in args.formats:
                ctx.comparisons.append(Comparison(name, "bf16 safetensors", shape.hf,
                                                  "transformers" if "transformers" in peers else None, ids))


def _gemma4_spec(ctx: Context, c: Comparison) -> dict:
    q = ctx.args.quantize
    quantize = None if q == "none" else QUANTIZE_FOR.get(c.label.split()[0]) if q == "match" else q
    return {"path": str(c.path), "dtype": ctx.args.dtype, "quantize": quantize, "threads": ctx.args.threads}


# ---- sections -----------------------------------------------------------------------------------
def machine_section(ctx: Context) -> str:
    m = ctx.machine = machine_info()
    log("measuring read bandwidth")
    ctx.bandwidth = run_worker({"worker": "bandwidth", "threads": ctx.args.threads, "mib": ctx.args.bandwidth_mib})
    bw = ctx.bandwidth
    bw_line = (f"{bw['gb_per_s']:.1f} GB/s (sum of a {bw['mib']} MiB float32 tensor, {ctx.args.threads} threads, "
               f"median of {len(bw['runs'])}: {min(bw['runs']):.1f}-{max(bw['runs']):.1f})"
               if "error" not in bw else f"not measured ({bw['error']})")
    a = ctx.args
    return "\n".join([
        f"- date: {m['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM, {m['os']}",
        f"- ISA: {m['isa']}; gemma4's kernels: {m['kernels']}",
        f"- software: Python {m['python']}, torch {m['torch']}, llama-cpp-python {m['llama_cpp']}, "
        f"transformers {m['transformers']}",
        f"- read bandwidth: {bw_line}",
        f"- load average at the start (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in m['load'])} — other work on a "
        "shared machine slows every engine, not always equally",
        f"- settings: {a.threads} threads everywhere; prompt {a.prompt_tokens} tokens, decode {a.decode_tokens} "
        f"tokens (greedy); median of {a.reps}, gemma4 and its peer timed in turn, after one untimed warm-up "
        f"each; load time excluded; gemma4 dtype "
        f"`{a.dtype}`, quantize `{a.quantize}`",
    ])


def speed_section(ctx: Context) -> str:
    a = ctx.args
    for c in ctx.comparisons:
        log(f"{c.model} / {c.label}: file sizes")
        c.weights = measure.file_weights(c.path)
        common = {"ids": c.ids, "decode": a.decode_tokens, "threads": a.threads}
        specs = [{"worker": "gemma4", **common, **_gemma4_spec(ctx, c)}]
        if c.peer:
            specs.append({"worker": c.peer, "path": str(c.path), **common})
        log(f"{c.model} / {c.label}: {' and '.join(s['worker'] for s in specs)}, {a.reps} repetitions in turn")
        c.ours, *peer = run_interleaved(specs, a.reps)
        c.theirs = peer[0] if peer else {}
    return speed_table(ctx)


def _rates(r: dict, ctx: Context) -> tuple[float, float] | None:
    if not r or "error" in r:
        return None
    return tok_per_s(ctx.args.prompt_tokens, r["prefill_s"]), tok_per_s(ctx.args.decode_tokens, r["decode_s"])


def _gbs(active: int, decode: float, ctx: Context) -> str:
    gbs = active * decode / 1e9
    bw = ctx.bandwidth.get("gb_per_s")
    return f"{gbs:.1f} ({gbs / bw:.0%})" if bw else f"{gbs:.1f}"


def speed_table(ctx: Context) -> str:
    head = ("| model | file | peer | prefill tok/s gemma4 | peer | gemma4/peer | decode tok/s gemma4 | peer "
            "| gemma4/peer | decode GB/s gemma4 (of BW) | peer |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    notes = []
    for c in ctx.comparisons:
        ours, theirs = _rates(c.ours, ctx), _rates(c.theirs, ctx)
        cells = [c.model, c.label, c.peer or "—"]
        if ours and theirs:
            cells += [f"{ours[0]:.1f}", f"{theirs[0]:.1f}", f"**{ours[0] / theirs[0]:.2f}**",
                      f"{ours[1]:.2f}", f"{theirs[1]:.2f}", f"**{ours[1] / theirs[1]:.2f}**"]
        else:
            cells += [f"{ours[0]:.1f}" if ours else "—", f"{theirs[0]:.1f}" if theirs else "—", "—",
                      f"{ours[1]:.2f}" if ours else "—", f"{theirs[1]:.2f}" if theirs else "—", "—"]
        cells.append(_gbs(c.ours["resident_active_bytes"], ours[1], ctx) if ours else "—")
        cells.append(_gbs(c.weights["active_bytes"], theirs[1], ctx) if theirs else "—")
        rows.append("| " + " | ".join(cells) + " |")
        w = c.weights
        note = (f"- {c.model}, {c.label}: file {w['total_bytes'] / 1e9:.2f} GB, {_types(w['types'])}; a decoded "
                f"token reads {w['active_bytes'] / 1e6:.0f} MB of it")
        if ours:
            note += (f"; gemma4 (dtype {c.ours['dtype']}, quantize {c.ours['quantize']}) reads "
                     f"{c.ours['resident_active_bytes'] / 1e6:.0f} MB per token from memory, loaded in "
                     f"{c.ours['load_s']:.0f} s")
        if c.note:
            note += f"; {c.note}"
        for who, r in (("gemma4", c.ours), (c.peer, c.theirs)):
            if r and "error" in r:
                note += f"; {who} failed: {r['error']}"
            elif r:
                note += (f"; {who} runs prefill {_secs(r['prefill_s'])} s, decode {_secs(r['decode_s'])} s")
        notes.append(note)
    return "\n".join(rows + ["", *notes])


def _types(types: dict) -> str:
    return ", ".join(f"{n}×{k}" for k, n in sorted(types.items(), key=lambda kv: -kv[1]))


def _secs(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


def quality_section(ctx: Context) -> str:
    a = ctx.args
    if "embedded" not in a.models or a.skip_peers or "llama.cpp" not in a.peers:
        return "Not measured in this run (needs the embedded model and llama.cpp)."
    log("embedded model: teacher-forced agreement with llama.cpp")
    c = next(c for c in ctx.comparisons if c.path == prepare.embedded_gguf())
    q = ctx.quality = run_worker({"worker": "quality", "text": str(TEXT), **_gemma4_spec(ctx, c)})
    if "error" in q:
        return f"Failed: {q['error']}"
    return (f"The embedded model (Gemma 3 270M Q4_K_M), gemma4 (dtype {q['dtype']}, quantize {q['quantize']}) against "
            f"llama.cpp's logits on the same file, teacher-forced over bench/data/english.txt ({q['tokens']} tokens): "
            f"top-1 agreement **{q['top1_agreement']:.1%}**, mean KL divergence **{q['mean_kl_top40']:.4f}** "
            "(KL(llama.cpp ‖ gemma4) over llama.cpp's top-40 tokens, bench/parity_llamacpp.py). llama.cpp multiplies "
            "8-bit-rounded activations, so the exact dequantized model itself agrees at about 95% with KL about 0.004.")


def preparation_section(ctx: Context) -> str:
    if not ctx.prepared:
        return "All inputs were cached (see bench/prepare.py; delete the cache folder to time preparation)."
    return "\n".join(f"- {step}: {s:.0f} s" for step, s in ctx.prepared.items())


# (title, function): the report, in order. Add a section by appending a function of the Context.
SECTIONS: list[tuple[str, Callable[[Context], str]]] = [
    ("Machine", machine_section),
    ("Speed", speed_section),
    ("Quality of the embedded model against llama.cpp", quality_section),
    ("Preparation (this run)", preparation_section),
]


def machine_info() -> dict:
    import torch

    def version(mod: str) -> str:
        try:
            return __import__(mod).__version__
        except ImportError:
            return "not installed"

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        ram = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal:")).split()[1]) / (1 << 20)
    except (OSError, StopIteration):
        ram = 0.0
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu,
            "cores": os.cpu_count(), "ram_gib": ram, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__, "llama_cpp": version("llama_cpp"),
            "transformers": version("transformers"), "load": os.getloadavg(), "isa": isa.describe(),
            "kernels": isa.kernel_plan()}


def report(ctx: Context) -> str:
    parts = ["# gemma4 benchmark", "",
             "Generated by `make bench` (bench/run.py); re-run it to refresh. Figures from one run on a shared "
             "machine: compare the ratios, which come from the same run, more than the absolute numbers.", ""]
    for title, section in SECTIONS:
        t = time.perf_counter()
        body = section(ctx)
        log(f"section {title!r} done in {time.perf_counter() - t:.0f} s")
        parts += [f"## {title}", "", body, ""]
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="gemma4 against llama.cpp and transformers on this machine")
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--models", type=csv, default=["embedded", "shape"], help="embedded,shape")
    ap.add_argument("--layers", type=lambda v: [int(x) for x in csv(v)], default=[6],
                    help="layers of the 26B-A4B shape, one model per value (default 6: 5 sliding + 1 full)")
    ap.add_argument("--formats", type=csv, default=list(SHAPE_FORMATS), help="files of the shape: Q4_K_M,Q8_0,bf16")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", type=csv, default=list(PEERS), help="llama.cpp,transformers")
    ap.add_argument("--skip-peers", action="store_true", help="measure gemma4 alone")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="gemma4's dtype (auto: float32 when it fits in memory, else bfloat16)")
    ap.add_argument("--quantize", default="none", choices=["none", "int4", "int8", "match"],
                    help="gemma4.load(quantize=...); match: int4 for Q4_K_M files, int8 for Q8_0")
    ap.add_argument("--tiny", action="store_true", help="tiny widths for the shape model (smoke runs)")
    ap.add_argument("--cache", help="cache folder (default $GEMMA4_BENCH_CACHE or ~/.cache/gemma4-bench)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the bandwidth probe")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="where to write the report")
    ap.add_argument("--no-install", action="store_true", help="do not build llama-cpp-python when it is missing")
    args = ap.parse_args(argv)
    for name, allowed in (("models", ("embedded", "shape")), ("formats", SHAPE_FORMATS), ("peers", PEERS)):
        bad = [x for x in getattr(args, name) if x not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    if not args.layers or min(args.layers) < 1:
        ap.error("--layers: positive layer counts, comma-separated")
    if args.reps < 1 or args.prompt_tokens < measure.WARMUP_PROMPT or args.decode_tokens < 1:
        ap.error(f"--reps and --decode-tokens must be positive, --prompt-tokens at least {measure.WARMUP_PROMPT}")
    return args


def main(argv: list[str] | None = None) -> Context:
    ctx = Context(parse_args(argv))
    t = time.perf_counter()
    plan(ctx)
    text = report(ctx)
    Path(ctx.args.results).write_text(text)
    print(text)
    log(f"wrote {ctx.args.results} ({time.perf_counter() - t:.0f} s)")
    return ctx


if __name__ == "__main__":
    main()
