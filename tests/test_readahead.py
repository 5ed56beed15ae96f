"""Weight-file read-ahead on load (pipelines/runtime/readahead.py)."""

import os

import pytest

from aitk_inference.pipelines.runtime import readahead


def test_read_ahead_covers_every_weight_file_of_a_local_folder(tiny_dir):
    folder = tiny_dir("flux")
    files = readahead.weight_files(folder)
    components = {os.path.basename(os.path.dirname(path)) for path in files}
    assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= components
    assert all(path.endswith(".safetensors") for path in files) and files == sorted(files)
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform: read-ahead is off by design")
    thread = readahead.start_readahead(folder)
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_read_ahead_is_skipped_when_it_cannot_help(tiny_dir, tmp_path, monkeypatch):
    assert readahead.start_readahead(str(tmp_path / "missing")) is None  # a hub id, not a folder
    assert readahead.start_readahead(str(tmp_path)) is None  # no weight files
    # more weights than the free memory: pages read ahead would push each other out
    monkeypatch.setattr(readahead, "available_memory_bytes", lambda: 1024)
    assert readahead.start_readahead(tiny_dir("flux")) is None
