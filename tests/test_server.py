"""The HTTP server, started for real (uvicorn on 127.0.0.1, a free port) on the tiny FLUX model and driven over HTTP.

Everything stays on loopback: URL LoRAs come from a local ``http.server``. Generations use 64x64 and 2 steps;
the "long" jobs (150 steps) are always canceled or interrupted, never run to the end.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import threading
import time
from datetime import datetime

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

FINISHED = ("succeeded", "failed", "canceled")
LONG_STEPS = 150


# ---------------------------------------------------------------------------------------------------------------- helpers
class RunningServer:
    """uvicorn serving ``create_app(settings)`` in a thread, on a socket bound to 127.0.0.1 before start."""

    def __init__(self, env: dict, bases: list[str], get_pipeline=None):
        import uvicorn

        from aitk_inference.server.main import create_app
        from aitk_inference.server.settings import Settings

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.settings = Settings.from_env(env, host="127.0.0.1", port=port, bases=bases)
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.settings, get_pipeline), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(60)
            assert not self.thread.is_alive(), "server did not stop"
        self.client.close()
        self.sock.close()


def submit(client: httpx.Client, lora="style_a.safetensors", steps=2, **extra) -> dict:
    body = {"model": "flux", "loras": [{"path": lora}] if isinstance(lora, str) else lora,
            "prompts": [{"prompt": "a photo of [trigger]", "width": 64, "height": 64, "sample_steps": steps, "seed": 7}],
            **extra}
    r = client.post("/v1/inference", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(client: httpx.Client, request_id: str, until=FINISHED, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/requests/{request_id}/status").json()
        if status["status"] in until:
            return status
        assert time.monotonic() < deadline, f"request {request_id} stuck at {status}"
        time.sleep(0.03)


def wait_for_step(client: httpx.Client, request_id: str, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/requests/{request_id}/status").json()
        if status["status"] == "in_progress" and (status["step"] or 0) >= 1:
            return status
        assert status["status"] not in FINISHED and time.monotonic() < deadline, status
        time.sleep(0.02)


def error_code(response: httpx.Response) -> str:
    return response.json()["detail"]["error"]["code"]


def parse_time(value: str) -> datetime:
    assert value.endswith("Z") and "+00:00" not in value, value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_flux(tiny_dir):
    from aitk_inference.pipelines.runtime import cache
    from aitk_inference.pipelines.runtime.options import LoadOptions

    folder = tiny_dir("flux")
    # warm: the server shares the cache
    pipeline = cache.get_pipeline("flux", LoadOptions(base=folder, device="cpu", dtype="auto"))
    return folder, pipeline


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_flux):
    from aitk_inference.tiny.loras import lora_targets, write_lora

    root = tmp_path_factory.mktemp("server")
    workflows, outputs, lora_cache, outside = (root / n for n in ("workflows", "outputs", "lora_cache", "outside"))
    for d in (workflows, outputs, lora_cache, outside):
        d.mkdir()
    targets = lora_targets(tiny_flux[1].pipe.transformer)
    for i, name in enumerate(("style_a", "style_b", "style_c", "style_d", "style_e")):
        write_lora(str(workflows / "sub" / f"{name}.safetensors"), "peft", targets, seed=i)
    for name in ("style_a", "style_b"):
        os.replace(workflows / "sub" / f"{name}.safetensors", workflows / f"{name}.safetensors")
    write_lora(str(outside / "secret.safetensors"), "peft", targets, seed=9)
    os.symlink(outside / "secret.safetensors", workflows / "escape.safetensors")
    return {"workflows": str(workflows), "outputs": str(outputs), "lora_cache": str(lora_cache),
            "outside": str(outside), "root": str(root)}


@pytest.fixture(scope="module")
def server_env(dirs):
    return {"WORKFLOWS_BASE_PATH": dirs["workflows"], "OUTPUT_BASE_PATH": dirs["outputs"], "DEVICE": "cpu",
            "LORA_DOWNLOAD_CACHE_DIR": dirs["lora_cache"], "AITK_LORA_MAX_BYTES": str(256 * 1024),
            "AITK_TOKEN_HOSTS": "127.0.0.1", "AITK_CONTROL_IMAGE_MAX_PIXELS": str(128 * 128),
            "AITK_FETCH_ALLOWLIST": "127.0.0.1"}  # the URL LoRAs come from a loopback site


@pytest.fixture(scope="module")
def server(server_env, tiny_flux, tiny_dir):
    running = RunningServer(server_env, [f"flux={tiny_flux[0]}", f"ltx2={tiny_dir('ltx2')}",
                                         f"ace_step_15={tiny_dir('ace_step_15')}"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def lora_site(dirs):
    """A loopback HTTP server for URL LoRAs: a valid file, an HTML page, an oversized body, a truncated file."""
    with open(os.path.join(dirs["workflows"], "style_b.safetensors"), "rb") as f:
        good = f.read()
    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: bytes, content_type: str, length: bool = True):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path == "/good.safetensors":
                self._send(good, "application/octet-stream")
            elif self.path == "/page.safetensors":
                self._send(b"<!doctype html><html><body>Sign in</body></html>", "text/html; charset=utf-8")
            elif self.path == "/big.safetensors":  # no Content-Length: the cap must hold while streaming
                self._send(good + bytes(300 * 1024), "application/octet-stream", length=False)
            elif self.path == "/trunc.safetensors":
                self._send(good[: len(good) // 2], "application/octet-stream")
            elif self.path == "/to-ftp.safetensors":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/good.safetensors")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(404)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------------------------------------------------------- tests
def test_lifecycle_stacked_loras_formats_and_cache_reuse(server):
    from PIL import Image

    from aitk_inference.pipelines.runtime import cache

    c = server.client
    assert c.get("/health").json() == {"status": "healthy"}
    models = {m["id"]: m for m in c.get("/v1/models").json()["models"]}
    assert models["flux"]["default_steps"] == 25 and models["flux"]["base_override"]
    assert models["flux_kontext"]["requires_control_image"] is True
    loads = cache.stats["loads"]

    created = submit(c, lora=[{"path": "style_a.safetensors", "network_multiplier": 0.5},
                              {"path": "sub/style_c.safetensors", "network_multiplier": -0.8}], trigger_word="sks")
    assert created["status"] == "queued" and created["status_url"].startswith(server.url)
    assert wait_for(c, created["request_id"])["status"] == "succeeded"
    result = c.get(f"/v1/requests/{created['request_id']}/result").json()
    status = c.get(f"/v1/requests/{created['request_id']}/status").json()
    assert status["step"] == status["total_steps"] == 2
    assert parse_time(status["created_at"]) <= parse_time(status["started_at"]) <= parse_time(status["finished_at"])
    [image] = result["outputs"]["images"]
    assert (image["format"], image["width"], image["height"], image["seed"]) == ("png", 64, 64, 7)
    meta = result["metadata"]
    assert [(l["strength"], l["modules"] > 0) for l in meta["loras"]] == [(0.5, True), (-0.8, True)]
    assert meta["generations"][0]["prompt"] == "a photo of sks"
    assert meta["timings"]["pipeline_details"]["cache_hit"] is True

    download = c.get(image["url"].removeprefix(server.url))
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(download.content))
    assert png.size == (64, 64) and json.loads(png.text["parameters"])["steps"] == 2
    assert not [n for n in os.listdir(server.settings.output_base_path) if n.endswith(".partial")]

    # Same model and LoRAs at another strength, as JPEG: no reload.
    again = submit(c, lora=[{"path": "style_a.safetensors", "network_multiplier": 1.5},
                            {"path": "sub/style_c.safetensors"}], output_format="jpeg")
    assert wait_for(c, again["request_id"])["status"] == "succeeded"
    result = c.get(f"/v1/requests/{again['request_id']}/result").json()
    assert [l["strength"] for l in result["metadata"]["loras"]] == [1.5, 1.0]
    assert result["outputs"]["images"][0]["file_path"].endswith(".jpg")
    assert c.get(f"/v1/requests/{again['request_id']}/outputs/0").headers["content-type"] == "image/jpeg"
    assert cache.stats["loads"] == loads, "a strength or LoRA change reloaded the model"
    assert c.get(f"/v1/requests/{again['request_id']}/outputs/1").status_code == 404

    listing = c.get("/v1/requests", params={"limit": 1}).json()
    assert listing["total"] >= 2 and [r["request_id"] for r in listing["requests"]] == [again["request_id"]]
    assert c.get("/v1/requests", params={"status": "succeeded", "offset": 1, "limit": 1}).json()["requests"][0][
        "request_id"] == created["request_id"]


def test_fifo_queue_progress_and_cancel(server):
    c = server.client
    long = submit(c, steps=LONG_STEPS)
    b, d, e = submit(c, lora="style_b.safetensors"), submit(c), submit(c, lora="style_b.safetensors")
    running = wait_for_step(c, long["request_id"])
    assert running["total_steps"] == LONG_STEPS and running["queue_position"] is None
    positions = [c.get(f"/v1/requests/{t['request_id']}/status").json()["queue_position"] for t in (b, d, e)]
    assert positions == [1, 2, 3]

    # Cancel a queued request: it never runs and the ones behind it move up.
    assert c.post(f"/v1/requests/{d['request_id']}/cancel").json()["status"] == "canceled"
    assert c.get(f"/v1/requests/{e['request_id']}/status").json()["queue_position"] == 2

    # Cancel the running one: it stops within a step or two, long before its 150 steps.
    c.post(f"/v1/requests/{long['request_id']}/cancel")
    stopped = wait_for(c, long["request_id"], timeout=20)
    assert stopped["status"] == "canceled" and stopped["error"] is None
    finals = [wait_for(c, t["request_id"]) for t in (b, e)]
    assert [f["status"] for f in finals] == ["succeeded", "succeeded"]
    assert parse_time(stopped["started_at"]) < parse_time(finals[0]["started_at"]) < parse_time(finals[1]["started_at"])
    assert c.get(f"/v1/requests/{d['request_id']}/status").json()["started_at"] is None
    assert error_code(c.post(f"/v1/requests/{d['request_id']}/cancel")) == "REQUEST_ALREADY_FINISHED"
    assert c.get(f"/v1/requests/{long['request_id']}/result").json()["outputs"] is None


def test_reference_400_codes_and_path_escapes(server, dirs, monkeypatch):
    from PIL import Image

    c = server.client
    prompt = {"prompt": "p", "width": 64, "height": 64, "sample_steps": 2}

    def post(model="flux", loras=({"path": "style_a.safetensors"},), prompts=(prompt,)):
        return c.post("/v1/inference", json={"model": model, "loras": list(loras), "prompts": list(prompts)})

    tiny_png, huge_png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(tiny_png, "PNG")
    Image.new("RGB", (256, 256), "red").save(huge_png, "PNG")  # over AITK_CONTROL_IMAGE_MAX_PIXELS=128*128
    cases = {
        "MODEL_NOT_FOUND": post(model="sdxl_nope"),
        "LORA_FILE_REQUIRED": post(loras=()),
        "MOE_FORMAT_REQUIRED": post(model="wan22_14b_t2v", loras=({"path": "style_a.safetensors", "transformer": "low"},
                                                             {"path": "style_b.safetensors"})),
        "MOE_FORMAT_NOT_SUPPORTED": post(loras=({"path": "style_a.safetensors", "transformer": "high"},)),
        "TOO_MANY_LORAS": post(loras=[{"path": f"sub/style_{x}.safetensors"} for x in "cde"]
                               + [{"path": "style_a.safetensors"}, {"path": "style_b.safetensors"}]),
        "LORA_NOT_FOUND": post(loras=({"path": "missing.safetensors"},)),
        "CONTROL_IMAGE_REQUIRED": post(model="flux_kontext"),
        "CONTROL_IMAGE_NOT_SUPPORTED": post(prompts=({**prompt, "ctrl_img": base64.b64encode(tiny_png.getvalue()).decode()},)),
        "INVALID_LORA_URL": post(loras=({"path": "file:///etc/passwd"},)),
    }
    for code, response in cases.items():
        assert response.status_code == 400 and error_code(response) == code, (code, response.text)
    assert cases["MODEL_NOT_FOUND"].json()["detail"]["error"]["details"]["supported_models"][0] == "flux"
    assert cases["MODEL_NOT_FOUND"].json()["detail"]["error"]["message"] == "Model 'sdxl_nope' is not supported"
    assert post(model="wan22_14b_t2v", loras=({"path": "missing.safetensors", "transformer": "low"},)).json()[
        "detail"]["error"]["message"] == "LoRA file(s) not found: ['missing.safetensors']"

    for source in ("not base64 !!", base64.b64encode(huge_png.getvalue()).decode(), base64.b64encode(b"GIF89a junk").decode(),
                   "gopher://127.0.0.1/img"):
        r = post(model="flux_kontext", prompts=({**prompt, "ctrl_img": source},))
        assert error_code(r) == "CONTROL_IMAGE_INVALID", r.text

    secret = os.path.join(dirs["outside"], "secret.safetensors")
    for path in (secret, "../outside/secret.safetensors", "sub/../../outside/secret.safetensors", "escape.safetensors",
                 "~/x.safetensors", "a\x00b"):
        r = post(loras=({"path": path},))
        assert r.status_code == 400 and error_code(r) == "LORA_PATH_NOT_ALLOWED", (path, r.text)
        assert secret not in r.text or path == secret

    assert post(prompts=({**prompt, "sample_steps": 0},)).status_code == 422
    assert post(loras=({"path": "style_a.safetensors", "network_multiplier": 3},)).status_code == 422
    assert error_code(c.get("/v1/requests/nope/status")) == "REQUEST_NOT_FOUND"
    assert error_code(c.get("/v1/requests/nope/result")) == "REQUEST_NOT_FOUND"
    assert error_code(c.post("/v1/requests/nope/cancel")) == "REQUEST_NOT_FOUND"
    assert c.get("/v1/requests", params={"limit": 0}).status_code == 422
    assert c.options("/v1/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
                     ).headers.get("access-control-allow-origin") is None


def test_generation_options_reach_the_model_or_fail_naming_what_it_takes(server):
    c = server.client
    unknown = submit(c, options={"schedule_mu": 0.8})
    failed = wait_for(c, unknown["request_id"])
    assert failed["status"] == "failed" and "schedule_mu" in failed["error"] and "it takes none" in failed["error"]

    def post(**extra):
        return c.post("/v1/inference", json={"model": "flux", "loras": [{"path": "style_a.safetensors"}],
                                             "prompts": [{"prompt": "p"}], **extra})

    clash = post(options={"width": 128, "steps": 3})
    assert clash.status_code == 400 and error_code(clash) == "INVALID_OPTIONS"
    assert clash.json()["detail"]["error"]["details"]["fields"] == ["steps", "width"]
    twice = post(kv_cache=True, options={"kv_cache": False})
    assert error_code(twice) == "INVALID_OPTIONS" and "kv_cache" in twice.text
    assert post(options={"a": [1, 2]}).status_code == 422
    assert post(options={f"o{i}": 1 for i in range(17)}).status_code == 422


def test_options_map_onto_generate_keywords():
    from aitk_inference.pipelines.registry import get_spec
    from aitk_inference.server.mapping import generate_kwargs
    from aitk_inference.server.schemas import InferenceInput

    body = InferenceInput(model="krea2_o_edit", loras=[{"path": "a.safetensors"}], prompts=[{"prompt": "p"}],
                          match_target_res=False, options={"schedule_mu": 0.8, "kv_cache": False})
    kwargs = generate_kwargs(body.prompts[0], body, get_spec("krea2_o_edit"))
    assert (kwargs["schedule_mu"], kwargs["kv_cache"], kwargs["match_target_res"]) == (0.8, False, False)
    assert isinstance(InferenceInput(model="x", loras=[], prompts=[{"prompt": "p"}], options={"n": 1}).options["n"], int)


def test_url_loras_from_loopback(server, lora_site, dirs):
    site, seen = lora_site
    c = server.client
    first = submit(c, lora=f"{site}/good.safetensors", hf_token="tok-123")
    bad = {name: submit(c, lora=f"{site}/{name}.safetensors") for name in ("page", "big", "trunc", "to-ftp")}
    assert wait_for(c, first["request_id"])["status"] == "succeeded", c.get(f"/v1/requests/{first['request_id']}/result").text
    errors = {name: wait_for(c, t["request_id"]) for name, t in bad.items()}
    assert all(e["status"] == "failed" for e in errors.values()), errors
    assert "HTML page" in errors["page"]["error"]
    assert "limit" in errors["big"]["error"]
    assert "truncated" in errors["trunc"]["error"]
    assert "ftp://" in errors["to-ftp"]["error"] and "not allowed" in errors["to-ftp"]["error"]

    # The token went with that one download only, and only to the configured host.
    assert seen[0] == ("/good.safetensors", "Bearer tok-123")
    assert all(auth is None for _, auth in seen[1:])
    assert not [n for n in os.listdir(dirs["lora_cache"]) if n.endswith(".partial")]
    stored = c.get(f"/v1/requests/{first['request_id']}/result").json()
    assert "tok-123" not in json.dumps(stored)

    # Cached by URL: the second request downloads nothing.
    count = len(seen)
    again = submit(c, lora=[{"path": f"{site}/good.safetensors", "network_multiplier": 0.3}])
    assert wait_for(c, again["request_id"])["status"] == "succeeded"
    assert len(seen) == count
    details = c.get(f"/v1/requests/{again['request_id']}/result").json()["metadata"]["timings"]["pipeline_details"]
    assert details["downloads"] == [{"url": f"{site}/good.safetensors", "cached": True}]


def test_openapi_fuzz_has_no_server_errors(server):
    schemathesis = pytest.importorskip("schemathesis", reason="the OpenAPI fuzz needs schemathesis "
                                                             "(pip install schemathesis); it is not installed")
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/inference", "/v1/requests/{request_id}/cancel", "/v1/requests/{request_id}/outputs/{index}"} <= paths
    before = server.client.get("/v1/requests").json()["total"]
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(base_url=server.url, timeout=10)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)

        fuzz()
    assert len(statuses) > 2 * len(operations)
    # Random bodies never name a real model and file, so nothing was queued.
    assert server.client.get("/v1/requests").json()["total"] == before


def test_video_request_writes_mp4_with_audio(server, dirs, tiny_dir):
    import av
    from diffusers import LTX2VideoTransformer3DModel

    from aitk_inference.tiny.loras import lora_targets, write_lora

    transformer = LTX2VideoTransformer3DModel.from_pretrained(tiny_dir("ltx2"), subfolder="transformer")
    write_lora(os.path.join(dirs["workflows"], "ltx_style.safetensors"), "peft", lora_targets(transformer, limit=4))
    c = server.client
    reply = c.post("/v1/inference", json={"model": "ltx2", "loras": [{"path": "ltx_style.safetensors"}], "prompts": [
        {"prompt": "a robot", "width": 64, "height": 64, "sample_steps": 2, "num_frames": 9, "fps": 12}]})
    assert reply.status_code == 200, reply.text
    request_id = reply.json()["request_id"]
    assert wait_for(c, request_id)["status"] == "succeeded"
    video = c.get(f"/v1/requests/{request_id}/result").json()["outputs"]["videos"][0]
    assert (video["format"], video["num_frames"], video["fps"]) == ("mp4", 9, 12)
    download = c.get(video["url"].replace(server.settings.public_url, ""))
    assert download.headers["content-type"] == "video/mp4"
    path = os.path.join(dirs["root"], "downloaded.mp4")
    with open(path, "wb") as f:
        f.write(download.content)
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9 and len(container.streams.audio) == 1


def test_audio_request_writes_flac(server, dirs, tiny_dir):
    import av
    from diffusers import AceStepTransformer1DModel

    from aitk_inference.tiny.ace_step import original_targets
    from aitk_inference.tiny.loras import make_state_dict, save_lora

    transformer = AceStepTransformer1DModel.from_pretrained(tiny_dir("ace_step_15"), subfolder="transformer")
    save_lora(os.path.join(dirs["workflows"], "ace_style.safetensors"),
              make_state_dict("peft_diffusion_model", original_targets(transformer)))
    c = server.client
    reply = c.post("/v1/inference", json={"model": "ace_step_15", "loras": [{"path": "ace_style.safetensors"}],
                                          "prompts": [{"prompt": "<CAPTION>lofi piano</CAPTION><DURATION>2</DURATION>",
                                                       "sample_steps": 2}]})
    assert reply.status_code == 200, reply.text
    request_id = reply.json()["request_id"]
    assert wait_for(c, request_id)["status"] == "succeeded"
    outputs = c.get(f"/v1/requests/{request_id}/result").json()["outputs"]
    assert outputs["images"] == [] and outputs["videos"] == []
    audio = outputs["audios"][0]
    assert (audio["index"], audio["format"], audio["sample_rate"]) == (0, "flac", 48000)
    download = c.get(audio["url"].replace(server.settings.public_url, ""))
    assert download.headers["content-type"] == "audio/flac"
    path = os.path.join(dirs["root"], "downloaded.flac")
    with open(path, "wb") as f:
        f.write(download.content)
    with av.open(path) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        assert (stream.codec_context.name, stream.rate, stream.channels, samples) == ("flac", 48000, 2, 200)


def test_restart_keeps_results_and_requeues_unfinished(server, server_env, tiny_flux):
    c = server.client
    done = submit(c)
    assert wait_for(c, done["request_id"])["status"] == "succeeded"
    long = submit(c, steps=LONG_STEPS)
    queued = submit(c)
    wait_for_step(c, long["request_id"])
    server.stop()

    import torch

    from aitk_inference.pipelines.runtime import cache

    calls = []

    def out_of_memory_once(*args, **kwargs):
        """The cache's loader, except that the first call fails as a GPU out of memory would."""
        calls.append(args)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return cache.get_pipeline(*args, **kwargs)

    env = {**server_env, "AITK_MAX_LORAS": "1", "AITK_API_KEY": "k3y"}
    again = RunningServer(env, [f"flux={tiny_flux[0]}"], get_pipeline=out_of_memory_once)
    try:
        c = again.client
        assert c.get("/health").status_code == 200
        assert error_code(c.get(f"/v1/requests/{done['request_id']}/result")) == "UNAUTHORIZED"
        c.headers["X-API-Key"] = "k3y"
        result = c.get(f"/v1/requests/{done['request_id']}/result").json()
        assert result["status"] == "succeeded"
        assert c.get(f"/v1/requests/{done['request_id']}/outputs/0").status_code == 200
        r = c.post("/v1/inference", json={"model": "flux", "loras": [{"path": "style_a.safetensors"},
                                                                     {"path": "style_b.safetensors"}],
                                          "prompts": [{"prompt": "p"}]})
        assert error_code(r) == "SINGLE_LORA_ONLY" and r.json()["detail"]["error"]["message"] == \
            "Model 'flux' only supports 1 LoRA file"

        # What the shutdown interrupted (long) and left queued ran again after the start, in their order: the
        # first one met an out-of-memory, which fails that request with a clear error; the next one runs.
        failed = wait_for(c, long["request_id"])
        assert failed["status"] == "failed" and failed["error"].startswith("CUDA out of memory while running flux")
        assert failed["attempts"] == 2
        done_again = wait_for(c, queued["request_id"])
        assert (done_again["status"], done_again["attempts"]) == ("succeeded", 1)
    finally:
        again.stop()


