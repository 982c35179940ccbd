"""A scripted Gemma 4: a tiny model whose logits are replaced so that it thinks and answers a given text,
reacting to what it was made to say (as a real model answers after a thought the engine closed early)."""

import torch

from gemma4.chat import CHANNEL_CLOSE, CHANNEL_OPEN

HEADER = "thought\n"  # what the model writes after opening its thought channel


class Thinker:
    """Replaces model.decoder.logits: the model opens a thought channel, thinks `thought`, closes it and
    answers `answer`, then ends its turn. It reads the sequence being generated (`outputs()`: its output
    ids so far, one sequence at a time), so once the channel is closed, by the model or by the engine,
    the answer comes next."""

    def __init__(self, model, thought: str, answer: str, outputs):
        tok = model.tokenizer
        self.close = tok.token_to_id(CHANNEL_CLOSE)
        self.thought_ids = [tok.token_to_id(CHANNEL_OPEN)] + tok.encode(HEADER + thought + "\n",
                                                                        add_special_tokens=False) + [self.close]
        self.answer_ids = tok.encode(answer, add_special_tokens=False) + [tok.token_to_id("<turn|>")]
        self.outputs = outputs
        self.real = model.decoder.logits

    def next_token(self) -> int:
        out = list(self.outputs())
        if self.close in out:
            script, i = self.answer_ids, len(out) - out.index(self.close) - 1
        else:
            script, i = self.thought_ids, len(out)
        return script[min(i, len(script) - 1)]

    def __call__(self, hidden):
        logits = self.real(hidden)
        forced = torch.full_like(logits, -1e4)
        forced[..., self.next_token()] = 0.0
        return forced


def running_output(engine):
    """outputs() for a Thinker on an engine of one row: the output ids of the sequence it runs."""
    return lambda: engine.scheduler.running[0].seq.output_ids if engine.scheduler.running else []


def thought_cut(model, thought: str, budget: int) -> str:
    """The reasoning a budget of `budget` tokens leaves of `thought` (the header counts; the engine's
    forced close adds the newline the template writes before it)."""
    ids = model.tokenizer.encode(HEADER + thought + "\n", add_special_tokens=False)
    text = model.tokenizer.decode(ids[:budget])
    assert text.startswith(HEADER), "a budget this small does not reach past the header"
    return text[len(HEADER):] + "\n"
