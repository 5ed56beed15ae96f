"""`python -m aitk_inference demo --model ID` works for every registered id (the README's promise), in-process."""

import os

import pytest

from aitk_inference.pipelines.registry import REGISTRY


@pytest.mark.parametrize("model_id", list(REGISTRY))
def test_demo_runs_for_every_model(model_id, tiny_cache, tmp_path, capsys):
    from aitk_inference.cli import main

    assert main(["demo", "--model", model_id, "--out", str(tmp_path / "demo.png"), "--quiet"]) == 0
    out = capsys.readouterr().out
    written = [name for name in os.listdir(tmp_path)]
    assert "demo done" in out and "modules" in out
    assert written == ["demo.mp4"] if REGISTRY[model_id].is_video else written == ["demo.png"]
