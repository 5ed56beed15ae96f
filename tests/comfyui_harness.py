"""A real ComfyUI for the integration and browser tests: headless on the CPU, on loopback, in a temporary base folder.

``COMFYUI_DIR`` names a ComfyUI source tree (CI: ``../shared/comfyui``, see ``.ci/run``); ``COMFYUI_PYTHON`` the
interpreter of its environment (default: ``$COMFYUI_DIR/.venv/bin/python`` or ``venv/bin/python`` if present, else
this one). That environment needs ComfyUI's requirements plus this pack's ``requirements.txt``. See ComfyUI.md,
'Testing in a real ComfyUI'.
"""

import fnmatch
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")

needs_comfyui = pytest.mark.skipif(
    not COMFYUI_DIR or not os.path.isfile(os.path.join(COMFYUI_DIR or "", "main.py")),
    reason="needs a real ComfyUI: set COMFYUI_DIR to a ComfyUI source tree (and COMFYUI_PYTHON to its python); "
           "see ComfyUI.md, 'Testing in a real ComfyUI' (.ci/run does this when ../shared/comfyui exists)",
)


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for venv in (".venv", "venv"):
        candidate = os.path.join(COMFYUI_DIR, venv, "bin", "python")
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


def install_pack(custom_nodes: str, folder_name: str = "aitk-inference") -> str:
    """Copy the pack into ``custom_nodes/folder_name`` as a user gets it from the registry: every file but those
    ``.comfyignore`` leaves out of the published pack (and caches). Returns the pack folder."""
    with open(os.path.join(ROOT, ".comfyignore"), encoding="utf-8") as f:
        patterns = [line.strip().rstrip("/") for line in f if line.strip() and not line.startswith("#")]
    skipped = {".git", "__pycache__", ".pytest_cache", "artifacts", *patterns}

    def ignore(folder, names):
        top = os.path.abspath(folder) == ROOT
        return [name for name in names if name in {".git", "__pycache__", ".pytest_cache"}
                or (top and any(fnmatch.fnmatch(name, pattern) for pattern in skipped))]

    target = os.path.join(custom_nodes, folder_name)
    shutil.copytree(ROOT, target, ignore=ignore, symlinks=True)
    return target


def make_base_dir(base, tiny_dir, with_video: bool = True, pack_folder: str | None = None):
    """A ComfyUI base directory: this pack under custom_nodes (a symlink, or a copy named ``pack_folder``), the tiny
    FLUX (and LTX-2) model under models/diffusers and a FLUX LoRA under models/loras."""
    import diffusers
    from PIL import Image

    from aitk_inference.tiny.loras import lora_targets, write_lora

    for folder in ("custom_nodes", "models/diffusers", "models/loras", "user", "input"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    # ComfyUI ships input/example.png (the edit examples' Load Image names it); a fresh base folder lacks it
    Image.new("RGB", (64, 64), (200, 120, 40)).save(base / "input" / "example.png")
    if pack_folder:
        install_pack(str(base / "custom_nodes"), pack_folder)
    else:
        os.symlink(ROOT, base / "custom_nodes" / "aitk_inference")
    os.symlink(tiny_dir("flux"), base / "models" / "diffusers" / "tiny-flux")
    if with_video:
        os.symlink(tiny_dir("ltx2"), base / "models" / "diffusers" / "tiny-ltx2")
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(tiny_dir("flux"), subfolder="transformer")
    write_lora(str(base / "models" / "loras" / "tiny_flux.safetensors"), "peft", lora_targets(transformer, limit=8))
    return base


class ComfyServer:
    def __init__(self, base_dir: str, env_extra: dict, extra_args: tuple = ()):
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
             "--disable-auto-launch", "--base-directory", base_dir, *extra_args],
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
