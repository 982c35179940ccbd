"""Ctrl-C in `gemma4 chat`: it stops the answer being written, not the session.

The REPL runs in this process; a KeyboardInterrupt is raised in the main thread while an answer streams, as
Python's SIGINT handler raises it there. It is raised at a fixed point (while a piece of the answer is printed):
a simulated signal (_thread.interrupt_main) is taken at whatever bytecode runs next, which may be a finalizer
that the collector runs just then, where CPython reports the exception and drops it.
"""

import builtins

import pytest

import gemma4
from gemma4 import cli
from gemma4.checkpoint import open_checkpoint
from gemma4.checkpoint.gguf_writer import write_gguf
from reference import build_gemma4, tiny_vocab_metadata


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupt")
    build_gemma4(d / "hf", "moe_kv", seed=2)
    return gemma4.load(write_gguf(open_checkpoint(d / "hf"), d / "tiny.gguf", "F32", tiny_vocab_metadata()))


def _repl(monkeypatch, model, lines, on_delta=None):
    """Runs `gemma4 chat` on `lines`; returns its exit status and the conversations the model saw."""
    seen = []
    real_chat = model.chat

    def chat(messages, **kw):
        seen.append([dict(m) for m in messages])
        return real_chat(messages, **kw)

    monkeypatch.setattr(model, "chat", chat)
    monkeypatch.setattr(cli, "_load", lambda args: model)
    feed = iter(lines)

    def fake_input(prompt=""):
        line = next(feed, None)
        if line is None:
            raise EOFError
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr(builtins, "input", fake_input)
    if on_delta is not None:
        real_print = cli._print_stream
        monkeypatch.setattr(cli, "_print_stream", lambda deltas: (real_print(deltas), on_delta()))
    args = cli.build_parser().parse_args(["chat", "--temperature", "0", "-n", "40"])
    return cli.cmd_chat(args), seen


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(monkeypatch, capsys, tiny_model):
    interrupted = []

    def interrupt_first_answer_once():
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # what Ctrl-C does while the answer is printed

    status, seen = _repl(monkeypatch, tiny_model, ["hello", "again"], on_delta=interrupt_first_answer_once)
    err = capsys.readouterr().err
    assert status == 0 and "(stopped)" in err
    assert len(seen) == 2  # the second question was asked: the session survived
    # The stopped answer stays in the history, cut where it was stopped (fewer than 40 tokens' worth).
    full = tiny_model.generate(tiny_model.tokenizer.encode(tiny_model.chat_prompt(seen[0]), add_special_tokens=False),
                               max_tokens=40, temperature=0).text
    kept = seen[1][1]
    assert kept["role"] == "assistant" and full.startswith(kept["content"]) and len(kept["content"]) < len(full)


def test_ctrl_c_at_the_prompt_is_ignored(monkeypatch, capsys, tiny_model):
    status, seen = _repl(monkeypatch, tiny_model, [KeyboardInterrupt, "hello", "/exit"])
    assert status == 0 and len(seen) == 1 and seen[0] == [{"role": "user", "content": "hello"}]
