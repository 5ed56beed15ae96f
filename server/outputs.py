"""Writing outputs: always to a temporary name first, then renamed, so a crash never leaves a half-written file
under a final name."""

from __future__ import annotations

import json
import os

FORMATS = {"png": ("PNG", ".png", "image/png"), "jpeg": ("JPEG", ".jpg", "image/jpeg"), "webp": ("WEBP", ".webp", "image/webp")}
MEDIA_TYPES = {ext: media for _, ext, media in FORMATS.values()}


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


def save_video(result, base: str) -> str:
    """Write the first video of ``result`` as an animated WEBP at its fps."""
    frames = result.to_pil()
    path = base + ".webp"
    tmp = f"{path}.partial"
    frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / result.params.fps),
                   loop=0, quality=95)
    os.replace(tmp, path)
    return path
