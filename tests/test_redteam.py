"""The red-team suite: bad inputs of every class we know of, sent to the library, the ComfyUI nodes and the HTTP
server. Each case asserts the clear error AND that the cached pipeline is exactly as before: its denoiser weights
byte-identical and a reference generation bit-identical. Then a crash/restart test of the server on its SQLite store
(a real ``serve`` subprocess killed with SIGKILL mid-job, restarted, the job queued again and completed).

Classes: non-numbers, NaN/Infinity and out-of-range numbers; unknown parameters (typos); LoRAs holding NaN/inf,
LoRAs whose finite values overflow once merged or make the output non-finite, broken files; oversized bodies and
fields; outbound fetches turned inward (literal internal addresses in every notation, names resolving inward,
redirects inward, DNS answers that change between check and connect).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from aitk_inference.pipelines.base import NonFiniteOutputError
from aitk_inference.pipelines.runtime import cache
from aitk_inference.pipelines.runtime.options import LoadOptions
from aitk_inference.tiny.loras import lora_targets, make_state_dict, save_lora, write_lora
from test_server import RunningServer, error_code, submit, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(prompt="a photo of a cat", width=64, height=64, steps=2, seed=7)


# ---------------------------------------------------------------------------------------------------------------- helpers
class Snapshot:
    """A cached pipeline's weights (its own and any live adapters'), its applied LoRA set and one generation, to
    prove that bad inputs left it exactly as it was. A refused input is checked at once (``assert_unchanged``: the
    weights and the LoRA set); an input that was accepted and then failed (a job that applied its own LoRA set, a
    Sample node that set its LoRAs) is checked after the next ordinary use, which puts the earlier set back
    (``assert_output_unchanged``: the generation bit for bit, then the weights). The generation, the slow part, is
    also compared once after all the cases of a layer.

    Args:
        get_pipeline (callable): the cached pipeline now (the cache may have reloaded it from the same files).
        generate (callable): one generation through the layer under test, as an array.
    """

    def __init__(self, get_pipeline, generate):
        self.get_pipeline, self.generate = get_pipeline, generate
        self.image = generate()  # first: it applies the LoRA set the weights are then compared under
        self.weights, self.loras = self._state()

    def _state(self) -> tuple[dict, list]:
        pipeline = self.get_pipeline()
        # a re-applied LoRA gets a new adapter name (aitk_<n>); its tensors must still be the same
        weights = {re.sub(r"\.aitk_\d+", ".aitk", k): v.detach().clone()
                   for k, v in pipeline.pipe.transformer.state_dict().items()}
        return weights, [(entry["name"], entry["strength"]) for entry in pipeline.loras.describe()]

    def assert_unchanged(self) -> None:
        weights, applied = self._state()
        assert applied == self.loras
        assert list(weights) == list(self.weights)
        changed = [k for k, v in weights.items() if not torch.equal(v, self.weights[k])]
        assert not changed, f"weights changed: {changed[:3]}"

    def assert_output_unchanged(self) -> None:
        np.testing.assert_array_equal(self.generate(), self.image)
        self.assert_unchanged()


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_dir):
    """A good LoRA and the bad ones, for the tiny FLUX transformer."""
    folder = tmp_path_factory.mktemp("redteam_loras")
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir("flux"), subfolder="transformer")
    targets = lora_targets(transformer, limit=8)
    paths = {"good": write_lora(str(folder / "good.safetensors"), "peft", targets, seed=1)}
    for name, value in (("nan", math.nan), ("inf", math.inf)):
        state_dict = make_state_dict("peft", targets, seed=2)
        state_dict[f"transformer.{targets[2][0]}.lora_B.weight"][0, 1] = value
        paths[name] = save_lora(str(folder / f"{name}.safetensors"), state_dict)
    # finite, but 1e20 * 1e20 overflows float32 once multiplied out: refused by the merge guard (fused) or the
    # output guard (live adapters)
    paths["huge"] = save_lora(str(folder / "huge.safetensors"),
                              {k: v * 1e20 for k, v in make_state_dict("peft", targets, seed=3).items()})
    with open(paths["good"], "rb") as f:
        good = f.read()
    for name, data in (("html", b"<!doctype html><html>Sign in</html>"), ("truncated", good[: len(good) // 2]),
                       ("empty", b"")):
        paths[name] = str(folder / f"{name}.safetensors")
        with open(paths[name], "wb") as f:
            f.write(data)
    paths["other_family"] = save_lora(str(folder / "other_family.safetensors"), {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)})
    return paths


# ---------------------------------------------------------------------------------------------------------------- library
BAD_GENERATE = [
    ({"guidance": "strong"}, "`guidance` must be a number in 0..100, got 'strong'"),
    ({"guidance": math.nan}, "`guidance` must be a number in 0..100, got nan"),
    ({"guidance": math.inf}, "`guidance` must be a number in 0..100, got inf"),
    ({"guidance": -1.0}, "`guidance` must be a number in 0..100"),
    ({"guidance": True}, "`guidance` must be a number"),
    ({"steps": 0}, "`steps` must be an integer in 1..\\d+, got 0"),
    ({"steps": "2"}, "`steps` must be an integer in 1..\\d+, got '2'"),
    ({"steps": 2.5}, "`steps` must be an integer"),
    ({"steps": math.nan}, "`steps` must be an integer"),
    ({"width": math.nan}, "`width` must be an integer, got nan"),
    ({"width": "64"}, "`width` must be an integer, got '64'"),
    ({"height": -64}, "`height`=-64 is out of range"),
    ({"width": 10**9}, "`width`=1000000000 is out of range"),
    ({"seed": -2}, "`seed` must be an integer in -1.."),
    ({"seed": 2**70}, "`seed` must be an integer in -1.."),
    ({"seed": 7.0}, "`seed` must be an integer"),
    ({"prompt": None}, "`prompt` must be a string, got NoneType"),
    ({"negative": 5}, "`negative` must be a string, got int"),
    ({"batch_size": 0}, "`batch_size` must be an integer in 1.."),
    ({"num_frames": 9}, "makes images; `num_frames` does not apply"),
    ({"sample_step": 2}, "Unknown generation option\\(s\\) for flux: \\['sample_step'\\]"),
    ({"control_images": [np.zeros((64, 64, 3), np.uint8)]}, "takes no control image"),
]

BAD_LORA_REQUESTS = [
    ("good", "strong", "LoRA strength for good.safetensors must be a number in -2.0..2.0, got 'strong'"),
    ("good", math.nan, "LoRA strength nan for good.safetensors is outside"),
    ("good", math.inf, "LoRA strength inf for good.safetensors is outside"),
    ("good", 3.0, "LoRA strength 3.0 for good.safetensors is outside -2.0..2.0"),
    ("nan", 1.0, "nan.safetensors: transformer\\..*: lora_B holds NaN"),
    ("inf", 1.0, "inf.safetensors: transformer\\..*: lora_B holds inf"),
    ("html", 1.0, "html.safetensors"),
    ("truncated", 1.0, "truncated.safetensors"),
    ("empty", 1.0, "empty.safetensors"),
    ("other_family", 1.0, "other_family.safetensors"),
    ("missing", 1.0, "missing.safetensors"),
]


@pytest.fixture(scope="module", params=["dynamic", "fused"])
def library(request, tiny_dir, loras):
    """The cached tiny FLUX pipeline in one LoRA mode, with the good LoRA applied at 0.7, and its snapshot."""
    # dynamic is flux's own mode: the same cached pipeline as the nodes' and the server's
    pipeline = cache.get_pipeline("flux", LoadOptions(base=tiny_dir("flux"), device="cpu", dtype="auto",
                                                      lora_mode=None if request.param == "dynamic" else "fused"))
    pipeline.set_loras([(loras["good"], 0.7)])
    snapshot = Snapshot(lambda: pipeline, lambda: pipeline.generate(**RUN).images)
    yield pipeline, snapshot
    pipeline.set_loras([])


@pytest.mark.parametrize("library", ["dynamic"], indirect=True)  # validated before the LoRA mode matters
@pytest.mark.parametrize("change,message", BAD_GENERATE,
                         ids=[f"{k}={v!r}"[:24] for c, _ in BAD_GENERATE for k, v in c.items()])
def test_library_refuses_bad_generate_arguments(library, change, message):
    pipeline, snapshot = library
    with pytest.raises(ValueError, match=message):
        pipeline.generate(**{**RUN, **change})
    snapshot.assert_unchanged()


@pytest.mark.parametrize("name,strength,message", BAD_LORA_REQUESTS, ids=[f"{n}@{s}" for n, s, _ in BAD_LORA_REQUESTS])
def test_library_refuses_bad_loras_and_keeps_the_applied_set(library, loras, tmp_path, name, strength, message):
    pipeline, snapshot = library
    path = loras.get(name, str(tmp_path / f"{name}.safetensors"))
    for change in ([(path, strength)], [(loras["good"], 0.7), (path, strength)], [(loras["good"], 1.0), (path, strength)]):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pipeline.set_loras(change)
        assert [(e["name"], e["strength"]) for e in pipeline.loras.describe()] == [("good.safetensors", 0.7)]
    snapshot.assert_unchanged()


def test_library_huge_finite_lora_never_yields_an_image(library, loras):
    """Fused: the merge guard refuses the change before any weight is written. Live adapters: the LoRA applies, and
    the non-finite image it makes is refused with the reason instead of being returned as black pixels."""
    pipeline, snapshot = library
    if pipeline.lora_mode == "fused":
        with pytest.raises(ValueError, match="huge.safetensors: merging it into transformer\\..* would make flux's "
                                             "torch.float32 weights NaN or inf, so the change was refused"):
            pipeline.set_loras([(loras["good"], 0.7), (loras["huge"], 1.0)])
    else:
        pipeline.set_loras([(loras["good"], 0.7), (loras["huge"], 1.0)])
        with pytest.raises(NonFiniteOutputError, match="flux produced an image with 12288 NaN/inf values out of "
                                                       "12288; nothing was returned"):
            pipeline.generate(**RUN)
        pipeline.set_loras([(loras["good"], 0.7)])
    snapshot.assert_unchanged()


def test_fused_merge_refuses_an_fp16_overflow_before_writing_any_weight():
    """The case the merge guard is for: finite LoRA values whose merged weight overflows float16 (65504). The third
    layer overflows; the first two, which would merge fine, are left untouched too."""
    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 6) for _ in range(3)).half()
    state_dict = make_state_dict("peft", [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)], seed=4)
    state_dict["transformer.blocks.2.lora_B.weight"] *= 1e6  # |delta| ~ 1e5: finite in float32, inf in float16
    stack = LoraStack({"transformer": model}, "fused", "transformer", "toy")
    stack.set([LoraRequest(state_dict={k: v for k, v in state_dict.items() if ".2." not in k}, name="fine", strength=0.5)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="overflow: merging it into transformer.blocks.2 \\(coefficient 1\\) would make "
                                         "toy's torch.float16 weights NaN or inf, so the change was refused"):
        stack.set([LoraRequest(state_dict=state_dict, name="overflow", strength=1.0)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [(e["name"], e["strength"]) for e in stack.describe()] == [("fine", 0.5)]


def test_library_output_is_bit_identical_after_the_bad_inputs(library):
    library[1].assert_output_unchanged()


def test_library_audio_and_video_outputs_are_checked_too():
    from aitk_inference.pipelines.base import check_finite_output

    frames = np.zeros((1, 5, 8, 8, 3), np.float32)
    check_finite_output("ltx2", {"images": frames, "audio": np.zeros((1, 2, 16), np.float32)})
    frames[0, 3, 1, 1, 0] = np.nan
    with pytest.raises(NonFiniteOutputError, match="ltx2 produced frames with 1 NaN/inf values out of 960"):
        check_finite_output("ltx2", {"images": frames})
    audio = np.zeros((1, 2, 16), np.float32)
    audio[0, 1, 3] = np.inf
    with pytest.raises(NonFiniteOutputError, match="ltx2 produced audio with 1 NaN/inf values out of 32"):
        check_finite_output("ltx2", {"images": np.zeros((1, 8, 8, 3), np.float32), "audio": audio})


# ---------------------------------------------------------------------------------------------------------------- nodes
@pytest.fixture(scope="module")
def node(tiny_dir, loras):
    from aitk_inference.nodes import core

    handle = core.apply_lora(core.load("flux", tiny_dir("flux"), "auto", "none", "cpu"), loras["good"], 0.7, "none")
    settings = dict(prompt="a cat", negative="", width=64, height=64, steps=2, guidance=4.0, seed=7, batch_size=1,
                    progress=lambda step, total: None)
    snapshot = Snapshot(handle.get_pipeline, lambda: core.sample(handle, **settings).images.numpy())
    yield core, handle, settings, snapshot
    handle.get_pipeline().set_loras([])


BAD_NODE_INPUTS = [
    ("sample", {"guidance": "strong"}, "`guidance` must be a number in 0..100, got 'strong'"),
    ("sample", {"guidance": math.nan}, "`guidance` must be a number"),
    ("sample", {"steps": 0}, "`steps` must be an integer"),
    ("sample", {"width": math.inf}, "`width` must be an integer"),
    ("sample", {"seed": -5}, "`seed` must be an integer in -1.."),
    ("apply", {"strength": "strong"}, "LoRA strength for good.safetensors must be a number"),
    ("apply", {"strength": math.nan}, "LoRA strength nan"),
    ("apply", {"lora": "nan"}, "lora_B holds NaN"),
    ("apply", {"lora": "inf"}, "lora_B holds inf"),
    ("apply", {"lora": "truncated"}, "truncated.safetensors"),
    ("apply", {"transformer": "middle"}, "transformer 'middle' is not one of"),
    ("apply", {"lora": ""}, "lora"),
    ("load", {"dtype": "fp64"}, "dtype 'fp64' is not one of"),
    ("load", {"device": "quantum"}, "device 'quantum' is not one of"),
    ("load", {"lora_mode": "merged"}, "lora_mode 'merged' is not one of"),
    ("load", {"model": "flux_nope"}, "flux_nope"),
]


@pytest.mark.parametrize("node_name,change,message", BAD_NODE_INPUTS,
                         ids=[f"{n}-{k}={v!r}"[:30] for n, c, _ in BAD_NODE_INPUTS for k, v in c.items()])
def test_nodes_refuse_bad_inputs(node, loras, node_name, change, message):
    core, handle, settings, snapshot = node
    with pytest.raises(ValueError, match=message):
        if node_name == "sample":
            core.sample(handle, **{**settings, **change})
        elif node_name == "load":
            core.load(**{"model": "flux", "base": handle.options.base, "dtype": "auto", "device": "cpu", **change})
        else:
            args = {"lora": loras["good"], "strength": 1.0, "transformer": "none", **change}
            args["lora"] = loras.get(args["lora"], args["lora"])
            core.sample(core.apply_lora(handle, **args), **settings)
    snapshot.assert_unchanged()


def test_node_sample_refuses_a_non_finite_image(node, loras):
    core, handle, settings, snapshot = node
    with pytest.raises(NonFiniteOutputError, match="NaN/inf values"):
        core.sample(core.apply_lora(handle, loras["huge"], 1.0, "none"), **settings)
    snapshot.assert_output_unchanged()


def test_node_output_is_bit_identical_after_the_bad_inputs(node):
    node[3].assert_output_unchanged()


# ---------------------------------------------------------------------------------------------------------------- server
def _site(host: str, files: dict, seen: list):
    """A loopback HTTP server on ``host`` serving ``files`` (path -> bytes, or ("redirect", location))."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((host, self.path, self.headers.get("Host")))
            body = files.get(self.path)
            if isinstance(body, tuple):
                self.send_response(302)
                self.send_header("Location", body[1])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif body is None:
                self.send_error(404)
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def redteam_server(tmp_path_factory, tiny_dir, loras):
    """The server on the tiny FLUX model with a small body limit, an allow-list of one host name and one address
    (127.0.0.2), loopback sites holding a secret (127.0.0.1) and a good LoRA (127.0.0.2), and a resolver for the test
    names: internal.example -> 127.0.0.1, store.example (allow-listed) -> 127.0.0.1, rebind.example -> 127.0.0.2 on
    the first query and 127.0.0.1 after that, mixed.example -> 127.0.0.2 and 127.0.0.1, multi.example -> 127.0.0.3
    (allow-listed, nothing listens) and 127.0.0.2."""
    import shutil

    root = tmp_path_factory.mktemp("redteam_server")
    workflows = root / "workflows"
    workflows.mkdir()
    for name in ("good", "nan", "huge"):
        shutil.copy(loras[name], workflows / f"{name}.safetensors")
    with open(loras["good"], "rb") as f:
        good = f.read()
    seen: list = []
    secret = _site("127.0.0.1", {"/secret.safetensors": b"TOP-SECRET-" + good, "/pixel.png": b"TOP-SECRET"}, seen)
    secret_port = secret.server_address[1]
    store = _site("127.0.0.2", {"/good.safetensors": good,
                                "/bounce.safetensors": ("redirect", f"http://127.0.0.1:{secret_port}/secret.safetensors")},
                  seen)
    queries: list = []
    real_getaddrinfo = socket.getaddrinfo

    def resolver(host, *args, **kwargs):
        if kwargs.get("flags", 0) & socket.AI_NUMERICHOST:  # a parse, not a query
            return real_getaddrinfo(host, *args, **kwargs)
        fake = {"internal.example": ["127.0.0.1"], "store.example": ["127.0.0.1"],
                "rebind.example": ["127.0.0.2" if "rebind.example" not in queries else "127.0.0.1"],
                "mixed.example": ["127.0.0.2", "127.0.0.1"], "multi.example": ["127.0.0.3", "127.0.0.2"]}.get(host, [host])
        queries.append(host)
        return [info for address in fake for info in real_getaddrinfo(address, *args, **kwargs)]

    env = {"WORKFLOWS_BASE_PATH": str(workflows), "OUTPUT_BASE_PATH": str(root / "out"), "DEVICE": "cpu",
           "LORA_DOWNLOAD_CACHE_DIR": str(root / "lora_cache"), "AITK_MAX_BODY_BYTES": str(256 * 1024),
           "AITK_FETCH_ALLOWLIST": "store.example,127.0.0.2,127.0.0.3"}
    socket.getaddrinfo = resolver
    running = RunningServer(env, [f"flux={tiny_dir('flux')}"])

    def generate():
        task = submit(running.client, lora="good.safetensors")
        assert wait_for(running.client, task["request_id"])["status"] == "succeeded"
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(running.client.get(f"/v1/requests/{task['request_id']}/outputs/0").content)))

    try:
        snapshot = Snapshot(lambda: cache.get_pipeline("flux", running.settings.load_options("flux")), generate)
        yield {"server": running, "snapshot": snapshot, "seen": seen, "queries": queries,
               "secret": f"http://127.0.0.1:{secret_port}", "store": f"http://127.0.0.2:{store.server_address[1]}",
               "port": secret_port}
    finally:
        running.stop()
        socket.getaddrinfo = real_getaddrinfo
        for site in (secret, store):
            site.shutdown()
            site.server_close()


