"""`python -m aitk_inference demo --model ID` works for every registered id (the README's promise), in-process."""

import os

import pytest

from aitk_inference.pipelines.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_id", list(REGISTRY))
def test_demo_runs_for_every_model(model_id, tiny_cache, tmp_path, capsys):
    from aitk_inference.cli import main

    assert main(["demo", "--model", model_id, "--out", str(tmp_path / "demo.png"), "--quiet"]) == 0
    out = capsys.readouterr().out
    written = [name for name in os.listdir(tmp_path)]
    assert "demo done" in out and "modules" in out
    spec = REGISTRY[model_id]
    assert written == ["demo.flac" if spec.audio_only else "demo.mp4" if spec.is_video else "demo.png"]


@pytest.mark.parametrize("model_id,native", [
    ("wan22_14b_t2v", ["tiny_aitk_wan_high_noise.safetensors", "tiny_aitk_wan_low_noise.safetensors"]),
    ("wan21_1b", ["tiny_aitk_wan.safetensors"]),
    ("flux2_klein_4b", ["tiny_aitk_bfl.safetensors"]),
    ("chroma", ["tiny_aitk_bfl.safetensors"]),
    ("minimax_h3", ["tiny_aitk_minimax_h3.safetensors"]),
    ("ace_step_15", ["tiny_aitk_ace_step.safetensors", "tiny_aitk_ace_step_lokr.safetensors"]),
])
def test_make_tiny_writes_the_layout_ai_toolkit_saves(model_id, native, tiny_cache, tmp_path):
    """Besides the generic layouts, make-tiny writes the family's own ai-toolkit layout (original Wan names with a
    high/low pair for the two-expert models, BFL names), and those files load by name alone, as from the CLI."""
    from aitk_inference.cli import main
    from aitk_inference.pipelines import load_pipeline

    folder = tmp_path / "tiny"
    assert main(["make-tiny", "--model", model_id, "--out", str(folder)]) == 0
    assert set(native) <= set(os.listdir(folder / "loras"))
    pipeline = load_pipeline(model_id, base=str(folder), device="cpu", dtype="fp32")
    summaries = pipeline.set_loras([str(folder / "loras" / name) for name in native])
    assert all(s["modules"] > 0 for s in summaries)
    result = pipeline.generate(prompt="x", width=64, height=64, steps=1, **(
        {"num_frames": pipeline.spec.video.frames(1)} if pipeline.spec.is_video else {}))
    assert (result.audio if result.is_audio else result.images).size


def test_processes_sharing_a_tiny_cache_build_each_model_once(tmp_path, monkeypatch):
    """Parallel test workers share one tiny-model folder: two callers that both find the model missing build it once;
    the second waits for the first and reads its folder instead of replacing it under a reader."""
    import threading
    import time

    from aitk_inference import tiny

    builds = []
    build = tiny.save_tiny_pipeline

    def slow_build(model_id, out_dir, **variant):
        builds.append(model_id)
        time.sleep(1.0)  # both callers are past their first look by now
        return build(model_id, out_dir, **variant)

    monkeypatch.setattr(tiny, "save_tiny_pipeline", slow_build)
    folders = []
    callers = [threading.Thread(target=lambda: folders.append(tiny.tiny_model_dir("sd15", str(tmp_path))))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert builds == ["sd15"]
    assert len(folders) == 2 and folders[0] == folders[1]
    assert os.path.isfile(os.path.join(folders[0], "model_index.json"))
