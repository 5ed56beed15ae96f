"""Read a local model folder's weight files ahead of the loader.

diffusers and transformers read a checkpoint tensor by tensor, one component after the other, and spend CPU time
between reads (building modules, converting, moving), during which the disk idles. Asking the kernel to read all the
weight files ahead (``posix_fadvise(WILLNEED)``, from a background thread) keeps the disk busy for the whole load, so a
cold load takes about as long as reading the bytes once. It is skipped when the files would not fit in the memory
the OS has free (the pages read ahead would push each other out) and where the call does not exist (non-Linux).
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".sft")


def weight_files(folder: str) -> list[str]:
    """The weight files under ``folder``, in a stable order (component folders sorted, as diffusers loads them)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in sorted(files) if name.endswith(WEIGHT_SUFFIXES))
    return found


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def start_readahead(folder: str) -> threading.Thread | None:
    """Start reading ``folder``'s weight files into the page cache in the background; returns the thread, or None
    when read-ahead does not apply (not a folder, no ``posix_fadvise``, or not enough free memory)."""
    if not os.path.isdir(folder) or not hasattr(os, "posix_fadvise"):
        return None
    files = weight_files(folder)
    total = sum(os.path.getsize(path) for path in files)
    free = available_memory_bytes()
    if not files or free is None or total > 0.8 * free:
        logger.debug("No read-ahead for %s (%d bytes of weights, %s bytes free)", folder, total, free)
        return None
    thread = threading.Thread(target=_advise, args=(files,), name="aitk-readahead", daemon=True)
    thread.start()
    return thread


def _advise(files: list[str]) -> None:
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