def test_timeout_stops_a_request_between_steps(tmp_path, server_env, tiny_flux):
    """INFERENCE_TIMEOUT=1: a request of 8 x 150 steps is stopped between two steps, well before its end (one
    150-step prompt of the tiny model can finish within the second on a quiet machine). (The SIGKILL crash/restart
    test is in test_redteam.py.)"""
    env = {**server_env, "OUTPUT_BASE_PATH": str(tmp_path / "out"), "INFERENCE_TIMEOUT": "1"}
    again = RunningServer(env, [f"flux={tiny_flux[0]}"])
    prompt = {"prompt": "a photo of [trigger]", "width": 64, "height": 64, "sample_steps": LONG_STEPS, "seed": 7}
    try:
        slow = submit(again.client, prompts=[prompt] * 8)
        status = wait_for(again.client, slow["request_id"], timeout=30)
        assert status["status"] == "failed" and status["error"].startswith("Timed out after INFERENCE_TIMEOUT=1 s"), status
    finally:
        again.stop()


def test_settings_select_lora_mode_and_compile():
    from aitk_inference.server.settings import Settings

    settings = Settings.from_env({"AITK_LORA_MODE": "FUSED", "AITK_COMPILE": "regional", "AITK_VAE_TILING": "1"})
    assert (settings.load.lora_mode, settings.load.compile, settings.vae_tiling) == ("fused", "regional", True)
    assert Settings.from_env({}).load.lora_mode is None
    with pytest.raises(ValueError, match="AITK_LORA_MODE='merged' is not valid"):
        Settings.from_env({"AITK_LORA_MODE": "merged"})


