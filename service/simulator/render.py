"""Render a short pan/zoom video from a still image, as ModelsLab's img2video would."""

from __future__ import annotations

import io
import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
from PIL import Image, ImageOps, UnidentifiedImageError

#: Zoom factor reached on the last frame (1.0 on the first).
MAX_ZOOM = 1.3
#: Largest decoded init image, in pixels; bigger images are refused, not decoded.
MAX_SOURCE_PIXELS = 40_000_000
FFMPEG_TIMEOUT = 120.0
_MARKER_BITS = 5  # enough to tell apart 32 consecutive frames


class RenderError(Exception):
    """The image could not be decoded or the video could not be encoded."""


def render_video(
    image_bytes: bytes,
    *,
    width: int,
    height: int,
    num_frames: int,
    fps: int,
    output_type: str,
) -> bytes:
    """Return an MP4 (H.264, yuv420p) or GIF of ``num_frames`` frames panning over the image.

    MP4 dimensions are rounded down to even numbers, as yuv420p requires.
    """
    if output_type not in ("mp4", "gif"):
        raise ValueError(f"unsupported output_type {output_type!r}")
    if width < 2 or height < 2 or num_frames < 1 or fps < 1:
        raise ValueError("width and height must be >= 2, num_frames and fps >= 1")
    if output_type == "mp4":
        width, height = width - width % 2, height - height % 2
    source = _decode_image(image_bytes, width, height)
    frames = [
        _render_frame(source, width, height, index, num_frames) for index in range(num_frames)
    ]
    if output_type == "gif":
        return _encode_gif(frames, fps)
    return _encode_mp4(frames, width, height, fps)


def probe_image(image_bytes: bytes) -> tuple[int, int]:
    """Return the (width, height) of an encoded image, or raise ``RenderError``."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            if image.width * image.height > MAX_SOURCE_PIXELS:
                raise RenderError(f"image too large: {image.width}x{image.height}")
            image.verify()
            return image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise RenderError(f"not a readable image: {exc}") from exc


def _decode_image(image_bytes: bytes, width: int, height: int) -> Image.Image:
    """Decode, orient and crop the image to the target aspect, at most twice the target size."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as opened:
            if opened.width * opened.height > MAX_SOURCE_PIXELS:
                raise RenderError(f"image too large: {opened.width}x{opened.height}")
            opened.draft("RGB", (width * 2, height * 2))  # cheap JPEG downscale
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise RenderError(f"not a readable image: {exc}") from exc
    # Work at up to twice the target resolution so zooming in stays sharp.
    factor = max(1.0, min(2.0, image.width / width, image.height / height))
    working_size = (round(width * factor), round(height * factor))
    return ImageOps.fit(image, working_size, method=Image.Resampling.LANCZOS)


def _render_frame(
    source: Image.Image, width: int, height: int, index: int, num_frames: int
) -> Image.Image:
    """Return frame ``index``: a crop that zooms in and drifts towards the lower right."""
    progress = index / (num_frames - 1) if num_frames > 1 else 0.0
    eased = progress * progress * (3 - 2 * progress)  # smoothstep
    zoom = 1.0 + (MAX_ZOOM - 1.0) * eased
    crop_w, crop_h = source.width / zoom, source.height / zoom
    centre_x = source.width * (0.5 + 0.08 * eased)
    centre_y = source.height * (0.5 + 0.05 * eased)
    left = min(max(centre_x - crop_w / 2, 0.0), source.width - crop_w)
    top = min(max(centre_y - crop_h / 2, 0.0), source.height - crop_h)
    frame = source.resize(
        (width, height),
        Image.Resampling.BICUBIC,
        box=(left, top, left + crop_w, top + crop_h),
    )
    _stamp_frame_index(frame, index)
    return frame


def _stamp_frame_index(frame: Image.Image, index: int) -> None:
    """Draw the frame index in binary in the bottom-right corner.

    GIF encoders merge identical consecutive frames; the marker keeps every frame
    distinct so a clip always has exactly ``num_frames`` frames.
    """
    cell = max(1, min(frame.width // (4 * _MARKER_BITS), frame.height // 8, 4))
    top = frame.height - cell
    for bit in range(_MARKER_BITS):
        colour = (255, 255, 255) if index >> bit & 1 else (0, 0, 0)
        left = frame.width - (bit + 1) * cell
        frame.paste(colour, (left, top, left + cell, top + cell))


def _encode_gif(frames: list[Image.Image], fps: int) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=max(20, round(1000 / fps)),
        loop=0,
    )
    return buffer.getvalue()


def _encode_mp4(frames: list[Image.Image], width: int, height: int, fps: int) -> bytes:
    raw = b"".join(frame.tobytes() for frame in frames)
    with tempfile.TemporaryDirectory(prefix="motionhook-sim-") as tmp:
        target = Path(tmp) / "out.mp4"
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-video_size",
            f"{width}x{height}",
            "-framerate",
            str(fps),
            "-i",
            "pipe:0",
            "-an",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-threads",
            "1",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            "-y",
            str(target),
        ]
        try:
            subprocess.run(
                command, input=raw, capture_output=True, check=True, timeout=FFMPEG_TIMEOUT
            )
        except subprocess.CalledProcessError as exc:
            detail = exc.stderr.decode(errors="replace").strip()[-500:]
            raise RenderError(f"ffmpeg failed ({exc.returncode}): {detail}") from exc
        except subprocess.TimeoutExpired as exc:
            raise RenderError(f"ffmpeg timed out after {FFMPEG_TIMEOUT:.0f}s") from exc
        return target.read_bytes()
