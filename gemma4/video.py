"""Videos in: frames sampled at 1 fps (at most 60), each an Image with its timestamp.

Frames come from a folder of images (taken as frames at `fps` per second, 1 by default) or from a
video file decoded with PyAV (`pip install av`, an optional dependency: FFmpeg's decoders in a
wheel). Sampling follows the reference's rule: n = max(1, int(frames / fps * 1)) frames, capped at
60, at indices i * frames // n, each stamped i_frame / fps seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .images import Image, from_pil, load_image

SAMPLE_FPS = 1.0
MAX_FRAMES = 60
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


@dataclass(frozen=True)
class Video:
    frames: list[Image]
    timestamps: list[float]  # seconds from the start, one per frame

    def __post_init__(self):
        if not self.frames or len(self.frames) != len(self.timestamps):
            raise ValueError("video: needs at least one frame and one timestamp per frame")


def sample_indices(total: int, fps: float, sample_fps: float = SAMPLE_FPS, max_frames: int = MAX_FRAMES) -> list[int]:
    n = min(max(1, int(total / fps * sample_fps)), max_frames, total)
    return [i * total // n for i in range(n)]


def timestamp_text(seconds: float) -> str:
    """mm:ss, as the reference writes a frame's time."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_frames(folder: str | Path, fps: float = 1.0) -> Video:
    """A folder of frame images (sorted by name, numbers in names compared as numbers) at `fps`."""
    folder = Path(folder).expanduser()
    if fps <= 0:
        raise ValueError(f"fps: must be positive, got {fps}")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise ValueError(f"{folder}: no frame images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    picks = sample_indices(len(files), fps)
    return Video([load_image(files[i]) for i in picks], [i / fps for i in picks])


def load_video_file(path: str | Path) -> Video:
    """A video file decoded with PyAV."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: no such video file")
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: video files need PyAV (pip install av); a folder of frames works without it") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if fps <= 0:
                raise ValueError(f"{path}: the video's frame rate is unknown")
            total = int(stream.frames or 0)
            # With the frame count in the header only the sampled frames are kept; without it, every
            # frame is decoded first (as small as the file allows) and sampled after.
            wanted = set(sample_indices(total, fps)) if total else None
            kept: dict[int, Image] = {}
            count = 0
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    kept[count] = from_pil(frame.to_image())
                count += 1
    except av.FFmpegError as e:
        raise ValueError(f"{path}: cannot decode the video ({e})") from None
    if not count:
        raise ValueError(f"{path}: the video has no frames")
    picks = sample_indices(count, fps)
    if any(i not in kept for i in picks):  # the header's frame count was wrong: take the nearest kept frames
        picks = sorted(min(kept, key=lambda k: abs(k - i)) for i in picks)
    return Video([kept[i] for i in picks], [i / fps for i in picks])


def load_video(path: str | Path, fps: float = 1.0) -> Video:
    """A folder of frames (at `fps`) or a video file."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_frames(path, fps)
    return load_video_file(path)
