"""Writing generated media: images (PNG with the generation parameters, JPEG, WEBP), and videos as H.264 MP4 (with
an optional AAC audio track) through PyAV, or animated WEBP.

Frames are float32 ``[T, H, W, C]`` in 0..1 (one item of ``GenerationResult.images``) or uint8. Files are written to a
temporary name in the target folder and renamed when complete, so a reader never sees half a file.
"""

from __future__ import annotations

import os
from fractions import Fraction

from .atomic import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".webp")
#: lossless audio containers and the PyAV codec each is written with (16-bit samples)
AUDIO_CODECS = {".flac": "flac", ".wav": "pcm_s16le"}
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
IMAGE_QUALITY = 95  # JPEG/WEBP stills
MP4_CRF = 18  # visually lossless for previews; libx264's default is 23
WEBP_QUALITY = 80  # what ai-toolkit writes its animated WEBP previews with


def _frames_uint8(frames):
    import numpy as np

    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] not in (3, 4):
        raise ValueError(f"Video frames must be [T, H, W, 3], got shape {tuple(array.shape)}.")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def _check_fps(fps) -> int:
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 120:
        raise ValueError(f"`fps` must be an integer in 1..120, got {fps!r}.")
    return fps


def write_mp4(frames, path: str, fps: int, audio=None, sample_rate: int | None = None,
              crf: int | None = MP4_CRF) -> str:
    """Write an H.264 (yuv420p) MP4.

    Args:
        frames (array): ``[T, H, W, 3]`` float in 0..1 or uint8; H and W must be even (H.264 4:2:0).
        path (str): the ``.mp4`` file to write; its folder is created.
        fps (int): frames per second, 1..120.
        audio (array, *optional*): ``[channels, samples]`` (or ``[samples]``) float in -1..1, muxed as AAC.
        sample_rate (int, *optional*): the audio sample rate; required with ``audio``.
        crf (int, *optional*, defaults to 18): libx264's constant rate factor; None leaves the encoder's default (23),
            as diffusers' ``encode_video`` does (ai-toolkit's LTX-2 previews).

    Returns:
        str: ``path``.
    """
    import av
    import numpy as np

    video = _frames_uint8(frames)
    fps = _check_fps(fps)
    height, width = video.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {width}x{height}; crop or resize by one pixel.")
    if audio is not None:
        if not sample_rate or sample_rate <= 0:
            raise ValueError("`sample_rate` is required with `audio` (e.g. 24000 or 48000).")
        audio = np.asarray(audio, dtype=np.float32)
        audio = audio[None] if audio.ndim == 1 else audio
        if audio.ndim != 2 or audio.shape[0] not in (1, 2):
            raise ValueError(f"`audio` must be [channels (1 or 2), samples], got shape {tuple(audio.shape)}.")

    with atomic_path(path) as tmp, av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if crf is not None:
            stream.options = {"crf": str(crf)}
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=int(sample_rate))
            audio_stream.layout = "stereo" if audio.shape[0] == 2 else "mono"
        for array in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
        if audio_stream is not None:
            # planar float ("fltp"): one row per channel
            frame = av.AudioFrame.from_ndarray(np.clip(audio, -1.0, 1.0), format="fltp",
                                               layout=audio_stream.layout.name)
            frame.sample_rate = int(sample_rate)
            frame.pts = 0  # the first sample starts with the first frame; the AAC priming delay goes before it
            container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode())
    return path


def write_webp(frames, path: str, fps: int) -> str:
    """Write an animated WEBP (quality 80, ``1000 // fps`` ms per frame, looping), as ai-toolkit's video previews."""
    from PIL import Image

    video = _frames_uint8(frames)
    fps = _check_fps(fps)
    images = [Image.fromarray(array) for array in video]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0,
                       quality=WEBP_QUALITY)
    return path


def write_video(frames, path: str, fps: int, audio=None, sample_rate: int | None = None) -> str:
    """Write ``frames`` as MP4 or animated WEBP, by ``path``'s extension (WEBP carries no audio)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".mp4":
        return write_mp4(frames, path, fps, audio=audio, sample_rate=sample_rate)
    if ext == ".webp":
        if audio is not None:
            raise ValueError(f"{path!r}: animated WEBP cannot carry the audio track; write .mp4 to keep it.")
        return write_webp(frames, path, fps)
    raise ValueError(f"Unsupported video file extension {ext!r} for {path!r}; use .mp4 (H.264) or .webp.")


def write_audio(audio, path: str, sample_rate: int) -> str:
    """Write a waveform as 16-bit FLAC or WAV (by ``path``'s extension) through PyAV.

    Args:
        audio (array): ``[channels (1 or 2), samples]`` (or ``[samples]``) float in -1..1; louder samples are clipped.
        path (str): the ``.flac`` or ``.wav`` file to write.
        sample_rate (int): samples per second.

    Returns:
        str: ``path``.
    """
    import av
    import numpy as np

    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_CODECS:
        raise ValueError(f"Unsupported audio file extension {ext!r} for {path!r}; use .flac or .wav.")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"`sample_rate` must be a positive integer, got {sample_rate!r}.")
    audio = np.asarray(audio, dtype=np.float32)
    audio = audio[None] if audio.ndim == 1 else audio
    if audio.ndim != 2 or audio.shape[0] not in (1, 2) or audio.shape[1] == 0:
        raise ValueError(f"`audio` must be [channels (1 or 2), samples], got shape {tuple(audio.shape)}.")
    layout = "stereo" if audio.shape[0] == 2 else "mono"
    # packed 16-bit: the channels interleaved in one row
    samples = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16).T.reshape(1, -1)
    with atomic_path(path) as tmp, av.open(tmp, mode="w", format=ext[1:]) as container:
        stream = container.add_stream(AUDIO_CODECS[ext], rate=sample_rate, layout=layout, format="s16")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="s16", layout=layout)
        frame.sample_rate = sample_rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_image(image, path: str, metadata: dict | None = None) -> str:
    """Write a PIL image by ``path``'s extension; PNG carries ``metadata`` as a JSON text chunk named ``parameters``."""
    import json

    from PIL.PngImagePlugin import PngInfo

    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"Unsupported image file extension {ext!r} for {path!r}; use .png, .jpg or .webp.")
    with atomic_path(path) as tmp:
        if IMAGE_FORMATS[ext] == "PNG":
            info = PngInfo()
            if metadata is not None:
                info.add_text("parameters", json.dumps(metadata))
            image.save(tmp, format="PNG", pnginfo=info)
        else:
            image.save(tmp, format=IMAGE_FORMATS[ext], quality=IMAGE_QUALITY)
    return path
