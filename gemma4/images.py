"""Images in: decoding (Pillow) and the Gemma 4 image preprocessing (Pillow + torch).

- `decode_image(bytes)` / `load_image(path)` / `image_from_url(data URL)` give an `Image`: RGB pixels
  with EXIF orientation applied, transparency composited onto white, the first frame of an animation,
  and a hash of the pixels (`Image.digest`) that caches key images by.
- `preprocess(image, patch_size, pooling_kernel_size, max_soft_tokens)` does what the reference image
  processor does: resize keeping the aspect ratio to at most `max_soft_tokens` soft tokens with sides
  multiples of pooling x patch (bicubic, on 8-bit pixels, as Pillow does it), rescale to [0, 1], and
  cut into patches with their (x, y) grid positions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_PIXELS = 64 * 1024 * 1024  # a larger image is refused rather than decoded (decompression bombs)


@dataclass(frozen=True)
class Image:
    pixels: np.ndarray  # [height, width, 3] uint8, RGB
    digest: str  # sha256 of the size and the pixels: equal pixels, equal digest

    @classmethod
    def from_array(cls, pixels: np.ndarray) -> "Image":
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"image: expected [height, width, 3] RGB pixels, got shape {list(pixels.shape)}")
        h = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode())
        h.update(pixels.tobytes())
        return cls(pixels, h.hexdigest())

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def from_pil(img) -> Image:
    """A Pillow image -> Image: EXIF orientation applied, alpha (or a transparent palette colour)
    composited onto white, as the reference processor flattens it."""
    from PIL import Image as PILImage, ImageOps

    img = ImageOps.exif_transpose(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = PILImage.alpha_composite(white, rgba)
    return Image.from_array(np.asarray(img.convert("RGB")))


def decode_image(data: bytes, what: str = "image") -> Image:
    """Encoded PNG, JPEG, WebP or GIF bytes -> Image. Raises ValueError (one line, naming `what`) for
    anything else, a damaged file, or an image over MAX_PIXELS."""
    from PIL import Image as PILImage, UnidentifiedImageError

    if not data:
        raise ValueError(f"{what}: empty image data")
    try:
        with PILImage.open(io.BytesIO(data), formats=FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"{what}: {img.width}x{img.height} is too large (at most {MAX_PIXELS} pixels)")
            img.seek(0)  # the first frame of an animated GIF or WebP
            img.load()
            return from_pil(img)
    except UnidentifiedImageError:
        raise ValueError(f"{what}: not an image in a supported format ({', '.join(FORMATS)})") from None
    except PILImage.DecompressionBombError:  # Pillow refuses from the header too, above its own limit
        raise ValueError(f"{what}: the image is too large (at most {MAX_PIXELS} pixels)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{what}: cannot decode the image ({e})") from None


def load_image(path: str | Path) -> Image:
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_image(data, str(path))


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:` URL (base64 or percent-encoded). ValueError for anything else."""
    m = _DATA_URL.match(url.strip())
    if m is None:
        raise ValueError("image_url: not a data: URL")
    if m["b64"]:
        try:
            return base64.b64decode("".join(m["data"].split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image_url: the data: URL's base64 payload is malformed") from None
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(m["data"])


def image_from_url(url: str) -> Image:
    """An OpenAI `image_url` value -> Image. Only `data:` URLs are decoded here; an http(s) URL raises
    ValueError saying remote images are not fetched (a caller that allows fetching decodes the bytes it
    fetched with `decode_image`)."""
    if not isinstance(url, str) or not url:
        raise ValueError("image_url: expected a URL string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        mime = url[5:].split(";", 1)[0].split(",", 1)[0].lower()
        if mime and not mime.startswith("image/"):
            raise ValueError(f"image_url: a data: URL of type {mime!r} is not an image")
        return decode_image(decode_data_url(url), "image_url")
    if scheme in ("http", "https"):
        raise ValueError("image_url: remote image URLs are not fetched; send the image as a data: URL")
    raise ValueError(f"image_url: unsupported URL scheme {scheme!r} (expected a data: URL)")


# ---- preprocessing -----------------------------------------------------------------------------

def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int) -> tuple[int, int]:
    """The largest (height, width) keeping the aspect ratio with at most `max_patches` patches and sides
    that are multiples of pooling x patch; a side that rounds to nothing gets one multiple, the other
    side then takes the aspect ratio (capped), as the reference does."""
    side = pooling_kernel_size * patch_size
    factor = math.sqrt(max_patches * patch_size**2 / (height * width))
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ValueError(f"image: {width}x{height} cannot be resized to a non-empty grid")
    longest = (max_patches // pooling_kernel_size**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, longest), side
    if th * tw > max_patches * patch_size**2:
        raise ValueError(f"image: {width}x{height} would need more than {max_patches} patches")
    return th, tw


@dataclass(frozen=True)
class Patches:
    """One preprocessed image: what the vision tower takes."""

    pixel_values: torch.Tensor  # [N, patch·patch·3] float32 in [0, 1], a patch flattened as (row, col, RGB)
    positions: torch.Tensor  # [N, 2] (x, y) of each patch, x fastest
    soft_tokens: int  # N / pooling²: how many soft tokens the image becomes
    digest: str  # the image's pixel digest and the preprocessing, for caches


def preprocess(image: Image, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int) -> Patches:
    from PIL import Image as PILImage

    max_patches = max_soft_tokens * pooling_kernel_size**2
    th, tw = target_size(image.height, image.width, patch_size, max_patches, pooling_kernel_size)
    pixels = image.pixels
    if (th, tw) != (image.height, image.width):
        pixels = np.asarray(PILImage.fromarray(pixels).resize((tw, th), PILImage.Resampling.BICUBIC))
    # x / 255 computed in float64, then float32, as the reference rescales
    values = torch.from_numpy((pixels.astype(np.float64) * (1 / 255)).astype(np.float32))
    ph, pw = th // patch_size, tw // patch_size
    patches = values.reshape(ph, patch_size, pw, patch_size, 3).permute(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    ys, xs = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    digest = f"{image.digest}/p{patch_size}k{pooling_kernel_size}t{max_soft_tokens}"
    return Patches(patches.contiguous(), positions, ph * pw // pooling_kernel_size**2, digest)
