"""`gemma4 pull` and `-m` of a name not yet on disk, without the network: the Hub's listing is faked where
the module asks for it, and a download lays the file out as huggingface_hub does (hub cache, refs/main)."""

import os

import pytest

from gemma4 import cli, store
from gemma4.errors import ModelLoadError
from gemma4.stores import hub, pull
from commands import cli as run_cli
from store_layouts import hub_repo

# a GGUF repository as unsloth and bartowski lay them out (sizes in bytes, as the Hub lists them)
GGUF_REPO = {"README.md": 3_000, ".gitattributes": 1_500, "config.json": 800,
             "gemma-3-270m-it-Q4_K_M.gguf": 253_000_000, "gemma-3-270m-it-Q8_0.gguf": 292_000_000,
             "gemma-3-270m-it-UD-Q4_K_XL.gguf": 255_000_000, "gemma-3-270m-it-F16.gguf": 543_000_000,
             "gemma-3-270m-it-IQ4_XS.gguf": 241_000_000,
             "mmproj-F32.gguf": 800_000_000, "mmproj-F16.gguf": 400_000_000, "mmproj-BF16.gguf": 400_000_000}
CHECKPOINT_REPO = {"README.md": 1, ".gitattributes": 1, "config.json": 1, "generation_config.json": 1,
                   "tokenizer.json": 1, "tokenizer_config.json": 1, "tokenizer.model": 1, "special_tokens_map.json": 1,
                   "chat_template.jinja": 1, "model-00001-of-00002.safetensors": 1,
                   "model-00002-of-00002.safetensors": 1, "model.safetensors.index.json": 1,
                   "original/params.json": 1, "original/consolidated.pth": 1, "onnx/model.onnx": 1}


@pytest.mark.parametrize("quant,expected", [
    (None, ["gemma-3-270m-it-Q4_K_M.gguf", "mmproj-F16.gguf"]),  # Q4_K_M when none is named
    ("Q8_0", ["gemma-3-270m-it-Q8_0.gguf", "mmproj-F16.gguf"]),
    ("iq4_xs", ["gemma-3-270m-it-IQ4_XS.gguf", "mmproj-F16.gguf"]),  # case-insensitive
    ("UD-Q4_K_XL", ["gemma-3-270m-it-UD-Q4_K_XL.gguf", "mmproj-F16.gguf"]),
])
def test_a_gguf_repositorys_quant_by_name(quant, expected):
    files, label = pull.choose(GGUF_REPO, "acme/g", quant)
    assert files == expected and label == f"acme/g:{pull.quant_of(expected[0])}"


def test_without_q4_k_m_the_smallest():
    listing = {k: v for k, v in GGUF_REPO.items() if "Q4_K_M" not in k and "mmproj" not in k}
    assert pull.choose(listing, "acme/g", None) == (["gemma-3-270m-it-IQ4_XS.gguf"], "acme/g:IQ4_XS")
    assert pull.choose({"only.gguf": 5}, "acme/g", None) == (["only.gguf"], "hf://acme/g/only.gguf")


@pytest.mark.parametrize("listing,quant,words", [
    (GGUF_REPO, "Q3_K_S", "no GGUF files match; the repository has gemma-3-270m-it-F16.gguf"),
    ({"a-Q4_K_M.gguf": 1, "a-UD-Q4_K_M.gguf": 1}, "Q4_K_M", "several GGUF files match"),
    (CHECKPOINT_REPO, "Q4_K_M", "has no quants"),
    ({"README.md": 1}, None, "neither GGUF files nor a checkpoint"),
])
def test_names_that_do_not_settle_a_file(listing, quant, words):
    with pytest.raises(ModelLoadError, match=words):
        pull.choose(listing, "acme/g", quant)


def test_a_checkpoint_repository_takes_config_tokenizer_and_weights():
    files, label = pull.choose(CHECKPOINT_REPO, "acme/c", None)
    assert label == "acme/c" and files == sorted(
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
         "special_tokens_map.json", "chat_template.jinja", "model-00001-of-00002.safetensors",
         "model-00002-of-00002.safetensors", "model.safetensors.index.json"])


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch, tiny_gguf):
    """The Hub's listing of acme/g (GGUF_REPO), and downloads that link tiny_gguf into the hub cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("OLLAMA_MODELS", "LMSTUDIO_MODELS", "GEMMA4_MODELS"):
        monkeypatch.setenv(var, str(tmp_path / "empty"))
    asked = []
    monkeypatch.setattr(pull, "_repo_files", lambda repo: asked.append(repo) or GGUF_REPO)

    def download(repo, filename):
        asked.append(filename)
        return hub_repo(tmp_path / "hub", repo, {filename: tiny_gguf}) / filename

    monkeypatch.setattr(pull, "_download", download)
    return asked


def test_run_pulls_a_missing_name_then_finds_it_in_the_cache(fake_hub, tiny_gguf, capsys):
    import gemma4

    assert cli.main(["run", "-m", "acme/g", "--raw", "--temperature", "0", "-n", "4", "the cat"]) == 0
    out, err = capsys.readouterr()
    assert fake_hub == ["acme/g", "gemma-3-270m-it-Q4_K_M.gguf", "mmproj-F16.gguf"]
    assert "pulling acme/g:Q4_K_M (chose Q4_K_M" in err
    assert out == "the cat" + gemma4.load(tiny_gguf).generate("the cat", max_tokens=4, temperature=0).text + "\n"
    found = store.find("acme/g")  # now on disk: no listing, no download
    assert os.path.samefile(found.path, tiny_gguf) and found.mmproj.name == "mmproj-F16.gguf" and len(fake_hub) == 3


def test_pull_command(fake_hub, capsys):
    assert cli.main(["pull", "acme/g:q8_0"]) == 0
    out, _ = capsys.readouterr()
    assert fake_hub == ["acme/g", "gemma-3-270m-it-Q8_0.gguf", "mmproj-F16.gguf"]
    assert out.startswith("acme/g:Q8_0  ") and "mmproj-F16.gguf" in out


def test_pull_one_file_by_its_hf_name(fake_hub):
    found = store.find("hf://acme/g/gemma-3-270m-it-F16.gguf", pull=True)
    assert fake_hub == ["acme/g", "gemma-3-270m-it-F16.gguf", "mmproj-F16.gguf"]
    assert found.explicit == "hf://acme/g/gemma-3-270m-it-F16.gguf" and found.mmproj.name == "mmproj-F16.gguf"
    with pytest.raises(ModelLoadError, match="acme/g has no file 'nope.gguf'"):
        store.find("hf://acme/g/nope.gguf", pull=True)


def test_offline_says_what_is_missing(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"acme/g:Q8_0 is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        store.find("acme/g:Q8_0", pull=True)
    assert fake_hub == []  # the Hub was not asked


def test_offline_on_the_command_line_is_one_line(tmp_path):
    r = run_cli("run", "-m", "acme/missing:Q4_K_M", "x", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "acme/missing:Q4_K_M is not in the Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_the_cache_is_where_huggingface_hub_puts_it(monkeypatch, tmp_path):
    """Our reading of HF_HUB_CACHE / HF_HOME / XDG_CACHE_HOME agrees with the library's own constants."""
    import importlib

    import huggingface_hub.constants as constants

    for env in ({"HF_HUB_CACHE": str(tmp_path / "a")}, {"HF_HOME": str(tmp_path / "b")},
                {"XDG_CACHE_HOME": str(tmp_path / "c")}, {}):
        for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(var, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert str(hub.cache_dir()) == importlib.reload(constants).HF_HUB_CACHE
    importlib.reload(constants)
