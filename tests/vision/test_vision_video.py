"""Video: frame sampling, the prompt layout of the reference processor, and the logits of a video prompt."""

import types

import numpy as np
import pytest
import torch

import gemma4
from gemma4.images import Image
from gemma4.video import Video, load_frames, load_video, sample_indices
from vision_reference import TOKEN_IDS, build_multimodal, encoded, picture


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    ref = build_multimodal(d, seed=13, bidirectional="vision")
    return d, ref


@pytest.mark.parametrize("total,fps", [(1, 24.0), (25, 10.0), (240, 24.0), (90, 30.0), (3000, 25.0), (7, 1.0)])
def test_sampling_follows_the_reference_rule(total, fps):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    meta = VideoMetadata(total_num_frames=total, fps=fps)
    expected = default_sample_indices_fn(meta, fps=1)
    if len(expected) > 60:  # at most 60 frames: then 60 spread evenly, as num_frames=60 gives
        expected = default_sample_indices_fn(meta, num_frames=60)
    assert sample_indices(total, fps) == expected.tolist()


def test_frame_layout_is_the_reference_processors(model_dir):
    """Each frame: its mm:ss timestamp, a space, begin-of-image, the video soft tokens, end-of-image;
    frames joined by spaces (transformers' Gemma4Processor.replace_video_token)."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.video_utils import VideoMetadata

    d, _ = model_dir
    model = gemma4.load(d)
    frames = [Image.from_array(np.asarray(picture(30, 20, seed=i))) for i in range(4)]
    stamps = [0.0, 1.0, 61.5, 125.0]
    prompt = model.multimodal_prompt("watch <|video|> now", [Video(frames, stamps)])
    n = prompt.patches[0].soft_tokens
    assert len(prompt.patches) == 4 and all(p.soft_tokens == n for p in prompt.patches)

    fps = 2.0
    meta = VideoMetadata(total_num_frames=300, fps=fps, frames_indices=[int(s * fps) for s in stamps])
    stub = types.SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    text = Gemma4Processor.replace_video_token(stub, {"num_soft_tokens_per_video": [n], "video_metadata": [meta]}, 0)
    assert "00:00 <|image>" in text and " 01:01 <|image>" in text and " 02:05 <|image>" in text
    assert prompt.ids == model.tokenizer.encode("watch " + text + " now", add_special_tokens=False)


def test_video_prompt_gives_the_reference_logits(model_dir, tmp_path):
    """A folder of frames in a chat message; transformers gets the same frames as pixel_values_videos."""
    d, ref = model_dir
    model = gemma4.load(d)
    for i in range(3):
        (tmp_path / f"frame{i}.png").write_bytes(encoded(picture(40, 28, seed=20 + i), "PNG"))
    messages = [{"role": "user", "content": [{"type": "video", "video": str(tmp_path)},
                                             {"type": "text", "text": "what happens?"}]}]
    prompt = model.chat_input(messages)
    assert len(prompt.patches) == 3
    ids = torch.tensor([prompt.ids])
    types_ = 2 * (ids == TOKEN_IDS["<|video|>"]).long()
    assert int(types_.sum()) == 2 * sum(p.soft_tokens for p in prompt.patches)
    with torch.no_grad():
        expected = ref(input_ids=ids, mm_token_type_ids=types_,
                       pixel_values_videos=torch.stack([p.pixel_values for p in prompt.patches]),
                       video_position_ids=torch.stack([p.positions for p in prompt.patches]),
                       num_frames_per_video=torch.tensor([3])).logits[0]
    torch.testing.assert_close(model.forward(prompt), expected, atol=1e-4, rtol=0)  # bound: see test_vision.py


def test_folder_of_frames(tmp_path):
    for i in range(10):  # frame9 before frame10: numbers in names sort as numbers
        (tmp_path / f"frame{i + 1}.png").write_bytes(encoded(picture(8, 8, seed=i), "PNG"))
    (tmp_path / "notes.txt").write_text("not a frame")
    at_1fps = load_frames(tmp_path)
    assert at_1fps.timestamps == [float(i) for i in range(10)]
    at_2fps = load_frames(tmp_path, fps=2.0)
    assert at_2fps.timestamps == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [f.digest for f in at_2fps.frames] == [at_1fps.frames[i].digest for i in (0, 2, 4, 6, 8)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frame images"):
        load_frames(tmp_path / "empty")


def _write_video(path, seconds: int, fps: int, size=(64, 48)):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(seconds * fps):
            shade = np.full((size[1], size[0], 3), (i * 255) // (seconds * fps), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(shade, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_file_with_pyav(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, seconds=3, fps=10)
    video = load_video(path)
    assert video.timestamps == [0.0, 1.0, 2.0]
    shades = [int(f.pixels.mean()) for f in video.frames]
    expected = [(i * 255) // 30 for i in (0, 10, 20)]  # frames 0, 10, 20 of the 30 written
    assert all(abs(s - e) <= 6 for s, e in zip(shades, expected)), shades  # lossy codec: a few levels off
    assert (video.frames[0].height, video.frames[0].width) == (48, 64)


def test_bad_video_file(tmp_path):
    pytest.importorskip("av")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="cannot decode the video"):
        load_video(bad)
