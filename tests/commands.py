"""The command line as a user runs it: `gemma4 ...` in a subprocess, its output and exit status."""

import os
import subprocess
import sys


def cli(*args, input=None, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "gemma4.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env={**os.environ, **(env or {})})


def assert_refused(r, words: str, code: int = 2) -> None:
    """The command failed with `code` and one line on stderr, `error: ...` saying `words`."""
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


def media_message(folder, text: str, *files: str) -> list[dict]:
    """The message `gemma4 run --image/--audio FILE... TEXT` sends: the files of `folder` in order (audio by
    their suffix, the rest images), then the text."""
    from gemma4.audio_io import load_audio
    from gemma4.images import load_image

    parts = [{"type": "audio", "audio": load_audio(folder / f)} if f.endswith(AUDIO_SUFFIXES)
             else {"type": "image", "image": load_image(folder / f)} for f in files]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def assert_run_answers(r, model, message: list[dict], max_tokens: int) -> None:
    """A `gemma4 run` with media answered as model.chat does: the media's soft tokens and the prompt's length
    on stderr, the greedy reply on stdout."""
    assert r.returncode == 0, r.stderr
    prompt = model.chat_input(message)
    soft, n = sum(p.soft_tokens for p in prompt.patches), len(message[-1]["content"]) - 1
    assert len(prompt.patches) == n and soft > 0
    assert f"{n} images/frames/clips as {soft} soft tokens; prompt of {len(prompt)} tokens" in r.stderr
    assert r.stdout == model.chat(message, max_tokens=max_tokens, temperature=0).content + "\n"


def assert_chat_saw_media(stdout: str, model, message: list[dict], max_tokens: int) -> None:
    """A `gemma4 chat` printed the reply the model gives with the media attached, not the one without them."""
    with_media = model.chat(message, max_tokens=max_tokens, temperature=0)
    text = message[-1]["content"][-1]["text"]
    without = model.chat([{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0)
    assert with_media.content != without.content  # so the next check tells the two apart
    assert with_media.content in stdout