def png_declaring(width: int, height: int) -> str:
    """A base64 PNG of 1x1 pixels whose header claims ``width`` x ``height`` (a decompression bomb's calling card)."""
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", width, height) + bytes(data[24:29])  # IHDR data: size, then depth, color, ...
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return base64.b64encode(bytes(data)).decode()


PROMPT = {"prompt": "p", "width": 64, "height": 64, "sample_steps": 2}
BODY = {"model": "flux", "loras": [{"path": "good.safetensors"}], "prompts": [PROMPT]}


def _with(prompt=None, lora=None, **top):
    return {**BODY, "loras": [{"path": "good.safetensors", **(lora or {})}], "prompts": [{**PROMPT, **(prompt or {})}], **top}


# (id, raw JSON body, status, what the message must say)
BAD_BODIES = [
    ("nan-guidance", json.dumps(_with({"guidance_scale": math.nan})), 422,
     "prompts[0].guidance_scale: must be a finite number; NaN and Infinity are not accepted."),
    ("inf-width", json.dumps(_with({"width": math.inf})), 422, "prompts[0].width: must be a finite number"),
    ("-inf-strength", json.dumps(_with(lora={"network_multiplier": -math.inf})), 422,
     "loras[0].network_multiplier: must be a finite number"),
    ("nan-seed", json.dumps(_with({"seed": math.nan})), 422, "prompts[0].seed: must be a finite number"),
    ("nan-steps", json.dumps(_with({"sample_steps": math.nan})), 422, "prompts[0].sample_steps: must be a finite"),
    ("nan-prompt", json.dumps(_with({"prompt": math.nan})), 422, "prompts[0].prompt: Input should be a valid string"),
    ("nan-kv_cache", json.dumps(_with(kv_cache=math.nan)), 422, "kv_cache: Input should be a valid boolean"),
    ("text-guidance", json.dumps(_with({"guidance_scale": "strong"})), 422,
     "prompts[0].guidance_scale: Input should be a valid number"),
    ("text-strength", json.dumps(_with(lora={"network_multiplier": "strong"})), 422,
     "loras[0].network_multiplier: Input should be a valid number"),
    ("float-steps", json.dumps(_with({"sample_steps": 2.5})), 422, "prompts[0].sample_steps: Input should be a valid integer"),
    ("huge-seed", json.dumps(_with({"seed": 10**30})), 422, "prompts[0].seed: Input should be less than or equal to"),
    ("big-strength", json.dumps(_with(lora={"network_multiplier": 1e308})), 422, "loras[0].network_multiplier: Input should be less"),
    ("typo-sample_step", json.dumps(_with({"sample_step": 2})), 422,
     "prompts[0].sample_step: unknown field (did you mean 'sample_steps'?)"),
    ("typo-guidance", json.dumps(_with({"guidance": 2})), 422, "prompts[0].guidance: unknown field (did you mean 'guidance_scale'?)"),
    ("typo-lora", json.dumps({**BODY, "lora": []}), 422, "lora: unknown field (did you mean 'loras'?)"),
    ("typo-strength", json.dumps(_with(lora={"strength": 0.5})), 422, "loras[0].strength: unknown field"),
    ("unknown-top", json.dumps({**BODY, "xyzzy": 1}), 422, "xyzzy: unknown field (valid fields here: model, loras"),
    ("long-prompt", json.dumps(_with({"prompt": "x" * 10_001})), 422, "prompts[0].prompt: String should have at most 10000"),
    ("not-json", "{\"model\": ", 422, "The request body is not valid JSON"),
    ("array-body", "[1, 2]", 422, "request body: Input should be a valid dictionary"),
    ("too-many-prompts", json.dumps({**BODY, "prompts": [PROMPT] * 65}), 422, "prompts: List should have at most 64"),
    ("empty-loras", json.dumps({**BODY, "loras": []}), 400, "At least one LoRA is required"),
    ("abs-path", json.dumps(_with(lora={"path": "/etc/passwd"})), 400, "is absolute"),
    ("nul-path", json.dumps(_with(lora={"path": "good.safetensors\x00.txt"})), 400, "contains a NUL character"),
    ("encoded-dotdot", json.dumps(_with(lora={"path": "..%2f..%2fetc%2fpasswd"})), 400,
     "LoRA file not found: ..%2f..%2fetc%2fpasswd"),
    ("png-bomb", json.dumps({**BODY, "model": "flux_kontext", "prompts": [{**PROMPT, "ctrl_img": png_declaring(8000, 8000)}]}),
     400, "Control image is 8000x8000, over the 16777216-pixel limit"),
    ("not-base64", json.dumps({**BODY, "model": "flux_kontext", "prompts": [{**PROMPT, "ctrl_img": "%%%"}]}), 400,
     "neither an http(s) URL nor valid base64"),
    ("nested-json", "[" * 100_000 + "]" * 100_000, 400, "There was an error parsing the body"),
    ("dotdot-path", json.dumps(_with(lora={"path": "../x.safetensors"})), 400, "contains '..'"),
    ("oversized-body", json.dumps(_with({"prompt": "p", "neg": "n" * 9000}, trigger_word="t") | {
        "prompts": [{**PROMPT, "neg": "n" * 9_000}] * 30}), 413, "over the 262144-byte limit (AITK_MAX_BODY_BYTES)"),
]


