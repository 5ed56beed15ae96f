"""The pack inside a real ComfyUI: headless on the CPU, on loopback, driven through its HTTP API.

Runs only where ``COMFYUI_DIR`` names a ComfyUI checkout; ``COMFYUI_PYTHON`` names the interpreter of its
environment (default: ``$COMFYUI_DIR/.venv/bin/python`` or ``venv/bin/python`` if present, else this one). That
environment needs ComfyUI's requirements plus this pack's ``requirements.txt``. Everything ComfyUI writes goes to a
temporary ``--base-directory`` holding only this pack (symlinked), the tiny FLUX model and a LoRA. See ComfyUI.md.
The API runs twice: with the V3 schema nodes and with the classic fallback (``AITK_COMFY_NODE_API=classic``).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR or not os.path.isfile(os.path.join(COMFYUI_DIR or "", "main.py")),
                       reason="needs a real ComfyUI: set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its "
                              "python); see ComfyUI.md, 'Testing in a real ComfyUI'"),
]


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for venv in (".venv", "venv"):
        candidate = os.path.join(COMFYUI_DIR, venv, "bin", "python")
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


class ComfyServer:
    def __init__(self, base_dir: str, env_extra: dict):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, f"server_{self.port}.log")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env_extra}
        env.pop("PYTHONPATH", None)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", base_dir],
            cwd=COMFYUI_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"ComfyUI did not answer within 180 s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-chars:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.load(r)

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                body = r.read()
                return r.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, workflow: dict, timeout: float = 180) -> dict:
        status, reply = self.post("/prompt", {"prompt": workflow, "client_id": "aitk-test"})
        assert status == 200, reply
        prompt_id = reply["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.25)
        pytest.fail(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_dir):
    """A ComfyUI base directory: this pack, the tiny FLUX model under models/diffusers and a LoRA under loras."""
    import diffusers

    from aitk_inference.tiny.loras import lora_targets, write_lora

    base = tmp_path_factory.mktemp("comfy_base")
    for folder in ("custom_nodes", "models/diffusers", "models/loras", "user"):
        (base / folder).mkdir(parents=True)
    os.symlink(ROOT, base / "custom_nodes" / "aitk_inference")
    os.symlink(tiny_dir("flux"), base / "models" / "diffusers" / "tiny-flux")
    os.symlink(tiny_dir("ltx2"), base / "models" / "diffusers" / "tiny-ltx2")
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(tiny_dir("flux"), subfolder="transformer")
    write_lora(str(base / "models" / "loras" / "tiny_flux.safetensors"), "peft", lora_targets(transformer, limit=8))
    return base


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
