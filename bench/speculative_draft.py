"""The E2B as the 26B-A4B's draft model (`--draft-model`, the same tokenizer): what a round costs.

A part of bench/speculative.py (--parts e2b). Both random-weight shape files come from bench/prepare.py (the
26B-A4B shape with --layers layers, the E2B shape with --draft-layers, each as Q4_K_M when cached, else Q8_0),
both on the embedded model's 262144-token vocabulary, so the draft model is accepted as one (the check
--draft-model makes, drafters.check_vocabulary).

Measured in one run, at a --context-tokens context: the target's plain decode step and its verify forward
over k+1 positions, each split into the body (the layers) and the output head, and the E2B's draft round
for k tokens as gemma4's DraftModel runs it in steady state (the verified tail fed, then k - 1 single
steps, each with the E2B's full-vocabulary head). The real 26B-A4B has 30 layers: its step is taken as
head + body x 30 / layers. Random weights make acceptance meaningless, so the speed-up is given at assumed
per-token acceptance rates a (a draft accepted with probability a when the ones before it were): a round
yields (1 - a^(k+1)) / (1 - a) tokens for the cost of the draft round plus the verify step.
Then an end-to-end check: greedy generation with the E2B drafting gives the target's own tokens.
"""

from __future__ import annotations

import statistics
import time

import torch

REAL_TARGET_LAYERS = 30
ASSUMED_ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9)


def _path(layers: int, shape: str):
    import prepare

    folder = prepare.cache_dir() / prepare.shape_name(layers, False, shape)
    for fmt in ("Q4_K_M", "Q8_0"):
        if (folder / f"model-{fmt}.gguf").is_file():
            return folder / f"model-{fmt}.gguf", fmt
    fmt = "Q4_K_M" if prepare.ensure_llama_cpp(install=False) is not None else "Q8_0"
    model = prepare.shape_model(layers, formats=(fmt,), shape=shape)
    return model.gguf[fmt], fmt


def tokens_per_round(a: float, k: int) -> float:
    """Expected tokens a round yields: the accepted drafts plus the target's own token."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def speed_up(a: float, k: int, draft: float, verify: float, step: float) -> float:
    """Tokens per second with drafting over tokens per second without: a round's tokens per its cost."""
    return tokens_per_round(a, k) * step / (draft + verify)


def _break_even(k: int, draft: float, verify: float, step: float) -> float | None:
    """The acceptance a at which drafting breaks even (bisection); None when even a = 1 does not."""
    if speed_up(1.0, k, draft, verify, step) < 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speed_up(mid, k, draft, verify, step) < 1 else (lo, mid)
    return (lo + hi) / 2


