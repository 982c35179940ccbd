"""Models where other tools keep them: every name form finds the same file, and gives the same greedy
text as the file's path."""

import os

import pytest

import gemma4
from gemma4 import store
from gemma4.errors import ModelLoadError
from commands import cli
from store_layouts import hub_repo, lmstudio_model, ollama_model

PROMPT = "The capital of France is"
HUB_REPO = "acme/gemma-3-270m-GGUF"
HUB_FILE = "gemma-3-270m-it-Q4_K_M.gguf"
LMS_NAME = "lmstudio-community/gemma-3-270m-it-GGUF"

# every spelling of the embedded model in the stores below
NAMES = ["gemma3:270m", "ollama://gemma3:270m", "acme/g3:q4", "ollama://acme/g3:q4", "plain", HUB_REPO,
         f"{HUB_REPO}:Q4_K_M", f"{HUB_REPO}:q4_k_m", f"hf://{HUB_REPO}/{HUB_FILE}", f"hf://{HUB_REPO}",
         LMS_NAME, f"{LMS_NAME}:Q4_K_M", f"lmstudio://{LMS_NAME}", f"lmstudio://{LMS_NAME}/{HUB_FILE}"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """Ollama's store, the hub cache and LM Studio's folder, each holding the embedded model, and the
    environment that points at them."""
    d = tmp_path_factory.mktemp("stores")
    embedded = store.embedded_path()
    ollama_model(d / "ollama", "gemma3:270m", embedded, params={"stop": ["<end_of_turn>"], "top_k": 64})
    ollama_model(d / "ollama", "acme/g3:q4", embedded)
    ollama_model(d / "ollama", "plain", embedded, params={"temperature": 0})  # plain:latest
    hub_repo(d / "hub", HUB_REPO, {HUB_FILE: embedded})
    lmstudio_model(d / "lmstudio", LMS_NAME, {HUB_FILE: embedded})
    (d / "own").mkdir()
    return {"OLLAMA_MODELS": str(d / "ollama"), "HF_HUB_CACHE": str(d / "hub"), "LMSTUDIO_MODELS": str(d / "lmstudio"),
            "GEMMA4_MODELS": str(d / "own"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture()
def env(layout, monkeypatch):
    for k, v in layout.items():
        monkeypatch.setenv(k, v)
    return layout


@pytest.mark.parametrize("name", NAMES)
def test_every_name_finds_the_embedded_file(env, name):
    found = store.find(name)
    assert os.path.samefile(found.path, store.embedded_path()) and found.kind == "gguf"


def test_each_store_says_what_it_found(env):
    ollama = store.find("gemma3:270m")
    assert (ollama.source, ollama.name, ollama.explicit) == ("ollama", "gemma3:270m", "ollama://gemma3:270m")
    assert ollama.quant == "Q4_K_M" and ollama.params == {"stop": ["<end_of_turn>"], "top_k": 64}
    assert store.find("acme/g3:q4").name == "acme/g3:q4" and store.find("plain").name == "plain:latest"
    hub = store.find(HUB_REPO)
    assert (hub.source, hub.explicit, hub.quant) == ("hf", f"hf://{HUB_REPO}/{HUB_FILE}", "Q4_K_M")
    assert store.find(LMS_NAME).source == "lmstudio"


@pytest.fixture(scope="module")
def greedy_text():
    model = gemma4.load(store.embedded_path())
    return model.generate(PROMPT, max_tokens=6, temperature=0).text


@pytest.mark.parametrize("name", ["ollama://acme/g3:q4", f"{HUB_REPO}:q4_k_m", f"lmstudio://{LMS_NAME}"])
def test_load_by_name_gives_the_greedy_text_of_the_path(env, name, greedy_text):
    assert gemma4.load(name).generate(PROMPT, max_tokens=6, temperature=0).text == greedy_text


@pytest.mark.parametrize("name,greedy", [
    ("plain", []),  # plain:latest's params layer says temperature 0: without --temperature the run is greedy
    (f"hf://{HUB_REPO}/{HUB_FILE}", ["--temperature", "0"]),
    (LMS_NAME, ["--temperature", "0"]),
])
def test_the_command_line_runs_each_store(layout, name, greedy, greedy_text):
    r = cli("run", "-m", name, "--raw", *greedy, "-n", "6", PROMPT, env=layout, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + greedy_text + "\n"


def test_a_name_in_two_stores_lists_the_choices(env, tiny_gguf, tmp_path):
    lmstudio_model(tmp_path, HUB_REPO, {"tiny-Q4_K_M.gguf": tiny_gguf})
    os.environ["LMSTUDIO_MODELS"] = str(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        store.find(HUB_REPO)
    message = str(e.value)
    assert "\n" not in message and f"hf://{HUB_REPO}/{HUB_FILE}" in message
    assert f"lmstudio://{HUB_REPO}/tiny-Q4_K_M.gguf" in message
    assert store.find(f"lmstudio://{HUB_REPO}").path.name == "tiny-Q4_K_M.gguf"  # the explicit form settles it


def test_several_quants_in_one_repository(env, tiny_gguf, tmp_path):
    os.environ["HF_HUB_CACHE"] = str(tmp_path)
    hub_repo(tmp_path, "acme/multi", {"m-Q4_K_M.gguf": store.embedded_path(), "m-Q8_0.gguf": tiny_gguf,
                                      "mmproj-F32.gguf": tiny_gguf, "mmproj-F16.gguf": tiny_gguf})
    with pytest.raises(ModelLoadError, match="hf://acme/multi/m-Q4_K_M.gguf, hf://acme/multi/m-Q8_0.gguf"):
        store.find("acme/multi")
    q8 = store.find("acme/multi:Q8_0")
    assert q8.path.name == "m-Q8_0.gguf" and q8.mmproj.name == "mmproj-F16.gguf"  # F16 preferred
    with pytest.raises(ModelLoadError, match="holds acme/multi as Q4_K_M, Q8_0 only"):
        store.find("acme/multi:Q5_K_S")


def test_list_shows_every_store(layout):
    r = cli("list", env=layout)
    assert r.returncode == 0, r.stderr
    for name, source in [("gemma3:270m", "ollama"), ("acme/g3:q4", "ollama"), ("plain:latest", "ollama"),
                         (HUB_REPO, "hf"), (LMS_NAME, "lmstudio")]:
        assert any(line.split()[:2] == [name, source] for line in r.stdout.splitlines()), r.stdout


def test_info_names_the_store(layout):
    r = cli("info", f"{HUB_REPO}:Q4_K_M", env=layout)
    assert r.returncode == 0, r.stderr
    assert f"store          hf: hf://{HUB_REPO}/{HUB_FILE}" in r.stdout and "gemma3, 18 layers" in r.stdout


@pytest.mark.parametrize("name,words", [
    ("gemma3:1b", "not found"),
    ("ollama://nothing:here", "not found"),
    ("s3://bucket/model", "unknown scheme"),
    (HUB_REPO, "names 2 models"),
])
def test_bad_names_are_one_line_and_exit_2(layout, tiny_gguf, tmp_path, name, words):
    lmstudio_model(tmp_path, HUB_REPO, {"tiny.gguf": tiny_gguf})
    r = cli("run", "-m", name, "x", env={**layout, "LMSTUDIO_MODELS": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert words in r.stderr, r.stderr
