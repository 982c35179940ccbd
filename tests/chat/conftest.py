import pytest


@pytest.fixture(scope="session")
def hf_tokenizer():
    """A transformers tokenizer with <bos>/<eos>: what apply_chat_template, the rendering oracle, needs."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                unk_token="<unk>")


@pytest.fixture(scope="session")
def hf_render(hf_tokenizer):
    """template, messages, **kw -> the prompt text transformers' apply_chat_template gives."""

    def render(template, messages, **kw):
        hf_tokenizer.chat_template = template
        return hf_tokenizer.apply_chat_template(messages, tokenize=False, **kw)

    return render
