"""The on-disk layouts other tools write, built in a temporary folder around existing model files (linked,
not copied): Ollama's manifests and sha256 blobs, the Hugging Face hub cache, LM Studio's models folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: the 250 MB embedded model is hashed once


def sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        os.symlink(target, link)
    return link


def _blob(root: Path, data: bytes | None = None, file: Path | None = None) -> dict:
    """A blob under root/blobs named by its sha256 as Ollama names it, and its manifest layer fields."""
    if file is not None:
        digest, size = sha256(file), file.stat().st_size
        _link(file, root / "blobs" / f"sha256-{digest}")
    else:
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": size}


def ollama_model(root: Path, name: str, gguf: Path, params: dict | None = None, projector: Path | None = None,
                 template: str = "{{ .Prompt }}", file_type: str = "Q4_K_M") -> Path:
    """`ollama pull` of NAME:TAG (library/NAME:TAG, or NAMESPACE/NAME:TAG) as Ollama writes it."""
    base, _, tag = name.partition(":")
    namespace, _, model = base.rpartition("/")
    config = json.dumps({"model_format": "gguf", "model_family": "gemma3", "file_type": file_type}).encode()
    layers = [{"mediaType": "application/vnd.ollama.image.model", **_blob(root, file=gguf)},
              {"mediaType": "application/vnd.ollama.image.template", **_blob(root, template.encode())},
              {"mediaType": "application/vnd.ollama.image.license", **_blob(root, b"Gemma Terms of Use")}]
    if params is not None:
        layers.append({"mediaType": "application/vnd.ollama.image.params", **_blob(root, json.dumps(params).encode())})
    if projector is not None:
        layers.append({"mediaType": "application/vnd.ollama.image.projector", **_blob(root, file=projector)})
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **_blob(root, config)},
                "layers": layers}
    path = root / "manifests" / "registry.ollama.ai" / (namespace or "library") / model / (tag or "latest")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


def hub_repo(cache: Path, repo: str, files: dict[str, Path], revision: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """A repository as huggingface_hub caches it: blobs/<etag>, snapshots/<revision>/FILE linking there,
    refs/main naming the revision. files: path in the repository -> the file to link."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / revision
    for name, target in files.items():
        blob = _link(target, root / "blobs" / hashlib.sha1(name.encode()).hexdigest())
        _link(Path(os.path.relpath(blob, (snap / name).parent)), snap / name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snap


def lmstudio_model(models: Path, name: str, files: dict[str, Path]) -> Path:
    """ORG/NAME/FILE in LM Studio's models folder (~/.lmstudio/models) as LM Studio downloads it."""
    folder = models / name
    for file, target in files.items():
        _link(target, folder / file)
    return folder
