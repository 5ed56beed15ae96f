"""Writing outputs: always to a temporary name first, then renamed, so a crash never leaves a half-written file
under a final name."""

from __future__ import annotations

import json
import os

FORMATS = {"png": ("PNG", ".png", "image/png"), "jpeg": ("JPEG", ".jpg", "image/jpeg"), "webp": ("WEBP", ".webp", "image/webp")}
MEDIA_TYPES = {**{ext: media for _, ext, media in FORMATS.values()}, ".mp4": "video/mp4"}


def save_image(image, base: str, output_format: str, metadata: dict) -> str:
    """Write ``image`` to ``base`` + the format's extension; PNG carries ``metadata`` as a ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    pil_format, ext, _ = FORMATS[output_format]
    path = base + ext
    tmp = f"{path}.partial"
    if pil_format == "PNG":
        info = PngInfo()
        info.add_text("parameters", json.dumps(metadata))
        image.save(tmp, format="PNG", pnginfo=info)
    else:
        image.save(tmp, format=pil_format, quality=95)
    os.replace(tmp, path)
    return path


def save_video(result, base: str, output_format: str) -> tuple[str, str]:
    """Write the first video of ``result``: an H.264 MP4 (with the audio track when the model makes one), or an
    animated WEBP when ``output_format`` is ``webp``. Returns (path, format)."""
    from ..pipelines.video_io import write_mp4, write_webp

    frames, fps = result.images[0], result.params.fps
    if output_format == "webp":
        return write_webp(frames, base + ".webp", fps), "webp"
    audio = None if result.audio is None else result.audio[0]
    return write_mp4(frames, base + ".mp4", fps, audio=audio, sample_rate=result.sample_rate), "mp4"
