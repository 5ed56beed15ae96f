"""The pack inside a real ComfyUI: headless on the CPU, on loopback, driven through its HTTP API.

Runs only where ``COMFYUI_DIR`` names a ComfyUI source tree (``tests/comfyui_harness.py`` says how). Everything
ComfyUI writes goes to a temporary ``--base-directory`` holding only this pack (symlinked), the tiny FLUX and LTX-2
models and a LoRA. See ComfyUI.md.
The API runs twice: with the V3 schema nodes and with the classic fallback (``AITK_COMFY_NODE_API=classic``). The
training-job example workflow runs once, on a copy of the tiny FLUX end-to-end job (``tests/test_job_grid.py``'s).
"""

import json
import os
import time

import pytest
from comfyui_harness import ROOT, ComfyServer, make_base_dir, needs_comfyui
from test_job_grid import copy_job_with_two_checkpoints

pytestmark = [pytest.mark.comfyui, needs_comfyui]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_dir):
    """A ComfyUI base directory: this pack, the tiny FLUX and LTX-2 models under models/diffusers, a LoRA."""
    return make_base_dir(tmp_path_factory.mktemp("comfy_base"), tiny_dir)


def _workflow(**sample_inputs) -> dict:
    with open(os.path.join(ROOT, "tests", "workflows", "flux_tiny.api.json")) as f:
        workflow = json.load(f)
    workflow["3"]["inputs"].update(sample_inputs)
    return workflow


def _video_workflow() -> dict:
    """Load (tiny LTX-2) -> Sample (9 frames at 12 fps) -> Create Video (frames, fps, audio) -> Save Video."""
    return {
        "1": {"class_type": "AITKLoadPipeline", "inputs": {"model": "ltx2", "base": "tiny-ltx2", "dtype": "fp32",
                                                           "offload": "none", "device": "auto",
                                                           "lora_mode": "model default", "compile": "none"}},
        "3": {"class_type": "AITKSample", "inputs": {"pipeline": ["1", 0], "prompt": "a robot", "negative": "",
                                                     "trigger_word": "", "width": 64, "height": 64, "steps": 2,
                                                     "guidance": 4.0, "seed": 7, "batch_size": 1, "num_frames": 9,
                                                     "fps": 12, "vae_tiling": True}},
        "5": {"class_type": "CreateVideo", "inputs": {"images": ["3", 0], "fps": ["3", 4], "audio": ["3", 5]}},
        "6": {"class_type": "SaveVideo", "inputs": {"video": ["5", 0], "filename_prefix": "aitk_video",
                                                    "format": "mp4", "codec": "h264"}},
    }


def _messages(entry: dict, kind: str) -> list:
    return [data for name, data in entry["status"]["messages"] if name == kind]


@pytest.mark.parametrize("api", ["v3", "classic"])
def test_pack_in_real_comfyui(base_dir, api):
    from PIL import Image

    server = ComfyServer(str(base_dir), {"AITK_COMFY_NODE_API": api})
    try:
        # The pack loaded, its nodes and route answer
        info = server.get("/object_info/AITKSample")["AITKSample"]
        assert info["category"] == "AITK Inference" and info["output"] == ["IMAGE", "INT", "INT", "INT", "FLOAT", "AUDIO"]
        assert info["python_module"] == "custom_nodes.aitk_inference"
        apply = server.get("/object_info/AITKApplyLoRA")["AITKApplyLoRA"]
        assert "tiny_flux.safetensors" in json.dumps(apply["input"]["required"]["lora"])
        assert server.get("/aitk_inference/models")["flux"]["divisor"] == 16
        assert any(path.endswith("/aitk_inference.js") for path in server.get("/extensions"))

        # Load -> Apply LoRA -> Sample -> SaveImage
        first = server.run(_workflow())
        assert first["status"]["status_str"] == "success", _messages(first, "execution_error") or server.log_tail()
        assert first["outputs"]["3"]["aitk_effective"] == [{"width": 64, "height": 64, "seed": "7"}]
        saved = first["outputs"]["4"]["images"]
        assert len(saved) == 2
        for item in saved:
            with Image.open(base_dir / "output" / item["subfolder"] / item["filename"]) as image:
                assert image.size == (64, 64) and image.mode == "RGB"
                assert any(low < high for low, high in image.getextrema())  # a real render, not a blank

        # A strength change re-runs Apply and Sample only; the Load node (and its pipeline) stay cached
        second = server.run({**_workflow(), "2": {**_workflow()["2"], "inputs": {**_workflow()["2"]["inputs"],
                                                                                  "strength": 0.3}}})
        assert second["status"]["status_str"] == "success"
        assert "1" in _messages(second, "execution_cached")[0]["nodes"]
        assert server.log_tail(200000).count("Loaded flux from") == 1

        # A LoRA that does not exist is refused at validation, with the fix in the message
        bad = _workflow()
        bad["2"]["inputs"]["lora"] = "no_such_lora.safetensors"
        status, reply = server.post("/prompt", {"prompt": bad})
        assert status == 400 and "models/loras" in json.dumps(reply)

        # A video model: frames + fps + audio -> core Create Video -> Save Video writes an MP4 with sound
        if api == "v3":
            video = server.run(_video_workflow())
            assert video["status"]["status_str"] == "success", _messages(video, "execution_error") or server.log_tail()
            mp4s = list((base_dir / "output").rglob("aitk_video*.mp4"))
            assert len(mp4s) == 1
            import av

            with av.open(str(mp4s[0])) as container:
                stream = container.streams.video[0]
                assert sum(1 for _ in container.decode(stream)) == 9 and round(float(stream.average_rate)) == 12
                assert len(container.streams.audio) == 1

        # ComfyUI's "free memory" evicts the cached pipeline
        server.post("/free", {"unload_models": True, "free_memory": True})
        deadline = time.monotonic() + 20
        while "evicting 1 cached AITK pipeline" not in server.log_tail(200000) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert "evicting 1 cached AITK pipeline" in server.log_tail(200000)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ the training-job nodes
