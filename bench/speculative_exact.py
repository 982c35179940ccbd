"""Greedy speculation against plain greedy: the same tokens, on the embedded model and the prepared
26B-A4B-shape Q8_0 file (bench/prepare.py --formats Q8_0), for a copy-heavy prompt, a repeated sentence
and a plain one; prompt lookup (k = 4, 5) and, on the shape file, the embedded model as the draft model
(the same vocabulary). Prints one line per case; exits 1 if any departs.

    python bench/speculative_exact.py [--layers 2] [--tokens 120]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import prepare  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="layers of the prepared 26B-A4B-shape file")
    ap.add_argument("--tokens", type=int, default=120, help="tokens generated on the embedded model (a third on the shape)")
    args = ap.parse_args()

    import gemma4
    from gemma4.speculative import DraftModel
    from gemma4.store import embedded_path

    doc = (HERE / "data" / "english.txt").read_text()[:3000]
    prompts = {"copy": doc + "\n\nRepeat the text above word for word:\n\n",
               "repeat": "The quick brown fox jumps over the lazy dog. " * 20,
               "plain": "Write a short story about a lighthouse keeper who finds a message in a bottle."}
    embedded = gemma4.load(embedded_path(), progress=False)
    models = [("embedded", embedded, args.tokens)]
    shape = prepare.cache_dir() / prepare.shape_name(args.layers, tiny=False) / "model-Q8_0.gguf"
    if shape.exists():
        models.append((f"26B-A4B shape Q8_0 L{args.layers}", gemma4.load(shape, progress=False), args.tokens // 3))
    else:
        print(f"{shape} is missing (bench/prepare.py --layers {args.layers} --formats Q8_0): embedded model only")
    departed = 0
    for name, model, n in models:
        for pname, prompt in prompts.items():
            plain = model.generate(prompt, max_tokens=n, temperature=0).token_ids
            runs = {"lookup k=5": dict(speculative=5), "lookup k=4": dict(speculative=4)}
            if model is not embedded:
                runs["draft model (embedded) k=4"] = dict(speculative=4, drafter=DraftModel(embedded, model))
            for rname, kw in runs.items():
                got = model.generate(prompt, max_tokens=n, temperature=0, **kw)
                first = next((i for i, (a, b) in enumerate(zip(got.token_ids, plain)) if a != b), None)
                same = got.token_ids == plain
                departed += not same
                print(f"{name} | {pname} | {rname}: {'identical' if same else f'departs at token {first}'} "
                      f"({len(plain)} tokens, drafted {got.drafted_tokens}, accepted {got.accepted_tokens})", flush=True)
    return 1 if departed else 0


if __name__ == "__main__":
    sys.exit(main())
