"""Values derived from a file (a GGUF vocabulary's merges, a file's checksum), kept on disk so that the next
process reads them instead of computing them again.

An entry is named by what it holds and by the file's resolved path, size and modification time, and it
carries that key and a checksum of its payload: a changed file misses, and a damaged or foreign entry is
ignored and written anew. The values are plain data (marshal: lists, tuples, strings, numbers).
"""

from __future__ import annotations

import hashlib
import marshal
import os
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
FORMAT = 1  # bumped when what an entry holds changes meaning
KEEP = 32  # entries of one kind kept, the most recently written (temporary files must not fill the disk)
_MAGIC = b"gemma4-cache\0"


def cache_root(environ=os.environ) -> Path:
    """$GEMMA4_CACHE, else ~/.cache/gemma4."""
    return Path(environ.get("GEMMA4_CACHE") or Path.home() / ".cache" / "gemma4").expanduser()


def entry_path(kind: str, path: str | Path) -> tuple[Path, bytes]:
    """Where the entry of `kind` for `path` lives, and the key it must carry."""
    path = Path(path).resolve()
    st = path.stat()
    key = repr((FORMAT, kind, str(path), st.st_size, st.st_mtime_ns)).encode()
    return cache_root() / kind / (hashlib.sha256(key).hexdigest()[:32] + ".bin"), key


def _read(entry: Path, key: bytes):
    """The value stored in `entry` under `key`; raises when there is none, or the entry is damaged."""
    data = entry.read_bytes()
    head = len(_MAGIC) + 4
    if not data.startswith(_MAGIC):
        raise ValueError("not a cache entry")
    n = int.from_bytes(data[len(_MAGIC):head], "little")
    stored_key, digest, payload = data[head:head + n], data[head + n:head + n + 32], data[head + n + 32:]
    if stored_key != key or hashlib.sha256(payload).digest() != digest:
        raise ValueError("another file's entry, or a damaged one")
    return marshal.loads(payload)


def _write(entry: Path, key: bytes, value) -> None:
    payload = marshal.dumps(value)
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = entry.with_name(f"{entry.name}.{os.getpid()}.partial")
    partial.write_bytes(_MAGIC + len(key).to_bytes(4, "little") + key + hashlib.sha256(payload).digest() + payload)
    os.replace(partial, entry)  # readers see the old entry or the whole new one
    entries = sorted(entry.parent.glob("*.bin"), key=lambda e: e.stat().st_mtime_ns)
    for old in entries[:-KEEP]:
        old.unlink(missing_ok=True)


def cached(kind: str, path: str | Path, build: Callable[[], T]) -> T:
    """build()'s value for the file at `path`, read from the cache when an entry for this very file is there;
    otherwise built and stored (a cache that cannot be written is only slower)."""
    try:
        entry, key = entry_path(kind, path)
    except OSError:
        return build()
    try:
        return _read(entry, key)
    except (OSError, ValueError, EOFError, TypeError):
        pass
    value = build()
    try:
        _write(entry, key, value)
    except (OSError, ValueError):
        pass
    return value
