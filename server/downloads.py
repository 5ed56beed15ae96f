"""Fetching untrusted inputs: URL LoRAs and control images, with caps and checks before anything uses them.

* http(s) only, with a host and no credentials, on the first URL and on every redirect (followed by hand, at most
  ``MAX_REDIRECTS``);
* never inward: the host is resolved, and every address it resolves to must be public (not loopback, private,
  link-local, multicast, reserved or otherwise not globally routable, IPv4 or IPv6, mapped and NAT64 forms included);
  the connection then goes to the address that was checked (the URL is pinned to it, with the original ``Host``
  header and TLS server name), so a DNS answer that changes between check and connect cannot turn it inward. Hosts,
  addresses and networks on the ``FetchPolicy`` allow-list (``AITK_FETCH_ALLOWLIST``) are exempt, for an internal
  model store. Refusals say what was refused and why, never what answered there;
* a byte cap enforced on ``Content-Length`` and again while streaming, and a total time cap per fetch;
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
import contextlib
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import urljoin, urlsplit, urlunsplit

from ..pipelines.atomic import atomic_path

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit on the JSON header
IO_TIMEOUT_S = 30.0  # connect, and each read
ALLOWLIST_HINT = "set AITK_FETCH_ALLOWLIST to fetch from an internal model store on purpose"
#: IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64); the IPv4 address is what is reached
NAT64_NETWORKS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class DownloadError(ValueError):
    """A URL input could not be fetched or is not what it claims to be."""


@dataclass(frozen=True)
class FetchPolicy:
    """Where outbound fetches may go and for how long.

    Args:
        allow_hosts (tuple[str], defaults to none): hosts (and their subdomains) fetched from whatever they resolve to.
        allow_networks (tuple[IPv4Network | IPv6Network], defaults to none): internal addresses that may be fetched.
        timeout_s (float, defaults to 900): total seconds one fetch may take, redirects included.
    """

    allow_hosts: tuple = ()
    allow_networks: tuple = ()
    timeout_s: float = 900.0

    @classmethod
    def from_entries(cls, entries: Sequence[str], timeout_s: float = 900.0) -> "FetchPolicy":
        """Split ``AITK_FETCH_ALLOWLIST`` entries into addresses/networks (``10.0.0.5``, ``10.1.0.0/16``, ``fd00::/8``)
        and host names (``models.internal``)."""
        hosts, networks = [], []
        for entry in entries:
            entry = entry.strip().lower()
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not entry or "/" in entry or ":" in entry:
                    raise ValueError(f"AITK_FETCH_ALLOWLIST entry {entry!r} is neither a host name nor an IP "
                                     "address or network (e.g. models.internal, 10.0.0.5, 10.1.0.0/16).") from None
                hosts.append(entry.strip("."))
        return cls(tuple(hosts), tuple(networks), timeout_s)

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == h or host.endswith("." + h) for h in self.allow_hosts)

    def allows_address(self, address) -> bool:
        return any(address.version == n.version and address in n for n in self.allow_networks)


def address_refusal(address) -> str | None:
    """Why ``address`` (an ``ipaddress`` object) is not fetched from, or None for a public address."""
    if address.version == 6:
        embedded = address.ipv4_mapped or next(
            (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) for n in NAT64_NETWORKS if address in n), None)
        if embedded is not None:
            return address_refusal(embedded)
        if address.sixtofour is not None and address_refusal(address.sixtofour):
            return f"a 6to4 address wrapping {address_refusal(address.sixtofour)}"
    for attribute, kind in (("is_loopback", "a loopback"), ("is_unspecified", "an unspecified"),
                            ("is_link_local", "a link-local"), ("is_multicast", "a multicast"),
                            ("is_private", "a private"), ("is_reserved", "a reserved"), ("is_site_local", "a site-local")):
        if getattr(address, attribute, False):
            return f"{kind} address"
    return None if address.is_global else "an address that is not publicly routable"


def _literal_address(host: str):
    """The address a numeric host means, in any form the resolver accepts (``127.1``, ``2130706433``, ``0x7f.1``,
    ``::ffff:127.0.0.1``), without a DNS query; None for a name."""
    try:
        info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(info[0][4][0].split("%")[0])


def without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` removed, for messages and records."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@?#]*@", r"\1", url)


def _refuse(url: str, host: str, why: str) -> DownloadError:
    return DownloadError(f"URL {url!r} is refused: its host {host!r} {why}; the server does not fetch from internal "
                         f"addresses ({ALLOWLIST_HINT}).")


def check_url(url: str, policy: FetchPolicy | None = None) -> str:
    """Return ``url`` if it is http(s) with a host, no credentials and no internal literal address, else raise
    DownloadError; HF ``/blob/`` becomes ``/resolve/``. Host names are resolved and checked when fetched."""
    policy = policy or FetchPolicy()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise DownloadError(f"URL {url!r} is not a valid URL.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"URL {url!r} is not allowed: only http:// and https:// URLs with a host are accepted.")
    if parts.username is not None or parts.password is not None:
        raise DownloadError("A URL with credentials (user:password@host) is not accepted; it is not echoed here.")
    if "/tree/" in parts.path:
        raise DownloadError(f"URL {url!r} points to a folder (/tree/); give the URL of one .safetensors file.")
    host = parts.hostname
    if not policy.allows_host(host):
        if host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost"):
            raise _refuse(url, host, "is a loopback name")
        address = _literal_address(host)
        if address is not None and not policy.allows_address(address):
            why = address_refusal(address)
            if why:
                raise _refuse(url, host, f"is {why}")
    return url.replace("/blob/", "/resolve/", 1)


def resolve_checked(url: str, policy: FetchPolicy) -> list[str]:
    """Resolve ``url``'s host and return the addresses to connect to, in the resolver's order; raise DownloadError if
    any of them is internal (unless allow-listed): a name answering with both a public and an internal address is
    refused."""
    parts = urlsplit(url)
    host = parts.hostname
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise DownloadError(f"Could not resolve the host of {url!r}.") from None
    addresses = list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
    if not policy.allows_host(host):
        for text in addresses:
            address = ipaddress.ip_address(text)
            why = address_refusal(address)
            if why and not policy.allows_address(address):
                raise _refuse(url, host, f"resolves to {why}")
    return addresses


def _pinned(url: str, address: str) -> tuple[str, dict, dict]:
    """``url`` with its host replaced by ``address``, plus the ``Host`` header and TLS server name of the original."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    target = f"[{address}]" if ":" in address else address
    pinned = urlunsplit((parts.scheme, target + port, parts.path or "/", parts.query, ""))
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return pinned, {"Host": host + port}, extensions


