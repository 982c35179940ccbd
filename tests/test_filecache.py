"""The cache of values derived from a file: hit for the same file, missed when the file changes, and a
damaged entry is ignored and written anew. The tokenizer built through it equals the one built without."""

import os

import pytest

from gemma4 import filecache


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counted(value):
    calls = []

    def build():
        calls.append(1)
        return value

    return build, calls


def test_second_read_is_a_hit(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"abc")
    build, calls = counted([("a", "b"), ("c", "d")])
    assert filecache.cached("merges", f, build) == [("a", "b"), ("c", "d")]
    assert filecache.cached("merges", f, build) == [("a", "b"), ("c", "d")]
    assert len(calls) == 1


def test_changed_file_misses(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"abc")
    assert filecache.cached("k", f, lambda: "old") == "old"
    f.write_bytes(b"abcd")  # another size
    assert filecache.cached("k", f, lambda: "new") == "new"
    st = f.stat()
    f.write_bytes(b"wxyz")  # same size, other contents: the modification time says so
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert filecache.cached("k", f, lambda: "newer") == "newer"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_damaged_entry_is_rebuilt(tmp_path, damage):
    f = tmp_path / "model.bin"
    f.write_bytes(b"abc")
    filecache.cached("k", f, lambda: list(range(1000)))
    entry, _ = filecache.entry_path("k", f)
    data = entry.read_bytes()
    entry.write_bytes({"garbage": b"\x00not an entry", "truncated": data[:len(data) // 2],
                       "flipped": data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:]}[damage])
    build, calls = counted([1, 2, 3])
    assert filecache.cached("k", f, build) == [1, 2, 3]
    assert calls == [1]
    assert filecache.cached("k", f, build) == [1, 2, 3]  # written anew, whole
    assert calls == [1]


def test_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("GEMMA4_CACHE", str(blocker / "sub"))  # under a file: cannot be created
    f = tmp_path / "model.bin"
    f.write_bytes(b"abc")
    assert filecache.cached("k", f, lambda: 7) == 7


def test_cached_tokenizer_is_the_same():
    """The embedded model's score-driven vocabulary: its parts come from the cache the second time."""
    from gemma4.checkpoint import open_checkpoint
    from gemma4.store import embedded_path

    ckpt = open_checkpoint(embedded_path())
    from gemma4.tokenizer import Tokenizer

    from gemma4.tokenizer import CACHE_KIND

    plain = Tokenizer.from_gguf_metadata(ckpt.metadata)
    first = ckpt.load_tokenizer()
    entry, _ = filecache.entry_path(CACHE_KIND, ckpt.path)
    assert entry.is_file()
    second = ckpt.load_tokenizer()
    text = "Hello world!\n\n  Indented code: def f(x): return x ** 2  # ünïcödé, 日本語, emoji 🙂"
    assert plain.encode(text) == first.encode(text) == second.encode(text)
    assert second.decode(second.encode(text)) == plain.decode(plain.encode(text))


def test_old_entries_are_pruned(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(filecache, "KEEP", 3)
    for i in range(5):
        f = tmp_path / f"m{i}.bin"
        f.write_bytes(b"x" * i)
        filecache.cached("k", f, lambda: i)
    assert len(list((cache_dir / "k").glob("*.bin"))) == 3
    assert filecache.cached("k", tmp_path / "m4.bin", lambda: "rebuilt") == 4  # the newest stayed


def test_gguf_header_through_the_cache_is_the_file_s():
    """The embedded GGUF's header read back from the cache equals the one walked from the file."""
    import numpy as np

    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.store import embedded_path

    path = embedded_path()
    first, second = GGUFFile(path), GGUFFile(path)  # the second reads the entry the first wrote
    assert filecache.entry_path("gguf-header", path)[0].is_file()
    walked = GGUFFile.__new__(GGUFFile)
    walked.path, walked._buf = path, np.memmap(path, dtype=np.uint8, mode="r")
    walked._view = memoryview(walked._buf)
    version, metadata, infos, _ = walked._read_header()
    assert second.version == version and second.metadata == metadata == first.metadata
    assert [(t.name, t.type, t.offset) for t in second.tensors.values()] == \
        [(t.name, t.type, t.offset) for t in first.tensors.values()]
    assert len(second.tensors) == len(infos)


def _vocab_gguf(path, words: list[str]) -> None:
    """A GGUF holding only a small SentencePiece vocabulary (no tensors)."""
    import gguf

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *words, *(f"<0x{b:02X}>" for b in range(256))]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(len(words))] + [0.0] * 256)
    w.add_token_types([3] * 4 + [1] * len(words) + [6] * 256)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tokenizer_of_another_file_version_misses(tmp_path, cache_dir):
    """The file rewritten with another vocabulary of the same size: the tokenizer is built from the new one."""
    from gemma4.checkpoint.gguf_file import GGUFFile
    from gemma4.tokenizer import CACHE_KIND, Tokenizer

    def load(path):  # as GGUFCheckpoint.load_tokenizer
        return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata,
                                            cache=lambda kind, build: filecache.cached(kind, path, build))

    f = tmp_path / "vocab.gguf"
    _vocab_gguf(f, ["\u2581", "H", "i", "Hi", "\u2581Hi"])
    old = load(f)
    assert old.encode(" Hi", add_special_tokens=False) == [old.token_to_id("\u2581Hi")]
    assert filecache.entry_path(CACHE_KIND, f)[0].is_file()
    size, mtime = f.stat().st_size, f.stat().st_mtime_ns
    _vocab_gguf(f, ["\u2581", "H", "o", "Ho", "\u2581Ho"])
    os.utime(f, ns=(mtime + 10**9, mtime + 10**9))
    assert f.stat().st_size == size
    new = load(f)
    assert new.token_to_id("\u2581Hi") is None and new.token_to_id("\u2581Ho") == 8
    assert new.encode(" Ho", add_special_tokens=False) == [8]
    assert load(f).encode(" Ho", add_special_tokens=False) == [8]  # and the new entry is read back
