"""Fetching untrusted inputs: URL LoRAs and control images, with caps and checks before anything uses them.

* http(s) only, on the first URL and on every redirect (followed by hand, at most ``MAX_REDIRECTS``);
* a byte cap enforced on ``Content-Length`` and again while streaming;
* an HF token is sent only to ``token_hosts`` (and never to a redirect target elsewhere), per request, with no
  global login;
* a LoRA is written to a temporary name, checked as safetensors from its header (header size, JSON, every tensor's
  byte range, total length: an HTML page or a truncated file fails here), then renamed into a cache keyed by the
  URL's SHA-256;
* images are decoded with Pillow only after their pixel count is checked against the cap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import os
import struct
from typing import Callable
from urllib.parse import urljoin, urlsplit

from ..pipelines.atomic import atomic_path

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on the JSON header
CHUNK = 1024**2
TIMEOUT_S = 60.0


class DownloadError(ValueError):
    """A URL input could not be fetched or is not what it claims to be."""


def check_url(url: str) -> str:
    """Return ``url`` if it is http(s) with a host, else raise DownloadError; HF ``/blob/`` becomes ``/resolve/``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"URL {url!r} is not allowed: only http:// and https:// URLs with a host are accepted.")
    if "/tree/" in parts.path:
        raise DownloadError(f"URL {url!r} points to a folder (/tree/); give the URL of one .safetensors file.")
    return url.replace("/blob/", "/resolve/", 1)


def _host_allowed(url: str, hosts) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in hosts)


def _stream(url: str, sink, max_bytes: int, token: str | None, token_hosts, should_stop: Callable[[], None] | None):
    """GET ``url`` into ``sink`` (a binary file), following http(s) redirects by hand; returns the content type."""
    import httpx

    with httpx.Client(follow_redirects=False, timeout=TIMEOUT_S) as client:
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Authorization": f"Bearer {token}"} if token and _host_allowed(url, token_hosts) else {}
            with client.stream("GET", url, headers=headers) as response:
                if response.is_redirect:
                    url = check_url(urljoin(url, response.headers.get("location", "")))
                    continue
                if response.status_code != 200:
                    raise DownloadError(f"GET {url} returned HTTP {response.status_code}.")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise DownloadError(f"{url} is {int(declared)} bytes, over the {max_bytes}-byte limit.")
                received = 0
                for chunk in response.iter_raw(CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise DownloadError(f"{url} sent more than the {max_bytes}-byte limit; download stopped.")
                    if should_stop is not None:
                        should_stop()
                    sink.write(chunk)
                if declared is not None and declared.isdigit() and received != int(declared):
                    raise DownloadError(f"{url} was truncated: {received} of {declared} bytes received.")
                return response.headers.get("content-type", "")
        raise DownloadError(f"{url}: more than {MAX_REDIRECTS} redirects.")


def check_safetensors(path: str) -> None:
    """Raise DownloadError unless ``path`` is a complete safetensors file (read from its header; no tensor loaded)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DownloadError(f"Not a safetensors file: only {size} bytes.")
        if head.lstrip()[:1] == b"<":
            raise DownloadError("Got an HTML page, not a safetensors file; give a direct download link "
                                "(for Hugging Face: https://huggingface.co/<repo>/resolve/main/<file>.safetensors).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise DownloadError(f"Not a safetensors file: header length {header_len} does not fit a {size}-byte file.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DownloadError("Not a safetensors file: its header is not JSON.") from None
    if not isinstance(header, dict):
        raise DownloadError("Not a safetensors file: its header is not a JSON object.")
    data_len = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise DownloadError(f"Not a safetensors file: tensor {name!r} has no valid data_offsets.")
        end = max(end, offsets[1])
    if end != data_len:
        raise DownloadError(f"Incomplete or corrupt safetensors file: the header describes {end} data bytes, "
                            f"the file holds {data_len} (truncated download?).")


def fetch_lora(url: str, cache_dir: str, max_bytes: int, token: str | None = None, token_hosts=(),
               should_stop: Callable[[], None] | None = None) -> tuple[str, bool]:
    """Download (or reuse from the cache) the LoRA at ``url``; returns (local path, whether it was cached).

    Args:
        url (str): http(s) URL of a ``.safetensors`` file.
        cache_dir (str): where checked files are kept, named by the URL's SHA-256.
        max_bytes (int): size cap.
        token (str, *optional*): bearer token, sent only to ``token_hosts``.
        token_hosts (Sequence[str]): hosts (and subdomains) that may receive the token.
        should_stop (callable, *optional*): called per chunk; raising from it aborts the download.
    """
    url = check_url(url)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:32] + ".safetensors")
    if os.path.isfile(path):
        try:
            check_safetensors(path)
            return path, True
        except DownloadError:
            logger.warning("Cached LoRA %s is invalid; downloading it again.", path)
            os.remove(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            content_type = _stream(url, f, max_bytes, token, token_hosts, should_stop)
        if content_type.startswith("text/html"):
            raise DownloadError(f"{url} returned an HTML page, not a safetensors file; give a direct download link.")
        check_safetensors(tmp)
    return path, False


def decode_image(data: bytes, max_pixels: int):
    """Decode image bytes with Pillow after checking the pixel count; returns an RGB image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise DownloadError(f"Control image is {width}x{height}, over the {max_pixels}-pixel limit.")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise DownloadError(f"Control image could not be decoded as an image: {e}") from None


def decode_base64_image(text: str, max_bytes: int, max_pixels: int):
    """Decode a base64 control image (plain, or a ``data:image/...;base64,`` URL) within the caps."""
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise DownloadError(f"Control image is over the {max_bytes}-byte limit.")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DownloadError("Control image is neither an http(s) URL nor valid base64.") from None
    return decode_image(data, max_pixels)


def fetch_image(url: str, max_bytes: int, max_pixels: int):
    """Download a control image (http(s) only, capped) and decode it."""
    sink = io.BytesIO()
    _stream(check_url(url), sink, max_bytes, None, (), None)
    return decode_image(sink.getvalue(), max_pixels)
