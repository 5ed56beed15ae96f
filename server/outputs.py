"""Writing outputs: always to a temporary name first, then renamed, so a crash never leaves a half-written file
under a final name."""

from __future__ import annotations

EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".mp4": "video/mp4"}


def save_image(image, base: str, output_format: str, metadata: dict) -> str:
    """Write ``image`` to ``base`` + the format's extension; PNG carries ``metadata`` as a ``parameters`` text chunk."""
    from ..pipelines.media import write_image

    return write_image(image, base + EXTENSIONS[output_format], metadata)


def save_video(result, base: str, output_format: str) -> tuple[str, str]:
    """Write the first video of ``result``: an H.264 MP4 (with the audio track when the model makes one), or an
    animated WEBP when ``output_format`` is ``webp``. Returns (path, format)."""
    from ..pipelines.media import write_video

    video_format = "webp" if output_format == "webp" else "mp4"
    audio = None if result.audio is None or video_format == "webp" else result.audio[0]
    path = write_video(result.images[0], f"{base}.{video_format}", result.params.fps, audio=audio,
                       sample_rate=result.sample_rate)
    return path, video_format
