"""`gemma4 run --image` and `/image` in `gemma4 chat`, run as a user runs them."""

import pytest

import gemma4
from reference import build_gemma4
from commands import assert_chat_saw_media, assert_refused, assert_run_answers, cli, media_message
from vision_reference import build_multimodal, encoded, picture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision_cli")
    build_multimodal(d / "model", seed=11)
    (d / "a.png").write_bytes(encoded(picture(50, 37, seed=1), "PNG"))
    (d / "b.webp").write_bytes(encoded(picture(20, 70, seed=2), "WEBP"))
    (d / "broken.png").write_bytes(encoded(picture(20, 20, seed=3), "PNG")[:50])
    return d


@pytest.mark.parametrize("images", [["a.png"], ["a.png", "b.webp"]])
def test_run_with_images(tiny, images):
    args = [a for i in images for a in ("--image", str(tiny / i))]
    r = cli("run", "-m", str(tiny / "model"), *args, "--temperature", "0", "-n", "4", "describe")
    assert_run_answers(r, gemma4.load(tiny / "model"), media_message(tiny, "describe", *images), 4)


def test_image_token_budget_flag(tiny):
    r = cli("run", "-m", str(tiny / "model"), "--image", str(tiny / "a.png"), "--image-tokens", "140", "-n", "1", "x")
    assert r.returncode == 0, r.stderr
    model = gemma4.load(tiny / "model")
    prompt = model.chat_input(media_message(tiny, "x", "a.png"), image_tokens=140)
    assert f"prompt of {len(prompt)} tokens" in r.stderr


@pytest.mark.parametrize("args,words", [
    (["--image", "{d}/missing.png"], "no such image file"),
    (["--image", "{d}/broken.png"], "cannot decode"),
    (["--image", "{d}/model/config.json"], "supported format"),
    (["--image", "{d}/a.png", "--raw"], "drop --raw"),
    (["--video", "{d}/nothing"], "no such video file"),
])
def test_bad_images_are_one_line_and_exit_2(tiny, args, words):
    assert_refused(cli("run", "-m", str(tiny / "model"), *[a.format(d=tiny) for a in args], "describe"), words)


def test_a_text_only_model_refuses_images(tiny):
    build_gemma4(tiny / "text", "dense_kv")
    assert_refused(cli("run", "-m", str(tiny / "text"), "--image", str(tiny / "a.png"), "describe"), "no vision tower")


def test_chat_image_command(tiny):
    r = cli("chat", "-m", str(tiny / "model"), "--temperature", "0", "-n", "6",
            input=f"/image {tiny / 'a.png'}\ndescribe\n/image {tiny / 'missing.png'}\n")
    assert r.returncode == 0, r.stderr
    assert "(1 attached to your next message)" in r.stderr and "no such image file" in r.stderr
    assert_chat_saw_media(r.stdout, gemma4.load(tiny / "model"), media_message(tiny, "describe", "a.png"), 6)



def _reused(stderr: str) -> int:
    return int(stderr.split("prompt cache: reused ")[1].split()[0]) if "prompt cache: reused" in stderr else 0


def test_prompt_cache_keeps_the_images(tiny, tmp_path):
    """`run --image PAGE --prompt-cache F`: the first run saves the page's KV, a second question reuses it
    and answers as a plain run does; another page reuses nothing from its image on."""
    cache = tmp_path / "page.kv"
    model = gemma4.load(tiny / "model")

    def run(image, question):
        r = cli("run", "-m", str(tiny / "model"), "--image", str(tiny / image), "--prompt-cache", str(cache),
                "--temperature", "0", "-n", "4", question)
        assert r.returncode == 0, r.stderr
        assert r.stdout == model.chat(media_message(tiny, question, image), max_tokens=4, temperature=0).content + "\n"
        prompt = model.chat_input(media_message(tiny, question, image))
        return r.stderr, prompt.offsets[0], prompt.offsets[0] + prompt.patches[0].soft_tokens

    err, _, end = run("a.png", "describe")
    assert _reused(err) == 0 and "prompt cache: saved" in err
    err, _, end = run("a.png", "what colour?")
    assert _reused(err) >= end  # the image came from the file
    err, start, _ = run("b.webp", "what colour?")
    assert _reused(err) <= start