@contextlib.contextmanager
def _get_checked(client, url: str, headers: dict, policy: FetchPolicy):
    """GET ``url`` (streamed, no redirects followed) from one of the addresses its host resolves to, all checked;
    the next address is tried only when connecting to one fails."""
    import httpx

    addresses = resolve_checked(url, policy)
    for i, address in enumerate(addresses):
        pinned, host, extensions = _pinned(url, address)
        request = client.build_request("GET", pinned, headers={**headers, **host}, extensions=extensions)
        try:
            response = client.send(request, stream=True)
        except httpx.ConnectError:
            if i + 1 == len(addresses):
                raise
            continue
        try:
            yield response
        finally:
            response.close()
        return


def _host_allowed(url: str, hosts) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in hosts)


def _stream(url: str, sink, max_bytes: int, token: str | None, token_hosts, should_stop: Callable[[], None] | None,
            policy: FetchPolicy):
    """GET ``url`` into ``sink`` (a binary file), following http(s) redirects by hand, each hop checked and pinned to
    its checked address; returns the content type."""
    import httpx

    deadline = time.monotonic() + policy.timeout_s

    def check_time() -> None:
        if time.monotonic() > deadline:
            raise DownloadError(f"{url} took longer than the {policy.timeout_s:g}-second limit "
                                "(AITK_DOWNLOAD_TIMEOUT); download stopped.")

    # trust_env=False: an HTTP(S)_PROXY from the environment would connect elsewhere than the checked address
    with httpx.Client(follow_redirects=False, timeout=IO_TIMEOUT_S, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_time()
            headers = {"Authorization": f"Bearer {token}"} if token and _host_allowed(url, token_hosts) else {}
            try:
                with _get_checked(client, url, headers, policy) as response:
                    if response.is_redirect:
                        url = check_url(urljoin(url, response.headers.get("location", "")), policy)
                        continue
                    if response.status_code != 200:
                        raise DownloadError(f"GET {url} returned HTTP {response.status_code}.")
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                        raise DownloadError(f"{url} is {int(declared)} bytes, over the {max_bytes}-byte limit.")
                    received = 0
                    for chunk in response.iter_raw():  # as it arrives: a trickle still meets the time cap
                        received += len(chunk)
                        if received > max_bytes:
                            raise DownloadError(f"{url} sent more than the {max_bytes}-byte limit; download stopped.")
                        check_time()
                        if should_stop is not None:
                            should_stop()
                        sink.write(chunk)
                    if declared is not None and declared.isdigit() and received != int(declared):
                        raise DownloadError(f"{url} was truncated: {received} of {declared} bytes received.")
                    return response.headers.get("content-type", "")
            except httpx.TimeoutException:
                raise DownloadError(f"{url} did not answer within {IO_TIMEOUT_S:g} seconds.") from None
            except httpx.HTTPError as e:  # no details: they would tell what is (not) listening there
                raise DownloadError(f"Could not fetch {url} ({type(e).__name__}).") from None
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
               should_stop: Callable[[], None] | None = None, policy: FetchPolicy | None = None) -> tuple[str, bool]:
    """Download (or reuse from the cache) the LoRA at ``url``; returns (local path, whether it was cached).

    Args:
        url (str): http(s) URL of a ``.safetensors`` file.
        cache_dir (str): where checked files are kept, named by the URL's SHA-256.
        max_bytes (int): size cap.
        token (str, *optional*): bearer token, sent only to ``token_hosts``.
        token_hosts (Sequence[str]): hosts (and subdomains) that may receive the token.
        should_stop (callable, *optional*): called per chunk; raising from it aborts the download.
        policy (FetchPolicy, *optional*): allow-list and time cap; defaults to public addresses only, 900 s.
    """
    policy = policy or FetchPolicy()
    url = check_url(url, policy)
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
            content_type = _stream(url, f, max_bytes, token, token_hosts, should_stop, policy)
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


def fetch_image(url: str, max_bytes: int, max_pixels: int, policy: FetchPolicy | None = None):
    """Download a control image (http(s) only, public addresses unless allow-listed, capped) and decode it."""
    policy = policy or FetchPolicy()
    sink = io.BytesIO()
    _stream(check_url(url, policy), sink, max_bytes, None, (), None, policy)
    return decode_image(sink.getvalue(), max_pixels)
