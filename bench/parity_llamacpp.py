"""Agreement with llama.cpp on the embedded Gemma 3 270M GGUF: tokens, greedy runs, logits.

    .venv/bin/python bench/parity_llamacpp.py      (or `make parity`, which also runs the pytest checks)

llama.cpp multiplies quantized weights with 8-bit-quantized activations, so its logits are not those
of the dequantized model we (and transformers) compute; "the same tokens" therefore means: identical
token ids, high teacher-forced agreement with small KL divergence, and greedy runs that part only
where llama.cpp's own top two logits are nearly tied. Prints a report and returns it as a dict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
CHAT_PROMPTS = [
    "Name three colours of the rainbow.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.",
    "Give me a tip for learning to cook.",
    "Translate 'good morning' into Spanish.",
]
GREEDY_TOKENS = 32
NEAR_TIE = 0.25  # llama.cpp top-two logit margin under which its activation rounding can flip the argmax


def gemma3_turn(question: str) -> str:
    return f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"


def _llama(path: Path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=2048, n_threads=2, logits_all=True, verbose=False, seed=0)


def _llama_greedy(llm, prompt_ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    llm.reset()
    llm.eval(prompt_ids)
    out, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tok = int(row.argmax())
        out.append(tok)
        logits.append(row)
        llm.eval([tok])
    return out, logits


def _margin(row: np.ndarray) -> float:
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])


def compare_greedy(model, llm) -> list[dict]:
    rows = []
    for q in CHAT_PROMPTS:
        text = gemma3_turn(q)
        ours_ids = model.tokenizer.encode(text)
        llama_ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        theirs, their_logits = _llama_greedy(llm, llama_ids, GREEDY_TOKENS)
        mine = model.generate(ours_ids, max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True).token_ids
        parted = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        row = {"prompt": q, "ids_equal": ours_ids == llama_ids, "same_tokens": parted is None,
               "parted_at": parted, "text": model.tokenizer.decode(mine)}
        if parted is not None:
            ours_logits = model.forward(ours_ids + theirs[:parted + 1])[len(ours_ids) + parted - 1]
            lrow = their_logits[parted]
            row.update(llama_margin=_margin(lrow), ours_margin=float(ours_logits.topk(2).values.diff().abs()),
                       llama_pick=(theirs[parted], float(lrow[theirs[parted]]), float(lrow[mine[parted]])),
                       ours_pick=(mine[parted], float(ours_logits[mine[parted]]), float(ours_logits[theirs[parted]])))
        rows.append(row)
    return rows


def teacher_forced(model, llm, text: str) -> dict:
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)], dtype=np.float32))
    ours = model.forward(ids)
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    # KL(llama || ours) over llama's top-40 tokens, renormalised on both sides
    top = theirs.topk(40, dim=-1).indices
    p = torch.softmax(theirs.gather(-1, top), -1)
    q = torch.log_softmax(ours.gather(-1, top), -1)
    kl = (p * (p.log() - q)).sum(-1).mean().item()
    return {"tokens": len(ids), "top1_agreement": agree, "mean_kl_top40": kl}


def main() -> dict:
    import gemma4
    from gemma4.store import embedded_path

    path = embedded_path()
    model = gemma4.load(path)
    llm = _llama(path)
    greedy = compare_greedy(model, llm)
    text = (HERE / "data" / "english.txt").read_text()
    tf = teacher_forced(model, llm, text)
    report = {"greedy": greedy, "teacher_forced": tf}
    for r in greedy:
        status = "same 32 tokens" if r["same_tokens"] else (
            f"parted at token {r['parted_at']}: llama.cpp top-2 margin {r['llama_margin']:.3f}, "
            f"ours {r['ours_margin']:.3f}")
        print(f"{r['prompt']!r:55} ids {'=' if r['ids_equal'] else '!='}  {status}")
    print(f"teacher-forced over {tf['tokens']} tokens: top-1 agreement {tf['top1_agreement']:.1%}, "
          f"mean KL {tf['mean_kl_top40']:.4f}")
    return report


if __name__ == "__main__":
    report = main()
    if "--json" in sys.argv:
        print(json.dumps(report, indent=1))
