"""One atomic-write helper serves every file the package writes (images, videos, downloads, tiny models, tables)."""

import os

import pytest

from aitk_inference.pipelines.atomic import atomic_path


def test_a_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "out.png"
    with atomic_path(str(target)) as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as f:
            f.write("new")
        assert not target.exists()
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["out.png"]


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.json").write_text("{}")
    with atomic_path(str(target), folder=True) as staging:
        with open(os.path.join(staging, "model_index.json"), "w") as f:
            f.write("{}")
    assert os.listdir(target) == ["model_index.json"]
    with pytest.raises(ValueError):
        with atomic_path(str(target), folder=True) as staging:
            raise ValueError("save failed")
    assert os.listdir(target) == ["model_index.json"]
    assert sorted(os.listdir(tmp_path)) == ["model"]
