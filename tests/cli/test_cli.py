"""The command line, run as a user runs it: a subprocess, its output and its exit status."""

import pytest

import gemma4
from gemma4.kv import kv_bytes_per_token, ring_slots
from commands import cli
from reference import build_gemma4


def test_run_streams_raw_completion_of_a_base_model(tiny_gguf):
    r = cli("run", "-m", str(tiny_gguf), "--temperature", "0", "-n", "12", "the cat")
    assert r.returncode == 0, r.stderr
    expected = gemma4.load(tiny_gguf).generate("the cat", max_tokens=12, temperature=0)
    assert r.stdout == "the cat" + expected.text + "\n"
    assert "raw text" in r.stderr


def test_run_reads_stdin_and_is_reproducible_with_a_seed(tiny_gguf):
    a = cli("run", "-m", str(tiny_gguf), "--seed", "5", "-n", "10", "-", input="a is the")
    b = cli("run", "-m", str(tiny_gguf), "--seed", "5", "-n", "10", "-", input="a is the")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("a is the")


def test_run_chat_mode_uses_the_turn_format(tiny_gguf):
    r = cli("run", "-m", str(tiny_gguf), "--chat", "--temperature", "0", "-n", "8", "hello")
    assert r.returncode == 0, r.stderr
    model = gemma4.load(tiny_gguf)
    reply = model.chat([{"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
    assert r.stdout == reply.content + "\n"
    assert "turn format" in r.stderr


@pytest.mark.parametrize("args,words", [
    (["run"], "no prompt"),
    (["run", "   "], "empty"),
    (["run", "--top-p", "0", "x"], "top_p"),
    (["run", "-m", "/no/such/model", "x"], "no such file or folder"),
    (["run", "-n", "0", "x"], "max_tokens"),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    r = cli(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_broken_safetensors_checkpoint_exits_2(tmp_path):
    build_gemma4(tmp_path, "dense_kv", seed=1)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"gemma4_text"', '"gpt9"'))
    r = cli("run", "-m", str(tmp_path), "x")
    assert r.returncode == 2 and "model_type" in r.stderr and r.stderr.count("\n") == 1


def test_info(tiny_gguf):
    r = cli("info", str(tiny_gguf), "--ctx", "100")
    assert r.returncode == 0, r.stderr
    cfg = gemma4.load(tiny_gguf).config
    total, active = cfg.parameter_counts()
    assert "gemma4" in r.stdout and f"experts        {cfg.num_experts}, top-{cfg.top_k_experts}" in r.stdout
    assert "F32" in r.stdout and "KV at    100" in r.stdout
    # KV: sliding layers their ring (the window and a chunk of the attention kernel), the K=V full layers
    # one tensor per position
    kv = sum(kv_bytes_per_token(cfg, i) * (ring_slots(cfg.sliding_window, 0) if cfg.is_sliding(i) else 100)
             for i in range(cfg.num_hidden_layers))
    assert f"{kv / 1024:.1f} KiB" in r.stdout


def test_info_of_the_embedded_model():
    r = cli("info")
    assert r.returncode == 0, r.stderr
    assert "gemma3, 18 layers (15 sliding, window 512; 3 full), hidden 640" in r.stdout
    assert "Q4_K" in r.stdout and "none (base model" in r.stdout


def test_list_and_names_in_the_store(tmp_path, tiny_gguf):
    store = tmp_path / "store"
    store.mkdir()
    (store / "mine.gguf").write_bytes(tiny_gguf.read_bytes())
    env = {"GEMMA4_MODELS": str(store)}
    r = cli("list", env=env)
    assert r.returncode == 0 and "mine" in r.stdout and "gemma3-270m" in r.stdout
    r = cli("run", "-m", "mine", "-n", "3", "--temperature", "0", "the", env=env)
    assert r.returncode == 0, r.stderr


def test_chat_repl_history_reset_exit(tiny_gguf):
    r = cli("chat", "-m", str(tiny_gguf), "--temperature", "0", "-n", "5",
            input="hello\nhow are you\n/reset\nhello\n/exit\n")
    assert r.returncode == 0, r.stderr
    model = gemma4.load(tiny_gguf)
    first = model.chat([{"role": "user", "content": "hello"}], max_tokens=5, temperature=0).content
    second = model.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                         {"role": "user", "content": "how are you"}], max_tokens=5, temperature=0).content
    answers = [a for a in r.stdout.replace(">>> ", "\n").split("\n") if a]
    assert answers == [first, second, first]  # after /reset the same question gets the first answer
    assert "history cleared" in r.stderr


def test_run_keeps_no_prefix_store_and_chat_does(monkeypatch, tiny_gguf):
    """A one-shot `run` never meets a second prompt: storing its KV for reuse would only copy it. `chat`'s
    turns each start with the conversation so far, so it keeps the store."""
    from gemma4 import cli as cli_module

    loads = []
    real = gemma4.load

    def load(*a, **kw):
        loads.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(gemma4, "load", load)
    assert cli_module.main(["run", "-m", str(tiny_gguf), "-n", "2", "--temperature", "0", "Hello"]) == 0
    assert loads[-1].get("prefix_cache_bytes") == 0
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("/exit\n"))
    cli_module.main(["chat", "-m", str(tiny_gguf), "-n", "2"])
    assert "prefix_cache_bytes" not in loads[-1]
