"""Time to first token of a second question on a long document through the Python API, against the first.

The embedded model (Gemma 3 270M Q4_K_M); a generated document of about --tokens tokens, then two different
questions, each `model.generate(doc + question)` on one Model: the second resumes from the prefix store the
first filled (Completion.cached_tokens) and prefills only what follows the document's last grid point.

    python -m bench.api_prefix_reuse [--tokens 4096] [--new-tokens 16]

Prints the two times to first token, the whole calls' times, the tokens reused, and whether the second
answer equals a fresh model's.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

WORDS = ("the river valley north market stone bridge harvest winter council merchant road village tower "
         "letter archive ledger grain salt copper ship harbour storm lantern mill orchard shepherd road "
         "school bell festival treaty border captain garden weaver clock well forest").split()


def document(tokenizer, tokens: int, seed: int = 0) -> str:
    """Plain sentences, deterministic, of about `tokens` tokens."""
    rng = random.Random(seed)
    sentences = []
    while True:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
        if len(sentences) % 20 == 0 and len(tokenizer.encode(" ".join(sentences))) >= tokens:
            return " ".join(sentences)


def first_token(model, prompt: str, new_tokens: int) -> tuple[float, float, object]:
    """(seconds to the first token, seconds of the whole call, the text) of one greedy streamed call."""
    t0 = time.perf_counter()
    stream = model.generate(prompt, max_tokens=new_tokens, temperature=0, ignore_eos=True, stream=True)
    first = next(stream)
    ttft = time.perf_counter() - t0
    text = first.text + "".join(s.text for s in stream)
    return ttft, time.perf_counter() - t0, text


def main(argv: list[str] | None = None) -> None:
    import gemma4

    p = argparse.ArgumentParser(prog="bench.api_prefix_reuse")
    p.add_argument("--tokens", type=int, default=4096, help="document length in tokens (about)")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = gemma4.load(progress=False)
    doc = document(model.tokenizer, args.tokens)
    q1 = "\n\nQuestion: which words come up most often above? Answer:"
    q2 = "\n\nQuestion: summarise the document in one sentence. Answer:"
    model.generate("warm up", max_tokens=2, temperature=0)
    ttft1, all1, _ = first_token(model, doc + q1, args.new_tokens)
    ttft2, all2, text2 = first_token(model, doc + q2, args.new_tokens)
    cached = model.generate(doc + q2, max_tokens=1, temperature=0).cached_tokens
    fresh = gemma4.load(progress=False).generate(doc + q2, max_tokens=args.new_tokens, temperature=0,
                                                   ignore_eos=True).text
    n = len(model.tokenizer.encode(doc + q2))
    print(f"Python API, embedded model, {torch.get_num_threads()} threads, prompt {n} tokens, "
          f"{args.new_tokens} new tokens, greedy")
    print(f"first generate:  time to first token {ttft1:.2f} s, whole call {all1:.2f} s")
    print(f"second generate: time to first token {ttft2:.3f} s, whole call {all2:.2f} s "
          f"({cached} prompt tokens reused) -> TTFT {ttft1 / ttft2:.0f}x faster")
    print(f"second answer equals a fresh model's: {'yes' if text2 == fresh else 'NO'}")


if __name__ == "__main__":
    main()
