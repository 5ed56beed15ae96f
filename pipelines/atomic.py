"""Writing files and folders so that a reader never sees half of one: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading


@contextlib.contextmanager
def atomic_path(path: str, folder: bool = False):
    """Yield a temporary path beside ``path`` to write to; when the block succeeds it replaces ``path`` in one rename,
    when it fails it is deleted and ``path`` is left as it was.

    Args:
        path (str): the file (or folder) to write; its parent folder is created.
        folder (bool, defaults to False): yield an empty folder instead of a file name (an existing ``path`` folder
            is replaced).

    A temporary file keeps ``path``'s extension, because some writers (PyAV, Pillow) pick the format from it.
    """
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    if folder:
        tmp = tempfile.mkdtemp(prefix=f".{stem}.", suffix=".partial", dir=parent)
    else:
        tmp = os.path.join(parent, f".{stem}.{os.getpid()}.{threading.get_ident()}.partial{ext}")
    try:
        yield tmp
        if not folder:  # the bytes reach the disk before the name does, so a power loss never leaves a short file
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        if folder and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
