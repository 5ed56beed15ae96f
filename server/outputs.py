"""Writing outputs: always to a temporary name first, then renamed, so a crash never leaves a half-written file
under a final name; and the retention sweep that keeps a long-running server from filling its disk."""

from __future__ import annotations

import os

EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".mp4": "video/mp4",
               ".flac": "audio/flac"}
#: the kinds of entries of a task's ``outputs``
OUTPUT_KINDS = ("images", "videos", "audios")


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


def save_audio(result, base: str) -> str:
    """Write the first waveform of an audio-only ``result`` as 16-bit FLAC."""
    from ..pipelines.media import write_audio

    return write_audio(result.audio[0], f"{base}.flac", result.sample_rate)


def output_files(task: dict) -> list[str]:
    outputs = task.get("outputs") or {}
    return [entry["file_path"] for kind in OUTPUT_KINDS for entry in outputs.get(kind, [])]


def sweep_outputs(store, max_age: float, max_bytes: int, now: float | None = None) -> int:
    """Apply the retention settings: delete the output files of requests finished more than ``max_age`` seconds ago
    (0: no age limit), then, oldest first, of as many more as it takes to bring the kept files to ``max_bytes`` or
    less (0: no size cap). Each such task records ``outputs_deleted_at``; returns how many tasks lost their files."""
    import time
    from datetime import datetime

    from .store import utc_now

    now = time.time() if now is None else now
    kept = []
    for task in store.with_outputs():
        files = output_files(task)
        finished = datetime.fromisoformat(task["finished_at"].replace("Z", "+00:00")).timestamp()
        kept.append((task, files, sum(os.path.getsize(f) for f in files if os.path.isfile(f)), finished))
    total = sum(size for _, _, size, _ in kept)
    deleted = 0
    for task, files, size, finished in kept:  # oldest first
        if not ((max_age and now - finished > max_age) or (max_bytes and total > max_bytes)):
            continue
        for path in files:
            if os.path.isfile(path):
                os.remove(path)
        store.update(task["id"], outputs_deleted_at=utc_now())
        total -= size
        deleted += 1
    return deleted