def _check_server_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text = detail["error"]["message"] if isinstance(detail, dict) else (
        detail if isinstance(detail, str) else " | ".join(e["msg"] for e in detail))
    assert message in text, text


@pytest.mark.parametrize("raw,status,message", [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_server_refuses_bad_bodies(redteam_server, raw, status, message):
    c = redteam_server["server"].client
    before = c.get("/v1/requests").json()["total"]
    _check_server_error(c.post("/v1/inference", content=raw, headers={"Content-Type": "application/json"}), status, message)
    assert c.get("/v1/requests").json()["total"] == before  # nothing was queued
    redteam_server["snapshot"].assert_unchanged()


def test_server_body_limit_holds_without_content_length(redteam_server):
    """A chunked body (no Content-Length) is cut off at the limit while streaming."""
    c = redteam_server["server"].client

    def chunks():
        yield b'{"model": "flux", "loras": [], "prompts": [{"prompt": "'
        for _ in range(64):
            yield b"x" * 8192
        yield b'"}]}'

    _check_server_error(c.post("/v1/inference", content=chunks(), headers={"Content-Type": "application/json"}), 413,
                        "over the 262144-byte limit")
    redteam_server["snapshot"].assert_unchanged()


INWARD_URLS = [
    ("{secret}/secret.safetensors", "'127.0.0.1' is a loopback address"),
    ("http://localhost:{port}/secret.safetensors", "'localhost' is a loopback name"),
    ("http://LOCALHOST./secret.safetensors", "is a loopback name"),
    ("http://[::1]:{port}/secret.safetensors", "'::1' is a loopback address"),
    ("http://[::ffff:127.0.0.1]:{port}/secret.safetensors", "is a loopback address"),
    ("http://[::ffff:7f00:1]:{port}/secret.safetensors", "is a loopback address"),
    ("http://2130706433:{port}/secret.safetensors", "'2130706433' is a loopback address"),
    ("http://0x7f.1:{port}/secret.safetensors", "is a loopback address"),
    ("http://0177.0.0.1:{port}/secret.safetensors", "is a loopback address"),
    ("http://127.1:{port}/secret.safetensors", "is a loopback address"),
    ("http://0.0.0.0:{port}/secret.safetensors", "is an unspecified address"),
    ("http://[::]:{port}/secret.safetensors", "is an unspecified address"),
    ("http://169.254.169.254/latest/meta-data/", "is a link-local address"),
    ("http://[fe80::1]/x", "is a link-local address"),
    ("http://10.0.0.1/x.safetensors", "is a private address"),
    ("http://172.16.5.4/x.safetensors", "is a private address"),
    ("http://192.168.1.1/x.safetensors", "is a private address"),
    ("http://[fd00::1]/x.safetensors", "is a private address"),
    ("http://100.64.0.1/x.safetensors", "not publicly routable"),
    ("http://224.0.0.1/x.safetensors", "is a multicast address"),
    ("http://[ff02::1]/x.safetensors", "is a multicast address"),
    ("http://240.0.0.1/x.safetensors", "address"),
    ("http://[64:ff9b::a00:1]/x.safetensors", "is a private address"),
    ("http://[2002:7f00:1::]/x.safetensors", "a 6to4 address wrapping a loopback address"),
    ("http://user:pw@example.com/x.safetensors", "A URL with credentials"),
    ("file:///etc/passwd", "only http:// and https://"),
    ("gopher://127.0.0.1:70/x", "only http:// and https://"),
]


@pytest.mark.parametrize("template,message", INWARD_URLS, ids=[re.sub(r"^\w+://|[{}]", "", u).split("/")[0] or u
                                                                 for u, _ in INWARD_URLS])
def test_server_refuses_inward_urls_at_submit(redteam_server, template, message):
    c = redteam_server["server"].client
    url = template.format(secret=redteam_server["secret"], port=redteam_server["port"])
    seen = len(redteam_server["seen"])
    lora = c.post("/v1/inference", json=_with(lora={"path": url}))
    _check_server_error(lora, 400, message)
    assert error_code(lora) == "INVALID_LORA_URL"
    control = c.post("/v1/inference", json={**BODY, "model": "flux_kontext", "prompts": [{**PROMPT, "ctrl_img": url}]})
    assert error_code(control) == "CONTROL_IMAGE_INVALID" and message in control.text, control.text
    assert len(redteam_server["seen"]) == seen and "pw" not in lora.text  # nothing was fetched; no credentials echoed
    redteam_server["snapshot"].assert_unchanged()


def _failed_job(redteam_server, body) -> dict:
    c = redteam_server["server"].client
    response = c.post("/v1/inference", json=body)
    assert response.status_code == 200, response.text
    status = wait_for(c, response.json()["request_id"])
    assert status["status"] == "failed", status
    return status


@pytest.mark.parametrize("case", ["name-resolving-inward", "name-resolving-both-ways", "allowed-name-redirecting-inward",
                                  "control-image-name"])
def test_server_refuses_inward_fetches_when_running(redteam_server, case):
    """Names are resolved and every address checked when fetched, on every redirect hop; the error says what was
    refused and why, never what answered there."""
    seen = len(redteam_server["seen"])
    port = redteam_server["port"]
    if case == "name-resolving-inward":
        status = _failed_job(redteam_server, _with(lora={"path": f"http://internal.example:{port}/secret.safetensors"}))
        assert "host 'internal.example' resolves to a loopback address" in status["error"]
    elif case == "name-resolving-both-ways":  # one allowed address does not make the internal one acceptable
        store_port = redteam_server["store"].rsplit(":", 1)[1]
        status = _failed_job(redteam_server, _with(lora={"path": f"http://mixed.example:{store_port}/good.safetensors"}))
        assert "host 'mixed.example' resolves to a loopback address" in status["error"]
        assert not [s for s in redteam_server["seen"][seen:] if s[0] == "127.0.0.2"]
    elif case == "allowed-name-redirecting-inward":
        # store.example is allow-listed; the redirect it sends to 127.0.0.1 is checked on its own and refused
        store_port = redteam_server["store"].rsplit(":", 1)[1]
        status = _failed_job(redteam_server, _with(lora={"path": f"{redteam_server['store']}/bounce.safetensors"}))
        assert "'127.0.0.1' is a loopback address" in status["error"], status
        assert [s[:2] for s in redteam_server["seen"][seen:]] == [("127.0.0.2", "/bounce.safetensors")], store_port
    else:
        body = {**BODY, "model": "flux_kontext",
                "prompts": [{**PROMPT, "ctrl_img": f"http://internal.example:{port}/pixel.png"}]}
        response = redteam_server["server"].client.post("/v1/inference", json=body)
        assert response.status_code == 200, response.text  # the kontext base is not loaded: the fetch fails first
        status = wait_for(redteam_server["server"].client, response.json()["request_id"])
        assert status["status"] == "failed" and "resolves to a loopback address" in status["error"], status
    assert "TOP-SECRET" not in json.dumps(status)
    assert not [s for s in redteam_server["seen"][seen:] if s[0] == "127.0.0.1"]  # the secret site got nothing
    redteam_server["snapshot"].assert_unchanged()


def test_server_connects_to_the_address_it_checked(redteam_server):
    """DNS rebinding: rebind.example answers 127.0.0.2 (allow-listed) when checked and 127.0.0.1 afterwards; the
    connection goes to the checked address, with the original Host header."""
    c = redteam_server["server"].client
    seen = len(redteam_server["seen"])
    store_port = redteam_server["store"].rsplit(":", 1)[1]
    task = submit(c, lora=f"http://rebind.example:{store_port}/good.safetensors")
    status = wait_for(c, task["request_id"])
    assert status["status"] == "succeeded", c.get(f"/v1/requests/{task['request_id']}/result").text
    assert redteam_server["queries"].count("rebind.example") == 1
    assert redteam_server["seen"][seen:] == [("127.0.0.2", "/good.safetensors", f"rebind.example:{store_port}")]
    redteam_server["snapshot"].assert_output_unchanged()


def test_server_tries_the_next_checked_address_when_one_does_not_answer(redteam_server):
    c = redteam_server["server"].client
    store_port = redteam_server["store"].rsplit(":", 1)[1]
    task = submit(c, lora=f"http://multi.example:{store_port}/good.safetensors")
    assert wait_for(c, task["request_id"])["status"] == "succeeded", c.get(f"/v1/requests/{task['request_id']}/result").text
    redteam_server["snapshot"].assert_output_unchanged()


def test_download_time_cap_stops_a_trickle(tmp_path):
    """A site that sends a byte at a time, each within the read timeout, is cut off at the total time cap."""
    from aitk_inference.server.downloads import DownloadError, FetchPolicy, fetch_lora

    class Trickle(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:  # the client hung up, as it should
                pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(DownloadError, match="took longer than the 0.5-second limit \\(AITK_DOWNLOAD_TIMEOUT\\)"):
            fetch_lora(f"http://127.0.0.1:{site.server_address[1]}/slow.safetensors", str(tmp_path), 10_000,
                       policy=FetchPolicy.from_entries(["127.0.0.1"], timeout_s=0.5))
        assert time.monotonic() - started < 5
        assert os.listdir(tmp_path) == []  # nothing half-written left behind
    finally:
        site.shutdown()
        site.server_close()


@pytest.mark.parametrize("lora,message", [("nan.safetensors", "lora_B holds NaN"),
                                          ("huge.safetensors", "flux produced an image with 12288 NaN/inf values")])
def test_server_never_succeeds_with_a_non_finite_output(redteam_server, lora, message):
    status = _failed_job(redteam_server, _with(lora={"path": lora}))
    assert message in status["error"], status
    result = redteam_server["server"].client.get(f"/v1/requests/{status['request_id']}/result").json()
    assert result["outputs"] is None
    redteam_server["snapshot"].assert_output_unchanged()


def test_server_output_is_bit_identical_after_the_bad_inputs(redteam_server):
    redteam_server["snapshot"].assert_output_unchanged()


# ---------------------------------------------------------------------------------------------------------------- crash
def test_sigkill_mid_job_then_restart_requeues_and_completes(tmp_path, tiny_dir, loras):
    """``python -m aitk_inference serve`` killed with SIGKILL while running a job: the next start queues it again
    (attempts 2) and the one behind it (attempts 1), both complete with whole output files; a task already started
    AITK_MAX_ATTEMPTS times, and one that would need its never-stored hf_token, are failed with the reason instead."""
    from PIL import Image

    from aitk_inference.server.mapping import Job, LoraSource
    from aitk_inference.server.store import TaskStore, utc_now

    import shutil

    workflows = tmp_path / "workflows"
    workflows.mkdir()
    shutil.copy(loras["good"], workflows / "style.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORKFLOWS_BASE_PATH": str(workflows), "OUTPUT_BASE_PATH": str(tmp_path / "out"), "DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "aitk_inference", "serve", "--port", str(port), "--base",
                             f"flux={tiny_dir('flux')}"], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.monotonic() + 90
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "CLI server did not start"
            time.sleep(0.1)
        killed = submit(client, lora="style.safetensors", steps=40)
        behind = submit(client, lora="style.safetensors")
        deadline = time.monotonic() + 60
        while True:
            status = client.get(f"/v1/requests/{killed['request_id']}/status").json()
            if (status["step"] or 0) >= 1:
                break
            assert status["status"] in ("in_queue", "in_progress") and time.monotonic() < deadline, status
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    # a task that already took the server down AITK_MAX_ATTEMPTS (3) times
    store = TaskStore(os.path.join(env["OUTPUT_BASE_PATH"], "tasks.sqlite3"))
    job = Job(id="crashes-the-server", model="flux", loras=[LoraSource(1.0, None, path=str(workflows / "style.safetensors"))],
              prompts=[{"prompt": "p", "width": 64, "height": 64, "steps": 2}], controls=[[]], output_format="png",
              hf_token=None, total_steps=2)
    store.add(job.id, "flux", {}, utc_now(), job.to_record(str(tmp_path / "out" / "inputs")))
    for _ in range(3):
        store.start(job.id)
    # and one whose URL LoRA needs the request's own hf_token, which is never stored
    private = Job(id="needs-its-token", model="flux", loras=[LoraSource(1.0, None, url="https://hf.co/me/private.safetensors")],
                  prompts=job.prompts, controls=[[]], output_format="png", hf_token="hf_secret", total_steps=2,
                  own_token=True)
    record = private.to_record(str(tmp_path / "out" / "inputs"))
    assert "hf_secret" not in json.dumps(record)
    store.add(private.id, "flux", {}, utc_now(), record)
    store.close()

    again = RunningServer(env, [f"flux={tiny_dir('flux')}"])
    try:
        c = again.client
        finals = [wait_for(c, t["request_id"], timeout=120) for t in (killed, behind)]
        assert [(f["status"], f["attempts"]) for f in finals] == [("succeeded", 2), ("succeeded", 1)], finals
        for task in (killed, behind):
            image = Image.open(io.BytesIO(c.get(f"/v1/requests/{task['request_id']}/outputs/0").content))
            assert image.size == (64, 64)
        gave_up = c.get("/v1/requests/crashes-the-server/status").json()
        assert gave_up["status"] == "failed" and gave_up["attempts"] == 3
        assert "3 time(s) (AITK_MAX_ATTEMPTS=3); it is not started again" in gave_up["error"]
        no_token = c.get("/v1/requests/needs-its-token/status").json()
        assert no_token["status"] == "failed" and "the hf_token for its URL LoRAs" in no_token["error"]
        leftovers = [n for n in os.listdir(env["OUTPUT_BASE_PATH"]) if ".partial" in n]
        assert not leftovers and not os.listdir(os.path.join(env["OUTPUT_BASE_PATH"], "inputs"))
    finally:
        again.stop()


def test_queued_inline_control_images_survive_a_restart(tmp_path):
    """A queued job's inline control images are kept as lossless PNG (never in the database) and read back."""
    from PIL import Image

    from aitk_inference.server.mapping import Job, LoraSource

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    job = Job(id="t1", model="flux_kontext", loras=[LoraSource(0.5, None, url="https://example.com/a.safetensors")],
              prompts=[{"prompt": "p", "steps": 2}], controls=[[image, "https://example.com/c.png"]],
              output_format="jpeg", hf_token="from-env", total_steps=2)
    record = json.loads(json.dumps(job.to_record(str(tmp_path))))
    restored = Job.from_record("t1", "flux_kontext", record, hf_token="from-env")
    assert np.array_equal(np.asarray(restored.controls[0][0]), np.asarray(image))
    assert restored.controls[0][1] == "https://example.com/c.png" and restored.loras == job.loras
    assert (restored.prompts, restored.output_format, restored.total_steps) == (job.prompts, "jpeg", 2)
    assert "from-env" not in json.dumps(record)


def test_output_retention_by_age_and_size(tmp_path):
    from aitk_inference.server.outputs import sweep_outputs
    from aitk_inference.server.store import TaskStore

    store = TaskStore(str(tmp_path / "tasks.sqlite3"))
    day = 24 * 3600.0
    now = time.time()
    for i, (age_days, size) in enumerate([(10, 100), (3, 300), (2, 300), (1, 300)]):
        path = tmp_path / f"t{i}_output_0.png"
        path.write_bytes(b"x" * size)
        finished = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - age_days * day))
        store.add(f"t{i}", "flux", {}, finished)
        store.update(f"t{i}", status="succeeded", finished_at=finished,
                     outputs={"images": [{"index": 0, "file_path": str(path)}], "videos": []})
    assert sweep_outputs(store, max_age=7 * day, max_bytes=0, now=now) == 1  # t0: older than 7 days
    assert sweep_outputs(store, max_age=7 * day, max_bytes=700, now=now) == 1  # t1: 900 bytes kept > 700
    kept = [os.path.exists(tmp_path / f"t{i}_output_0.png") for i in range(4)]
    assert kept == [False, False, True, True]
    assert [bool(store.get(f"t{i}")["outputs_deleted_at"]) for i in range(4)] == [True, True, False, False]
    store.close()
