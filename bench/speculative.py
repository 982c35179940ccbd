"""Speculative decoding: what it gains on copy-heavy text, and what a verify step costs on 26B-A4B.

    .venv/bin/python bench/speculative.py [--ks 3,5,8] [--new-tokens 160] [--layers 2] [--draft-layers 35] [--reps 3]

1. The embedded Gemma 3 270M (Q4_K_M GGUF), greedy, prompt lookup as the drafter, on a copy-heavy
   prompt (a paragraph, then the same paragraph asked for with the names changed): decode tok/s with
   and without speculation (median of --reps, the runs interleaved so each meets the same load), the
   acceptance rate (accepted / drafted) and tokens per target forward. The outputs are checked equal.
2. The random Gemma 4 26B-A4B shape (bench/prepare.py, --layers layers, its Q4_K_M GGUF when cached,
   else Q8_0): the time of one verify forward over k+1 positions (+ the output head over them) against
   one plain decode step, at a --context-token context. With a drafter that costs nothing (prompt
   lookup), a step drafting k tokens breaks even when it yields cost(k+1)/cost(1) tokens, i.e. when
   (cost ratio - 1) of its k drafts are accepted on average; the table gives that rate, and the
   per-token acceptance probability a at which 1 + a + ... + a^k equals the cost ratio. Random
   weights make a real acceptance rate meaningless here: only the cost is measured.
3. The random E2B shape (bench/prepare.py --shape e2b, --draft-layers layers) as the 26B-A4B shape's draft
   model: a draft round's cost beside the verify step's, the speed-up at assumed acceptance rates, and an
   end-to-end check of greedy tokens (bench/speculative_draft.py).

Writes bench/SPECULATIVE.md (or --results) and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PARAGRAPH = (
    "Maria Lopez opened the bakery on Elm Street at six every morning. Her brother Tomas carried the flour "
    "sacks in from the van while Maria lit the ovens. By seven, Maria had set out the rye loaves and Tomas had "
    "written the prices on the chalkboard. Their neighbour, Henrik Berg, always came in first and bought two "
    "cinnamon rolls, one for himself and one for his wife, Ingrid Berg. Maria wrapped them in brown paper, "
    "Tomas counted the change, and Henrik told them the news from the harbour before walking home to Ingrid."
)
PROMPT = (f"{PARAGRAPH}\n\nRepeat the paragraph above word for word, but with Maria renamed Sofia, Tomas renamed "
          "Pedro, Henrik renamed Lars and Ingrid renamed Astrid.\n\nSofia Lopez opened the bakery")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _median(xs):
    return statistics.median(xs)


# ---- 1. the embedded model with prompt lookup ------------------------------------------------------
def _timed(model, ids, new_tokens, k):
    """(decode seconds after the first token, completion) of one greedy run."""
    stream = model.generate(ids, max_tokens=new_tokens + 1, temperature=0, ignore_eos=True, stream=True,
                            speculative=k)
    next(stream)  # prefill and the first token
    t = time.perf_counter()
    out = [s.token_id for s in stream]
    return time.perf_counter() - t, out


def embedded_section(args) -> str:
    import gemma4
    from gemma4.engine import Engine, Request
    from gemma4.sampling import SamplingParams
    from gemma4.speculative import PromptLookup
    from gemma4.store import embedded_path

    model = gemma4.load(embedded_path(), progress=False)
    ids = model.tokenizer.encode(PROMPT)
    log(f"embedded model: prompt {len(ids)} tokens, {args.new_tokens} new tokens, k in {args.ks}")
    ks = [0] + args.ks
    _timed(model, ids, 8, 0)  # warm-up (kernels, allocator)
    times = {k: [] for k in ks}
    outputs = {}
    for _ in range(args.reps):
        for k in ks:
            dt, out = _timed(model, ids, args.new_tokens, k)
            times[k].append(dt)
            outputs[k] = out
    rows = ["| drafting | decode tok/s | speed-up | acceptance (accepted / drafted) | tokens per target forward |"
            " same tokens |", "|---|---|---|---|---|---|"]
    base = args.new_tokens / _median(times[0])
    for k in ks:
        rate = args.new_tokens / _median(times[k])
        if k == 0:
            rows.append(f"| none | {rate:.1f} | 1.00 | — | 1.00 | — |")
            continue
        engine = Engine(model, max_batch=1, speculative=k, drafter=PromptLookup())
        request = Request(ids, SamplingParams(max_tokens=args.new_tokens + 1, temperature=0, ignore_eos=True))
        last = [out for _, out in engine.generate([request])][-1]
        forwards = engine.stats.decode_steps  # verify steps
        accepted, drafted = last.accepted_tokens, last.drafted_tokens
        rows.append(f"| prompt lookup, K={k} | {rate:.1f} | {rate / base:.2f} | "
                    f"{accepted / max(1, drafted):.0%} ({accepted} / {drafted}) | "
                    f"{args.new_tokens / max(1, forwards):.2f} | {'yes' if outputs[k] == outputs[0] else '**no**'} |")
    text = model.tokenizer.decode(outputs[0])
    return "\n".join([
        f"Gemma 3 270M Q4_K_M (embedded), greedy, {torch.get_num_threads()} threads; prompt of {len(ids)} tokens "
        f"(a paragraph, then the request to repeat it with the names changed), {args.new_tokens} new tokens; "
        f"decode time after the first token, median of {args.reps}, runs interleaved. Drafter: prompt lookup "
        f"(n-grams of 4 down to 1 over the prompt and output).", "", *rows, "",
        f"Output without speculation: {text[:300]!r}…"])


# ---- 2. a verify step on the 26B-A4B shape ---------------------------------------------------------
def _shape_path(args) -> tuple[Path, str]:
    import prepare

    folder = prepare.cache_dir() / prepare.shape_name(args.layers, False)
    for fmt in ("Q4_K_M", "Q8_0"):
        if (folder / f"model-{fmt}.gguf").is_file():
            return folder / f"model-{fmt}.gguf", fmt
    shape = prepare.shape_model(args.layers, formats=("Q8_0",))
    return shape.gguf["Q8_0"], "Q8_0"


def _break_even_alpha(ratio: float, k: int) -> float | None:
    """a with 1 + a + ... + a^k = ratio (bisection); None when even a = 1 does not reach it."""
    if ratio >= k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(k + 1)) < ratio:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def real_assistant(dtype: torch.dtype):
    """A random assistant in the shape of the 26B-A4B's (4 layers: 3 sliding + 1 full, width 1024, MLP 8192,
    16 query heads over the target's KV, a full-vocabulary head tied to its own 262144 x 1024 table)."""
    from gemma4.config.assistant import AssistantConfig
    from gemma4.model.assistant import Assistant

    text = dict(model_type="gemma4_text", vocab_size=262144, hidden_size=1024, intermediate_size=8192,
                num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
                hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, final_logit_softcapping=None,
                max_position_embeddings=262144, tie_word_embeddings=True, hidden_size_per_layer_input=0,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                    "rope_theta": 1e6}})
    config = AssistantConfig.from_hf(dict(model_type="gemma4_assistant", backbone_hidden_size=2816,
                                          text_config=text))
    torch.manual_seed(0)
    model = Assistant(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval()


@torch.inference_mode()
def shape_section(args) -> str:
    import gemma4
    from gemma4.engine import prefill

    path, fmt = _shape_path(args)
    log(f"26B-A4B shape: {path}")
    model = gemma4.load(path, progress=False)
    decoder = model.decoder
    ctx = args.context_tokens
    kmax = max(args.ks)
    cache = decoder.new_cache(capacity=ctx + kmax + 2, tail=kmax)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefill(decoder, cache, torch.randint(3, vocab, (1, ctx), generator=g), torch.arange(ctx)[None])

    def step(n: int) -> float:
        ids = torch.randint(3, vocab, (1, n), generator=g)
        t = time.perf_counter()
        decoder.logits(decoder(ids, torch.arange(ctx, ctx + n)[None], cache)[0])
        dt = time.perf_counter() - t
        cache.truncate(0, ctx)
        return dt

    from gemma4.speculative import AssistantDrafter
    from gemma4.speculative import DraftContext

    drafter = AssistantDrafter(real_assistant(decoder.dtype), decoder)
    hidden = decoder(torch.tensor([[5]]), torch.tensor([[ctx - 1]]), cache)[0, -1]  # (rewrites position ctx-1)
    draft_ctx = DraftContext(tokens=[5, 7], position=ctx, hidden=hidden, decoder=decoder, cache=cache, row=0)

    def draft(k: int) -> float:
        t = time.perf_counter()
        drafter.propose(draft_ctx, k)
        return time.perf_counter() - t

    widths = [1] + [k + 1 for k in args.ks]
    for n in widths:
        step(n)  # warm-up
    draft(1)
    times = {n: [] for n in widths}
    drafts = {k: [] for k in args.ks}
    for _ in range(args.reps * 3):
        for n in widths:
            times[n].append(step(n))
    for _ in range(args.reps):
        for k in args.ks:
            drafts[k].append(draft(k))
    one = _median(times[1])
    rows = ["| k drafted | verify forward (k+1 positions) ms | × a decode step | break-even: accepted per step "
            "| as acceptance rate | per-token acceptance a |", "|---|---|---|---|---|---|"]
    rows.append(f"| 0 (plain decode) | {one * 1e3:.1f} | 1.00 | — | — | — |")
    for k in args.ks:
        t = _median(times[k + 1])
        ratio = t / one
        alpha = _break_even_alpha(ratio, k)
        rows.append(f"| {k} | {t * 1e3:.1f} | {ratio:.2f} | {ratio - 1:.2f} | {(ratio - 1) / k:.0%} | "
                    f"{'never' if alpha is None else f'{alpha:.2f}'} |")
    real = args.layers / 30  # the target measured here has `layers` of the real 30; the assistant is whole
    arows = ["| k drafted | the assistant's k drafts ms | + verify, × a decode step | × at 30 layers "
             "| per-token acceptance a to break even (30 layers) |", "|---|---|---|---|---|"]
    for k in args.ks:
        d, v = _median(drafts[k]), _median(times[k + 1])
        ratio = (d + v) / one
        ratio30 = (d + v / real) / (one / real)
        alpha = _break_even_alpha(ratio30, k)
        arows.append(f"| {k} | {d * 1e3:.1f} | {ratio:.2f} | {ratio30:.2f} | "
                     f"{'never' if alpha is None else f'{alpha:.2f}'} |")
    rows += ["", "With the Gemma 4 assistant drafting (a random assistant of the 26B-A4B's assistant shape: 4 "
             "layers, width 1024, a 262144-token head; its cost does not scale with the target's depth, so the "
             "30-layer column scales only the target's part):", "", *arows]
    return "\n".join([
        f"Random Gemma 4 26B-A4B shape, {args.layers} layers ({fmt} GGUF, weights as loaded by gemma4), "
        f"context {ctx} tokens, {torch.get_num_threads()} threads; one forward + output head, median of "
        f"{args.reps * 3}. A drafter that costs nothing (prompt lookup) is assumed: with a draft model or the "
        "assistant, add its k draft steps to the cost. Random weights make any acceptance rate measured here "
        "meaningless, so only the cost is measured; the break-even columns say what acceptance a real "
        "model and drafter must reach. With 128 experts, top-8, the k+1 positions route to up to 8(k+1) "
        "different experts, so a verify step reads more expert weights than a decode step.", "", *rows])


def e2b_section(args) -> str:
    import speculative_draft

    return speculative_draft.section(args)


SECTIONS = {"embedded": ("The embedded model with prompt lookup", embedded_section),
            "shape": ("One verify step on the 26B-A4B shape", shape_section),
            "e2b": ("The E2B drafting for the 26B-A4B shape (`--draft-model`)", e2b_section)}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description="speculative decoding: gain on copy-heavy text, cost of a verify step")
    ap.add_argument("--parts", default="embedded,shape,e2b", help="embedded,shape,e2b")
    ap.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",") if x], default=[3, 5, 8],
                    help="draft lengths K to measure (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--layers", type=int, default=2, help="layers of the 26B-A4B shape (default 2: sliding + full)")
    ap.add_argument("--draft-layers", type=int, default=35, help="layers of the E2B shape (default 35: the real E2B)")
    ap.add_argument("--context-tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(HERE / "SPECULATIVE.md"))
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in SECTIONS]
    if bad or not args.ks or min(args.ks) < 1 or args.new_tokens < 128 or args.reps < 1:
        ap.error("--parts: embedded,shape,e2b; --ks positive; --new-tokens at least 128; --reps at least 1")
    torch.set_num_threads(args.threads)
    out = ["# gemma4 speculative decoding", "",
           "Generated by `bench/speculative.py` (part of `make bench`). One run on a shared machine: compare the "
           f"ratios, taken in the same run, more than absolute figures. {time.strftime('%Y-%m-%d %H:%M')}, load "
           f"average {', '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}.", ""]
    for p in parts:
        title, section = SECTIONS[p]
        out += [f"## {title}", "", section(args), ""]
    text = "\n".join(out)
    Path(args.results).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