def test_settings_select_attention_and_quantize():
    from aitk_inference.server.settings import Settings

    settings = Settings.from_env({"AITK_ATTENTION": "SDPA_MATH", "AITK_QUANTIZE": "fp8"})
    assert (settings.load.attention, settings.load.quantize) == ("sdpa_math", "fp8")
    assert (Settings.from_env({}).load.attention, Settings.from_env({}).load.quantize) == ("sdpa", "none")
    with pytest.raises(ValueError, match="AITK_ATTENTION='fast' is not valid; use one of sdpa, sdpa_cudnn, .*xformers"):
        Settings.from_env({"AITK_ATTENTION": "fast"})
    with pytest.raises(ValueError, match="AITK_QUANTIZE='int8' is not valid; use one of none, fp8"):
        Settings.from_env({"AITK_QUANTIZE": "int8"})
    # FP8 weights go with no offload or auto: said at start, not at the first request
    with pytest.raises(ValueError, match="AITK_QUANTIZE='fp8' with OFFLOAD_MODE='model': quantize='fp8' cannot be combined"):
        Settings.from_env({"AITK_QUANTIZE": "fp8", "OFFLOAD_MODE": "model"})
    # both LoRA modes go with FP8: fused merges before quantizing (the fast mode), dynamic runs adapters
    assert Settings.from_env({"AITK_QUANTIZE": "fp8", "AITK_LORA_MODE": "fused"}).load.lora_mode == "fused"


def test_server_loads_with_the_attention_setting(server_env, tiny_flux, tmp_path):
    from aitk_inference.pipelines.runtime import cache

    loads, pipelines = [], []

    def recording(model_id, options):
        loads.append(options)
        pipelines.append(cache.get_pipeline(model_id, options))
        return pipelines[-1]

    env = {**server_env, "OUTPUT_BASE_PATH": str(tmp_path), "AITK_ATTENTION": "sdpa_math"}
    running = RunningServer(env, [f"flux={tiny_flux[0]}"], get_pipeline=recording)
    try:
        task = submit(running.client)
        assert wait_for(running.client, task["request_id"])["status"] == "succeeded"
        assert loads[0].cache_key("flux") in cache.cached_keys()
    finally:
        running.stop()
    assert [(options.attention, options.quantize) for options in loads] == [("sdpa_math", "none")]
    assert pipelines[0].attention == "sdpa_math"