@torch.inference_mode()
def section(args) -> str:
    import gemma4
    from gemma4.engine import prefill
    from gemma4.speculative import DraftContext, drafter_for
    from prepare import log

    target_path, tfmt = _path(args.layers, "26b-a4b")
    draft_path, dfmt = _path(args.draft_layers, "e2b")
    log(f"target {target_path}, draft {draft_path}")
    target = gemma4.load(target_path, progress=False)
    drafter = drafter_for(draft_path, target)  # what --draft-model makes (checks the vocabulary)
    draft_cfg = drafter.decoder.config
    decoder, ctx, kmax = target.decoder, args.context_tokens, max(args.ks)
    g = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    prompt = torch.randint(3, vocab, (1, ctx), generator=g)
    cache = decoder.new_cache(capacity=ctx + kmax + 2, tail=kmax)
    prefill(decoder, cache, prompt, torch.arange(ctx)[None])

    def verify(n: int) -> tuple[float, float]:
        """(body, head) seconds of one target forward over n positions."""
        ids = torch.randint(3, vocab, (1, n), generator=g)
        t = time.perf_counter()
        hidden = decoder(ids, torch.arange(ctx, ctx + n)[None], cache)[0]
        t1 = time.perf_counter()
        decoder.logits(hidden)
        t2 = time.perf_counter()
        cache.truncate(0, ctx)
        return t1 - t, t2 - t1

    tokens = prompt[0].tolist()

    def draft(k: int) -> float:
        """One steady-state draft round: the target kept every draft of the round before and added its own
        token (a rejection instead would feed the E2B one token, not two: the same cost within a step)."""
        nonlocal tokens
        dctx = DraftContext(tokens=tokens, position=len(tokens) - 1, hidden=None, decoder=decoder, cache=cache, row=0)
        t = time.perf_counter()
        drafts, _ = drafter.propose(dctx, k)
        dt = time.perf_counter() - t
        tokens = tokens + drafts + [int(torch.randint(3, vocab, (1,), generator=g))]
        return dt

    widths = [1] + [k + 1 for k in args.ks]
    for n in widths:
        verify(n)  # warm-up
    draft(1)  # the draft model's prefill of the context
    for k in args.ks:
        draft(k)
    body = {n: [] for n in widths}
    head = {n: [] for n in widths}
    drafts = {k: [] for k in args.ks}
    for _ in range(args.reps * 3):
        for n in widths:
            b, h = verify(n)
            body[n].append(b)
            head[n].append(h)
        for k in args.ks:
            drafts[k].append(draft(k))

    scale = REAL_TARGET_LAYERS / args.layers

    def cost(n: int, layers_scale: float = 1.0) -> float:
        return statistics.median(head[n]) + statistics.median(body[n]) * layers_scale

    one, one30 = cost(1), cost(1, scale)
    rows = ["| k drafted | E2B draft round ms | target verify (k+1) ms | round, × a decode step | "
            "round at 30 layers, × | break-even a (30 layers) |", "|---|---|---|---|---|---|",
            f"| 0 (plain decode) | — | {one * 1e3:.1f} (body {statistics.median(body[1]) * 1e3:.1f} + head "
            f"{statistics.median(head[1]) * 1e3:.1f}) | 1.00 | 1.00 | — |"]
    speed_rows = ["| k | " + " | ".join(f"a = {a}" for a in ASSUMED_ACCEPTANCE) + " |",
                  "|---|" + "---|" * len(ASSUMED_ACCEPTANCE)]
    for k in args.ks:
        d, v, v30 = statistics.median(drafts[k]), cost(k + 1), cost(k + 1, scale)
        be = _break_even(k, d, v30, one30)
        rows.append(f"| {k} | {d * 1e3:.1f} | {v * 1e3:.1f} | {(d + v) / one:.2f} | {(d + v30) / one30:.2f} | "
                    f"{'never' if be is None else f'{be:.2f}'} |")
        speed_rows.append(f"| {k} | " + " | ".join(f"{speed_up(a, k, d, v30, one30):.2f}"
                                                   for a in ASSUMED_ACCEPTANCE) + " |")
    step_draft = statistics.median(drafts[args.ks[0]]) / args.ks[0]

    # End to end: greedy tokens with the E2B drafting are the target's own (random weights: drafts are
    # mostly rejected, which the check covers as well as acceptance)
    ids = target.tokenizer.encode("Sofia Lopez opened the bakery")
    want = target.generate(ids, max_tokens=24, temperature=0, ignore_eos=True)
    got = target.generate(ids, max_tokens=24, temperature=0, ignore_eos=True, speculative=4, drafter=drafter)
    same = got.token_ids == want.token_ids
    log(f"end to end: same tokens {same}, drafted {got.drafted_tokens}, accepted {got.accepted_tokens}")
    shared = draft_cfg.num_kv_shared_layers
    return "\n".join([
        f"Target: random Gemma 4 26B-A4B shape, {args.layers} layers ({tfmt} GGUF). Draft model: random Gemma 4 "
        f"E2B shape, {draft_cfg.num_hidden_layers} layers ({dfmt} GGUF: width {draft_cfg.hidden_size}, "
        f"per-layer embeddings {draft_cfg.hidden_size_per_layer_input} per layer, the last {shared} layers "
        f"KV-shared with a {2 * draft_cfg.intermediate_size}-wide MLP), loaded as `--draft-model` loads it; both "
        f"on the same 262144-token vocabulary (the draft-model check passes). Context {ctx} tokens, "
        f"{torch.get_num_threads()} threads, median of {args.reps * 3}, runs interleaved. A draft round: the "
        f"E2B's k greedy steps in steady state (about {step_draft * 1e3:.1f} ms a token at k = {args.ks[0]}). "
        f"The 30-layer columns take the target as output head + layers x {REAL_TARGET_LAYERS}/{args.layers} "
        "(the E2B is measured whole).", "", *rows, "",
        "Speed-up (tokens per second with drafting over without) at 30 target layers, at an assumed per-token "
        "acceptance a (random weights make a measured one meaningless): a round yields (1 - a^(k+1)) / (1 - a) "
        "tokens for the cost of the draft round plus the verify step.", "", *speed_rows, "",
        f"One E2B draft token costs {step_draft / one30:.2f} of a 30-layer target decode step: drafting pays only "
        "where the acceptance passes the break-even column, and each draft's cost is of the same order as the "
        "verify step it saves.", "",
        f"End to end (`--draft-model` path, drafters.drafter_for): 24 greedy tokens with the E2B drafting, K = 4: "
        f"{'the same as without drafting' if same else '**different from those without drafting**'} "
        f"({got.drafted_tokens} drafted, {got.accepted_tokens} accepted: random weights agree by chance only)."])
