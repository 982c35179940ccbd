"""Image decoding and preprocessing against transformers' Gemma 4 image processor (its Pillow backend)."""

import base64
import io

import numpy as np
import pytest
import torch

import PIL
from PIL import Image as PILImage, ImageOps

from gemma4.images import decode_image, image_from_url, load_image, preprocess, target_size
from vision_reference import encoded, image_processor, picture, png_bomb

PATCH, POOL = 4, 3


def _reference(data: bytes, max_soft_tokens: int):
    """What the reference gets from a file: Pillow opens it, EXIF orientation applied (transformers'
    load_image does that), then its image processor (alpha composited onto white, resize, rescale)."""
    with PILImage.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        out = image_processor(max_soft_tokens)([img], return_tensors="pt")
    n = out["num_soft_tokens_per_image"][0] * POOL**2
    return out["pixel_values"][0, :n], out["image_position_ids"][0, :n], out["num_soft_tokens_per_image"][0]


def _exif_rotated(img) -> bytes:
    exif = PILImage.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encoded(img, "JPEG", exif=exif, quality=95)


def _gif_two_frames(img) -> bytes:
    second = PILImage.new("RGB", img.size, (255, 0, 0))
    return encoded(img.convert("P"), "GIF", save_all=True, append_images=[second.convert("P")], transparency=0)


FILES = {
    "png": lambda: encoded(picture(50, 37, 1), "PNG"),
    "png_rgba": lambda: encoded(picture(41, 29, 2, mode="RGBA"), "PNG"),
    "png_grey": lambda: encoded(picture(33, 33, 3, mode="L"), "PNG"),
    "jpeg": lambda: encoded(picture(120, 80, 4), "JPEG", quality=85),
    "jpeg_exif_rotated": lambda: _exif_rotated(picture(90, 40, 5)),
    "webp": lambda: encoded(picture(64, 100, 6), "WEBP", quality=80),
    "webp_lossless_rgba": lambda: encoded(picture(30, 45, 7, mode="RGBA"), "WEBP", lossless=True),
    "gif_animated_transparent": lambda: _gif_two_frames(picture(36, 48, 8)),
    "large": lambda: encoded(picture(1000, 700, 9), "PNG"),
    "exact_grid": lambda: encoded(picture(96, 72, 10), "PNG"),  # 8 x 6 pooled cells: no resize
    "very_wide": lambda: encoded(picture(2000, 10, 11), "PNG"),
    "very_tall": lambda: encoded(picture(6, 500, 12), "PNG"),
    "one_pixel": lambda: encoded(picture(1, 1, 13), "PNG"),
}


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("budget", [70, 280])
def test_preprocessing_equals_the_reference_processor(kind, budget):
    data = FILES[kind]()
    ours = preprocess(decode_image(data), PATCH, POOL, budget)
    pixels, positions, soft_tokens = _reference(data, budget)
    assert ours.soft_tokens == soft_tokens
    assert torch.equal(ours.positions, positions)
    assert ours.pixel_values.dtype == pixels.dtype == torch.float32
    assert torch.equal(ours.pixel_values, pixels)  # same Pillow resize on the same 8-bit pixels: exact


def test_exif_orientation_and_alpha_are_applied():
    img = picture(90, 40, 5)
    rotated = decode_image(_exif_rotated(img))
    assert (rotated.height, rotated.width) == (90, 40)
    transparent = PILImage.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (decode_image(encoded(transparent, "PNG")).pixels == 255).all()  # flattened onto white


def test_first_frame_of_a_gif():
    frame0 = decode_image(_gif_two_frames(picture(36, 48, 8)))
    assert not (frame0.pixels == [255, 0, 0]).all()


def test_target_sizes_respect_the_budget():
    for h, w in [(1, 1), (7, 3000), (3000, 7), (480, 640), (1080, 1920), (333, 333)]:
        for budget in (70, 280, 1120):
            th, tw = target_size(h, w, 16, budget * 9, 3)
            assert th % 48 == 0 and tw % 48 == 0 and th * tw <= budget * 9 * 256


def test_pixel_digest_keys_pixels_not_encodings():
    img = picture(40, 30, 20)
    png, webp = decode_image(encoded(img, "PNG")), decode_image(encoded(img, "WEBP", lossless=True))
    assert png.digest == webp.digest
    other = np.asarray(img).copy()
    other[0, 0, 0] ^= 1
    assert decode_image(encoded(PILImage.fromarray(other), "PNG")).digest != png.digest
    # the same pixels preprocessed under another budget are another cache entry
    assert preprocess(png, PATCH, POOL, 70).digest != preprocess(png, PATCH, POOL, 140).digest


def test_data_urls():
    data = encoded(picture(8, 8, 21), "PNG")
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert image_from_url(url).digest == decode_image(data).digest
    with pytest.raises(ValueError, match="remote image URLs are not fetched"):
        image_from_url("https://example.com/cat.png")
    with pytest.raises(ValueError, match="base64"):
        image_from_url("data:image/png;base64,@@@")
    with pytest.raises(ValueError, match="not an image"):
        image_from_url("data:text/plain;base64," + base64.b64encode(b"hello").decode())
    with pytest.raises(ValueError, match="scheme"):
        image_from_url("file:///etc/passwd")


@pytest.mark.parametrize("data,words", [
    (b"", "empty"),
    (b"not an image at all", "supported format"),
    (encoded(picture(20, 20), "PNG")[:60], "cannot decode"),
    (b"BM" + b"\0" * 100, "supported format"),  # BMP is not among the accepted formats
    (png_bomb(30000, 30000), "too large"),  # refused from its header, never decoded
    (png_bomb(9000, 9000), "too large"),  # under Pillow's own bomb limit, over ours
])
def test_bad_image_data_is_one_line(data, words):
    with pytest.raises(ValueError, match=words) as e:
        decode_image(data)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such image file"):
        load_image(tmp_path / "nope.png")