def _api_prompt(workflow: dict, object_info: dict) -> dict:
    """A saved (UI) workflow as the API prompt ComfyUI's frontend would queue: each node's links by the workflow's
    link table, its widget values by the node's input order (the job workflow's nodes have no seed controls)."""
    sources = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        linked = {slot["name"]: list(sources[slot["link"]]) for slot in node.get("inputs", []) if slot.get("link")}
        declared = {**info["input"]["required"], **info["input"].get("optional", {})}
        names = [name for group in ("required", "optional") for name in info["input_order"].get(group, [])]
        widgets = [name for name in names if name not in linked and
                   (isinstance(declared[name][0], list) or declared[name][0] in ("STRING", "INT", "FLOAT", "BOOLEAN",
                                                                                  "COMBO"))]
        assert len(widgets) == len(node["widgets_values"]), (node["type"], widgets, node["widgets_values"])
        prompt[str(node["id"])] = {"class_type": node["type"],
                                   "inputs": {**dict(zip(widgets, node["widgets_values"])), **linked}}
    return prompt


def test_training_job_example_runs_in_real_comfyui(base_dir, tiny_dir, tmp_path):
    """The Training Job example workflow, pointed at a copy of the tiny FLUX end-to-end job (two checkpoints) and the
    tiny FLUX base, queued on /prompt: the saved grid has the library's size and every cell is the library's render."""
    import numpy as np
    from PIL import Image

    from aitk_inference.pipelines.jobs.grid import reproduce_grid

    job = copy_job_with_two_checkpoints(tmp_path / "flux")
    with open(os.path.join(ROOT, "example_workflows", "training_job_checkpoint_grid.json")) as f:
        workflow = json.load(f)
    server = ComfyServer(str(base_dir), {})
    try:
        types = sorted({node["type"] for node in workflow["nodes"]})
        prompt = _api_prompt(workflow, {name: server.get(f"/object_info/{name}")[name] for name in types})
        job_node, previews_node, save_node = (next(key for key, node in prompt.items() if node["class_type"] == kind)
                                              for kind in ("AITKTrainingJob", "AITKJobPreviews", "SaveImage"))
        prompt[job_node]["inputs"].update(job_folder=job, base="tiny-flux")
        selection = {name: prompt[previews_node]["inputs"][name] for name in ("checkpoints", "strengths", "prompts")}
        assert selection == {"checkpoints": "last 3", "strengths": "", "prompts": ""}  # the example's defaults

        result = server.run(prompt)
        assert result["status"]["status_str"] == "success", _messages(result, "execution_error") or server.log_tail()
        listing = next(output for output in result["outputs"].values() if "text" in output)["text"]
        assert listing == ["step 5: flux_000000005.safetensors\nstep 10: flux_000000010.safetensors"]
        (saved,) = result["outputs"][save_node]["images"]
        with Image.open(base_dir / "output" / saved["subfolder"] / saved["filename"]) as image:
            grid_image = image.convert("RGB")
    finally:
        server.stop()

    library = reproduce_grid(job, base=tiny_dir("flux"), device="cpu", dtype="fp32", **selection)
    assert grid_image.size == library.image.size
    assert [(cell.step, cell.strength, cell.index) for cell in library.cells] == \
        [(step, 1.0, index) for step in (5, 10) for index in range(3)]
    for cell in library.cells:
        assert np.array_equal(np.asarray(grid_image.crop(cell.ours_box)), cell.ours), (cell.step, cell.index)
        if cell.theirs_box is not None:  # ai-toolkit's own sample beside ours, as the library placed it
            assert np.array_equal(np.asarray(grid_image.crop(cell.theirs_box)), cell.theirs)
