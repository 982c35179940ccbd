"""--thinking-budget on the command line: it implies --think, bounds the thought, and is refused in one
line where it cannot apply."""

import gemma4
from commands import cli
from scripted import Thinker, running_output, thought_cut

THOUGHT = "the cat is on the mat and the dog is in the den"
ANSWER = "the mat"


def test_run_thinks_within_the_budget_then_answers(monkeypatch, capsys, chat_gguf):
    from gemma4 import cli as cli_module

    models, thinking = [], []
    real = gemma4.load

    def load(*a, **kw):
        model = real(*a, **kw)
        monkeypatch.setattr(model.decoder, "logits", Thinker(model, THOUGHT, ANSWER, running_output(model.engine)))
        chat_input = model.chat_input
        monkeypatch.setattr(model, "chat_input", lambda *a, **kw: thinking.append(kw["enable_thinking"])
                            or chat_input(*a, **kw))
        models.append(model)
        return model

    monkeypatch.setattr(gemma4, "load", load)
    assert cli_module.main(["run", "-m", str(chat_gguf), "--chat", "--thinking-budget", "12", "-n", "80", "--temperature", "0",
                            "Where is the cat?"]) == 0
    out, err = capsys.readouterr()
    assert out == ANSWER + "\n"
    assert "[thinking]" in err and thought_cut(models[0], THOUGHT, 12) in err and THOUGHT not in err
    assert thinking == [True]  # the budget implied --think


def test_a_negative_budget_is_one_line_and_exit_2():
    r = cli("run", "--thinking-budget", "-3", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: --thinking-budget") and r.stderr.count("\n") == 1, r.stderr


def test_a_model_without_a_thought_channel_refuses_a_budget(tiny_gguf):
    r = cli("run", "-m", str(tiny_gguf), "--chat", "--thinking-budget", "5", "x")
    assert r.returncode == 2 and r.stderr == "error: --thinking-budget: this model (gemma4) has no thought channel\n"
