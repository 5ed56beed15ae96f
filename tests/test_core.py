"""Core library on the tiny FLUX family: registry, base behaviour, LoRA layouts and modes, errors, CLI."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from aitk_inference.pipelines import get_spec
from aitk_inference.pipelines.runtime import cache
from aitk_inference.pipelines.runtime.options import LoadOptions
from aitk_inference.pipelines.base import GenerationInterrupted, snap_size
from aitk_inference.pipelines.lora.stack import LoraRequest
from aitk_inference.pipelines.lora.convert import LoraFormatError
from aitk_inference.tiny.loras import TRANSFORMER_LAYOUTS, lora_targets, make_state_dict, reference_deltas, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(width=64, height=64, steps=2, prompt="a photo of a cat")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def flux(load_tiny):
    return load_tiny("flux")


@pytest.fixture(scope="module")
def flux_loras(flux, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_loras")
    targets = lora_targets(flux.pipe.transformer)
    return {
        "a": write_lora(str(folder / "a.safetensors"), "peft", targets, seed=1),
        "b": write_lora(str(folder / "b.safetensors"), "peft", targets, seed=2),
        "kohya": write_lora(str(folder / "k.safetensors"), "kohya", targets, seed=3),
        "lokr": write_lora(str(folder / "lokr.safetensors"), "lokr", targets, seed=4),
    }


def run(pipeline, **kwargs):
    return pipeline.generate(**{**SMALL, **kwargs}).images


# ------------------------------------------------------------------------------------------------ registry & sizing
def test_unknown_model_id_lists_valid_ids():
    with pytest.raises(ValueError, match="Unknown model id 'fluxx'.*flux, "):
        get_spec("fluxx")


def test_import_is_light():
    code = "import sys, aitk_inference, aitk_inference.pipelines; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("value,divisor,expected", [
    (1024, 16, 1024), (1000, 16, 992), (700, 16, 688), (1000, 32, 992), (700, 32, 672), (60, 16, 64), (90, 16, 80),
    (64, 8, 64), (1023, 8, 1016),
])
def test_snap_size_floors_like_ai_toolkit(value, divisor, expected):
    assert snap_size(value, divisor) == expected


def test_effective_size_and_seed_reported(flux):
    result = flux.generate(prompt="x", width=100, height=90, steps=1)
    assert (result.width, result.height, result.seed) == (96, 80, 42)
    assert result.images.shape == (1, 80, 96, 3) and result.images.dtype == np.float32
    assert 0.0 <= result.images.min() and result.images.max() <= 1.0


def test_random_seed_is_reported_and_reproducible(flux):
    first = flux.generate(**{**SMALL, "seed": -1})
    assert 0 <= first.seed < 2**32
    np.testing.assert_array_equal(first.images, run(flux, seed=first.seed))


def test_trigger_word_replaced_only_when_set(flux):
    assert flux.generate(**{**SMALL, "steps": 1, "prompt": "[trigger] cat"}).params.prompt == "[trigger] cat"
    assert flux.generate(**{**SMALL, "steps": 1, "prompt": "[trigger] cat", "trigger_word": "sks"}).params.prompt == "sks cat"


# ------------------------------------------------------------------------------------------------ generation
def test_interrupt_stops_within_a_step_and_leaves_pipeline_intact(flux, flux_loras):
    flux.set_loras([LoraRequest(path=flux_loras["a"], strength=0.8)])
    before = run(flux, steps=4)
    seen = []

    def stop_at_two(step, total):
        seen.append(step)
        if step == 2:
            raise GenerationInterrupted("stop")

    with pytest.raises(GenerationInterrupted):
        flux.generate(**{**SMALL, "steps": 4}, progress=stop_at_two)
    assert seen == [1, 2]
    np.testing.assert_array_equal(run(flux, steps=4), before)
    assert [l["strength"] for l in flux.loras.describe()] == [0.8]
    flux.set_loras([])


# ------------------------------------------------------------------------------------------------ LoRA behaviour
# (every registry id: LoRA effect, strength 0, strength changes, fused vs dynamic in tests/test_families.py)
def test_lora_matches_every_block_linear_and_removal_restores_the_base(flux, flux_loras):
    flux.set_loras([])
    base = run(flux)
    targets = lora_targets(flux.pipe.transformer)
    summary = flux.set_loras([LoraRequest(path=flux_loras["a"], strength=1.0)])
    assert summary[0]["modules"] == len(targets) == 20
    flux.set_loras([])
    np.testing.assert_array_equal(run(flux), base)
    assert type(flux.pipe.transformer.transformer_blocks[0].attn.to_q) is torch.nn.Linear  # PEFT layers removed


def test_fused_equals_dynamic_for_a_stack_with_lokr(load_tiny, flux, flux_loras):
    fused = load_tiny("flux", lora_mode="fused")
    for pipeline in (flux, fused):
        pipeline.set_loras([LoraRequest(path=flux_loras["a"], strength=0.7), LoraRequest(path=flux_loras["lokr"], strength=-0.4)])
    np.testing.assert_allclose(run(fused), run(flux), atol=2e-5)
    # strength change in place, then back: fused weights return to within float32 rounding
    base_weight = fused.pipe.transformer.transformer_blocks[0].attn.to_q.weight.clone()
    fused.set_loras([LoraRequest(path=flux_loras["a"], strength=1.3), LoraRequest(path=flux_loras["lokr"], strength=-0.4)])
    fused.set_loras([LoraRequest(path=flux_loras["a"], strength=0.7), LoraRequest(path=flux_loras["lokr"], strength=-0.4)])
    assert (fused.pipe.transformer.transformer_blocks[0].attn.to_q.weight - base_weight).abs().max() < 1e-5
    flux.set_loras([])
    fused.set_loras([])
    np.testing.assert_allclose(run(fused), run(flux), atol=1e-5)


def test_stacked_loras_and_switch_without_reload(tiny_dir, flux_loras):
    cache.evict()
    loads = cache.stats["loads"]
    pipeline = cache.get_pipeline("flux", LoadOptions(base=tiny_dir("flux"), device="cpu", dtype="fp32"))
    transformer = pipeline.pipe.transformer
    pipeline.set_loras([(flux_loras["b"], 0.5)])
    only_b = run(pipeline)
    pipeline.set_loras([(flux_loras["a"], 1.0), (flux_loras["b"], 0.5)])
    both = run(pipeline)
    assert np.abs(both - only_b).max() > 1e-3
    pipeline.set_loras([(flux_loras["a"], 0.3), (flux_loras["b"], 0.5)])  # strength change: rescale in place
    assert pipeline.loras.stats["rescales"] >= 1
    pipeline.set_loras([(flux_loras["b"], 0.5)])  # switch back: remove A
    np.testing.assert_array_equal(run(pipeline), only_b)
    again = cache.get_pipeline("flux", LoadOptions(base=tiny_dir("flux"), device="cpu", dtype="fp32"))
    assert again is pipeline and again.pipe.transformer is transformer
    assert cache.stats["loads"] == loads + 1
    assert pipeline.loras.stats["files_converted"] == 2  # each file read and converted once
    pipeline.set_loras([])


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("layout", TRANSFORMER_LAYOUTS)
def test_every_layout_gives_the_direct_delta(load_tiny, tmp_path, layout, mode):
    pipeline = load_tiny("flux", lora_mode=mode)
    transformer = pipeline.pipe.transformer
    targets = lora_targets(transformer)
    sd = make_state_dict(layout, targets, seed=11)
    expected = reference_deltas(layout, sd)
    assert len(expected) == len(targets)
    path = write_lora(str(tmp_path / f"{layout}.safetensors"), layout, targets, seed=11)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    before = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in targets}
    summary = pipeline.set_loras([LoraRequest(path=path, strength=0.7)])
    assert summary[0]["modules"] == len(targets)
    with torch.no_grad():
        flat = {k.split(".", 1)[-1] if not k.startswith("lora_") else k: k for k in expected}
        for name, _ in targets:
            key = flat.get(name) or flat["lora_transformer_" + name.replace(".", "_")]
            delta = expected[key]
            module = transformer.get_submodule(name)
            inputs = x[:, : delta.shape[1]] if delta.shape[1] <= 64 else torch.randn(3, delta.shape[1])
            got = module(inputs) - torch.nn.functional.linear(inputs, *before[name])
            want = 0.7 * inputs @ delta.T
            if layout == "full":
                want = want + 0.7 * sd[f"{key}.diff_b"]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors_and_pipeline_stays_usable(flux, flux_loras, tmp_path):
    flux.set_loras([LoraRequest(path=flux_loras["a"], strength=1.0)])
    reference = run(flux)
    with pytest.raises(ValueError, match="width.*out of range"):
        flux.generate(prompt="x", width=8)
    with pytest.raises(ValueError, match="height.*out of range"):
        flux.generate(prompt="x", height=100000)
    with pytest.raises(ValueError, match="steps"):
        flux.generate(prompt="x", steps=-3)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(flux_loras["b"], "rb").read()[:300])
    html = tmp_path / "page.safetensors"
    html.write_text("<!doctype html><html>Not found</html>")
    for bad in (truncated, html):
        with pytest.raises(LoraFormatError, match="not a readable .safetensors"):
            flux.set_loras([(flux_loras["a"], 1.0), (str(bad), 1.0)])
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        flux.set_loras([(str(tmp_path / "missing.safetensors"), 1.0)])
    with pytest.raises(ValueError, match="outside -2.0..2.0"):
        flux.set_loras([(flux_loras["a"], 3.0)])
    sdxl_like = tmp_path / "sdxl.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_2_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_2_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, str(sdxl_like))
    with pytest.raises(LoraFormatError, match="none of its 2 modules exist in model 'flux'.*SDXL"):
        flux.set_loras([(str(sdxl_like), 1.0)])
    wan_like = tmp_path / "wan.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 8),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(8, 4)}, str(wan_like))
    with pytest.raises(LoraFormatError, match="Wan"):
        flux.set_loras([(str(wan_like), 1.0)])
    wrong_shape = tmp_path / "wide.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, str(wrong_shape))
    with pytest.raises(LoraFormatError, match="shapes do not match"):
        flux.set_loras([(str(wrong_shape), 1.0)])
    # the failed calls left the pipeline exactly as it was
    assert [l["name"] for l in flux.loras.describe()] == ["a.safetensors"]
    np.testing.assert_array_equal(run(flux), reference)
    flux.set_loras([])


def test_failed_transition_restores_previous_set(flux, flux_loras, monkeypatch):
    flux.set_loras([(flux_loras["a"], 0.5)])
    reference = run(flux)
    original = flux.loras._add

    def add_then_fail(slot, loaded, strength):
        original(slot, loaded, strength)
        if loaded.label == "b.safetensors":
            raise RuntimeError("simulated failure while patching")

    monkeypatch.setattr(flux.loras, "_add", add_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        flux.set_loras([(flux_loras["b"], 1.0)])
    monkeypatch.undo()
    assert [l["name"] for l in flux.loras.describe()] == ["a.safetensors"]
    np.testing.assert_array_equal(run(flux), reference)
    flux.set_loras([])


def test_kontext_uses_control_image(load_tiny):
    kontext = load_tiny("flux_kontext")
    red = np.zeros((40, 50, 3), np.float32)
    red[..., 0] = 1.0
    a = run(kontext, control_images=[red])
    b = run(kontext, control_images=[1.0 - red])
    assert a.shape == (1, 64, 64, 3) and np.abs(a - b).max() > 1e-4


# ------------------------------------------------------------------------------------------------ CLI
def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "aitk_inference", *args], capture_output=True, text=True, env=env, cwd=cwd)


def _cli_in_this_process(capsys, *args):
    """``python -m aitk_inference ARGS`` through the function the module runs (``raise SystemExit(main())``), for the
    checks that need no process of their own: a new one pays about 4 s importing torch and diffusers before it starts.
    Returns (exit status, stdout, stderr)."""
    from aitk_inference.cli import main

    capsys.readouterr()
    try:
        status = main(list(args))
    except SystemExit as exit:  # argparse's refusals
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_models_json():
    out = _cli("models", "--json")
    assert out.returncode == 0, out.stderr
    ids = {m["id"]: m for m in json.loads(out.stdout)}
    assert ids["flux"]["steps"] == 25 and ids["flux"]["resolution_divisor"] == 16 and ids["flux_kontext"]["requires_control_image"]


def test_cli_generate_writes_png_with_parameters(tiny_dir, flux_loras, tmp_path, capsys):
    from PIL import Image

    out_file = tmp_path / "out.png"
    out = _cli("generate", "--model", "flux", "--base", tiny_dir("flux"), "--lora", f"{flux_loras['a']}:0.5",
               "--prompt", "[trigger] dog", "--trigger", "sks", "--width", "70", "--height", "64", "--steps", "2",
               "--seed", "3", "--out", str(out_file), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "size 64x64" in out.stdout and "seed 3" in out.stdout and "20 modules" in out.stdout
    with Image.open(out_file) as image:
        params = json.loads(image.text["parameters"])
        assert image.size == (64, 64)
    assert params["prompt"] == "sks dog" and params["loras"] == [{"name": "a.safetensors", "strength": 0.5}]
    status, _, err = _cli_in_this_process(capsys, "generate", "--model", "nope", "--prompt", "x", "--out",
                                          str(tmp_path / "x.png"))
    assert status == 2 and "Unknown model id 'nope'" in err


def test_cli_option_flags_become_generation_options(tmp_path):
    from aitk_inference.cli import build_parser

    base = ["generate", "--model", "krea2_o_edit", "--prompt", "x", "--out", str(tmp_path / "x.png")]
    args = build_parser().parse_args(base + ["--option", "kv_cache=false", "--option", "schedule_mu=0.8",
                                             "--option", " label = a b"])
    assert args.option == [("kv_cache", False), ("schedule_mu", 0.8), ("label", " a b")]
    bad = _cli(*base, "--option", "kv_cache")
    assert bad.returncode == 2 and "expected NAME=VALUE" in bad.stderr


def test_cli_make_tiny(tmp_path, capsys):
    """(``demo --quiet`` runs in-process for every id in test_demo_all, and in a process of its own below.)"""
    status, _, err = _cli_in_this_process(capsys, "make-tiny", "--model", "flux", "--out", str(tmp_path / "tiny_flux"))
    assert status == 0, err
    assert (tmp_path / "tiny_flux" / "model_index.json").is_file()
    assert sorted(os.listdir(tmp_path / "tiny_flux" / "loras")) == sorted(f"tiny_{l}.safetensors" for l in TRANSFORMER_LAYOUTS)


def test_cli_demo_prints_no_warnings(tiny_cache, tmp_path):
    """The demo prints its report and its progress bar, nothing else: no library warnings (transformers imports
    torchao whenever it is installed, and torchao's import logs about its optional kernels)."""
    demo = _cli("demo", "--out", str(tmp_path / "demo.png"))
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "demo.png").is_file()
    progress = re.compile(r"flux:\s+\d+%\|")
    stray = [line for line in re.split(r"[\r\n]+", demo.stderr) if line.strip() and not progress.match(line)]
    assert not stray, f"unexpected output on stderr: {stray}"
    report = ("tiny flux pipeline (random weights) at ", "wrote ", "  LoRA demo_lora.safetensors: ", "demo done in ")
    assert [line.startswith(report) for line in demo.stdout.splitlines()] == [True] * 4, demo.stdout


def test_cli_generate_selects_attention_and_quantize(tiny_dir, tmp_path, capsys):
    status, out, err = _cli_in_this_process(
        capsys, "generate", "--model", "flux", "--base", tiny_dir("flux"), "--device", "cpu", "--attention",
        "sdpa_math", "--prompt", "a dog", "--width", "64", "--height", "64", "--steps", "2", "--out",
        str(tmp_path / "m.png"), "--quiet")
    assert status == 0, err
    assert (tmp_path / "m.png").is_file() and "size 64x64" in out
    bad = _cli("generate", "--model", "flux", "--attention", "fast", "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "invalid choice: 'fast'" in bad.stderr and "sdpa_math" in bad.stderr
    status, _, err = _cli_in_this_process(capsys, "generate", "--model", "flux", "--base", tiny_dir("flux"), "--device",
                                          "cpu", "--quantize", "fp8", "--prompt", "x", "--out", str(tmp_path / "y.png"),
                                          "--quiet")
    assert status == 2 and "FP8 needs a CUDA GPU" in err
    assert not (tmp_path / "y.png").exists()


@pytest.fixture
def hub_that_refuses():
    """A local stand-in for the Hugging Face hub's API that answers as the real one does for a gated repo (401,
    ``X-Error-Code: GatedRepo``) and for a repo that does not exist (404, ``RepoNotFound``): what huggingface_hub
    turns into its GatedRepoError and RepositoryNotFoundError. Returns its address, for HF_ENDPOINT."""
    import http.server
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def answer(self):
            status, code = (401, "GatedRepo") if "/gated/" in self.path else (404, "RepoNotFound")
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_cli_says_what_to_do_when_the_base_cannot_be_had_from_the_hub(tmp_path, monkeypatch, hub_that_refuses):
    """A hub base that is not downloaded, with no network; a gated repo without a login; a repo that does not exist:
    each ends in one line naming the repo and what to do, exit status 2, no traceback (diffusers raises an OSError
    whose cause is the hub's error). The real loading code runs against an empty hub cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for variable in ("HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY",
                     "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    args = ("generate", "--model", "flux", "--device", "cpu", "--prompt", "x", "--out", str(tmp_path / "x.png"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = _cli(*args)
    assert offline.returncode == 2 and "Traceback" not in offline.stderr, offline.stderr
    assert offline.stderr.startswith("error: flux: black-forest-labs/FLUX.1-dev is not (fully) downloaded in the "
                                     f"Hugging Face cache ({tmp_path / 'hf' / 'hub'})")
    assert "(HF_HUB_OFFLINE is set)" in offline.stderr
    assert "`huggingface-cli download black-forest-labs/FLUX.1-dev`" in offline.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", hub_that_refuses)
    gated = _cli(*args, "--base", "gated/model")
    assert gated.returncode == 2 and "Traceback" not in gated.stderr, gated.stderr
    assert gated.stderr.startswith("error: flux: gated/model is a gated repo")
    assert "huggingface.co/gated/model" in gated.stderr
    missing = _cli(*args, "--base", "nobody/nothing")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert missing.stderr.startswith("error: flux: the hub has no repo 'nobody/nothing'")
    assert not (tmp_path / "x.png").exists()


def test_a_second_repo_missing_offline_is_named_as_such(tiny_dir, tmp_path, monkeypatch):
    """HiDream loads Llama-3.1 from its own repo when the base folder has no text_encoder_4: offline with an empty
    cache, transformers' error names no repo, so the message says a repo beside the base is missing (not the local
    base itself) and keeps the library's first line."""
    import shutil

    from huggingface_hub import constants

    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.pipelines.hub import BaseUnavailableError

    base = tmp_path / "hidream"
    shutil.copytree(tiny_dir("hidream"), base, ignore=shutil.ignore_patterns("text_encoder_4", "tokenizer_4", "loras"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BaseUnavailableError, match=r"^hidream: a file it loads from the Hugging Face hub beside its "
                                                    r"base .* is not in the cache .* \(We couldn't connect"):
        load_pipeline("hidream", base=str(base), device="cpu", dtype="fp32")


def test_cli_out_of_gpu_memory_says_what_to_lower(tiny_dir, tmp_path, monkeypatch, capsys):
    """Attention running out of GPU memory (raised where torch raises it, as on a card too small for the size asked)
    ends in one line that names the options that need less memory, exit status 2, no traceback and no image."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nmore details")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", out_of_memory)
    status, _, err = _cli_in_this_process(capsys, "generate", "--model", "flux", "--base", tiny_dir("flux"), "--device",
                                          "cpu", "--prompt", "x", "--width", "64", "--height", "64", "--steps", "2",
                                          "--out", str(tmp_path / "x.png"), "--quiet")
    assert status == 2 and "Traceback" not in err
    assert err.startswith("error: out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB.). Ask for less: "
                          "--offload auto") and "--vae-tiling" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_before_change_hook_runs_only_when_weights_change(flux, flux_loras):
    """The pipeline takes sequential-offload hooks off around a LoRA change through this hook (checked on an H100:
    outputs under sequential offload equal offload none in both LoRA modes); an unchanged set must not pay for it."""
    import contextlib

    calls = []

    @contextlib.contextmanager
    def record():
        calls.append("change")
        yield

    flux.loras.set([LoraRequest(path=flux_loras["a"], strength=0.5)], before_change=record)
    flux.loras.set([LoraRequest(path=flux_loras["a"], strength=0.5)], before_change=record)  # unchanged: no call
    flux.loras.set([LoraRequest(path=flux_loras["a"], strength=0.6)], before_change=record)
    flux.loras.set([], before_change=record)
    assert calls == ["change"] * 3


def test_vae_tiling_is_per_call(flux, load_tiny):
    plain = run(flux)
    tiled = flux.generate(**SMALL, vae_tiling=True).images  # smaller than one tile: the same decode
    np.testing.assert_allclose(tiled, plain, atol=1e-6)
    assert not flux.pipe.vae.use_tiling  # switched off again after the call
    wan = load_tiny("wan21_1b")
    frames = dict(prompt="x", width=64, height=64, steps=1, num_frames=5)
    np.testing.assert_allclose(wan.generate(**frames, vae_tiling=True).images, wan.generate(**frames).images, atol=1e-5)


def test_a_decode_out_of_gpu_memory_is_run_again_in_tiles(load_tiny, monkeypatch, caplog):
    """Without vae_tiling, a decode that runs out of GPU memory is retried in tiles (the image an explicit
    vae_tiling=True gives), with a warning; tiling is off again afterwards, and a tiled decode that does not fit
    either raises. The out-of-memory error is raised here by a VAE that fails untiled; small tiles make tiling real."""
    flux = load_tiny("flux")
    vae = flux.pipe.vae
    monkeypatch.setattr(vae, "tile_sample_min_size", 32)
    monkeypatch.setattr(vae, "tile_latent_min_size", 4)
    untiled = flux.generate(**SMALL).images
    tiled = flux.generate(**SMALL, vae_tiling=True).images
    assert np.abs(tiled - untiled).max() > 1e-3
    real_decode, fits_in_tiles = vae.decode, [True]

    def decode(*args, **kwargs):
        if not vae.use_tiling or not fits_in_tiles[0]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    with caplog.at_level("WARNING", logger="aitk_inference.pipelines.base"):
        retried = flux.generate(**SMALL).images
    np.testing.assert_array_equal(retried, tiled)
    assert "decoding again in tiles" in caplog.text and not vae.use_tiling and vae.decode is decode
    fits_in_tiles[0] = False
    with pytest.raises(torch.OutOfMemoryError):
        flux.generate(**SMALL)
    assert not vae.use_tiling and vae.decode is decode


@pytest.mark.parametrize("lora_mode", ["dynamic", "fused"])
def test_group_offload_reapplies_after_lora_changes(load_tiny, flux_loras, lora_mode):
    """On the CPU group offloading moves nothing, but the LoRA path (hooks re-applied around every change) runs for
    real; tests/test_gpu.py checks the same on CUDA."""
    reference = load_tiny("flux", lora_mode=lora_mode)
    grouped = load_tiny("flux", lora_mode=lora_mode, offload="group")
    for strength in (0.7, 0.2):
        for pipeline in (reference, grouped):
            pipeline.set_loras([(flux_loras["a"], strength)])
        np.testing.assert_allclose(run(grouped), run(reference), atol=1e-6)
    with pytest.raises(ValueError, match="Unknown offload mode 'disk'"):
        load_tiny("flux", offload="disk")


@pytest.mark.parametrize("key,family", [
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "FLUX.1"),
    ("diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight", "FLUX.2"),
    ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "Wan"),
    ("diffusion_model.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight", "Qwen-Image"),
    ("diffusion_model.layers.0.attention.to_q.lora_A.weight", "Z-Image"),
    ("diffusion_model.ref_image_refiner.0.attn.to_q.lora_A.weight", "OmniGen2"),
    ("transformer.layers.0.attn.to_q.lora_A.weight", "Lumina2 or OmniGen2"),
    ("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight", "CogView4"),
    ("diffusion_model.layers.0.self_attention.to_q.lora_A.weight", "ERNIE-Image"),
    ("diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight", "Anima"),
    ("diffusion_model.llm_adapter.blocks.0.mlp.0.lora_A.weight", "Anima"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "SDXL"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "SD 1.5"),
])
def test_wrong_family_errors_name_the_family(key, family):
    from aitk_inference.pipelines.lora.convert import guess_architecture

    assert guess_architecture([key]).startswith(family)


def test_fused_unfuse_in_bf16_is_within_rounding(load_tiny, flux_loras):
    """Unloading a fused LoRA restores bf16 weights up to rounding: each in-place change (add, rescale, remove) rounds
    once to bf16, so a weight ends within 3 half-ulps of the largest magnitude it took on the way."""
    pipeline = load_tiny("flux", dtype="bf16", lora_mode="fused")
    modules = lora_targets(pipeline.pipe.transformer)
    before = {name: m.weight.detach().clone() for name, m in modules}
    largest = {name: w.abs().float() for name, w in before.items()}
    for strength in (1.0, 0.3):
        pipeline.set_loras([(flux_loras["a"], strength)])
        for name, module in modules:
            largest[name] = torch.maximum(largest[name], module.weight.detach().abs().float())
    pipeline.set_loras([])
    half_ulp = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding moves a value by at most 2^-8 of its magnitude
    for name, module in modules:
        drift = (module.weight.detach().float() - before[name].float()).abs()
        assert (drift <= 3 * half_ulp * largest[name]).all(), name
    # live (dynamic) adapters never touch the weights: removing them gives the base back bit for bit, in bf16 too
    dynamic = load_tiny("flux", dtype="bf16", lora_mode="dynamic")
    base = {name: m.weight.detach().clone() for name, m in lora_targets(dynamic.pipe.transformer)}
    dynamic.set_loras([(flux_loras["a"], 0.8)])
    dynamic.set_loras([])
    for name, module in lora_targets(dynamic.pipe.transformer):
        assert torch.equal(module.weight, base[name]), name


# ------------------------------------------------------------------------------------------------ load options
def _attention_backends(denoiser) -> set:
    """The attention backend every selectable attention processor of ``denoiser`` reports."""
    return {str(module.processor._attention_backend.value) for module in denoiser.modules()
            if hasattr(getattr(module, "processor", None), "_attention_backend")}


def test_attention_sdpa_math_matches_default(flux, load_tiny):
    from aitk_inference.pipelines.runtime.options import ATTENTION_KERNELS

    math = load_tiny("flux", attention="sdpa_math")
    assert (math.attention, flux.attention) == ("sdpa_math", "sdpa")
    assert _attention_backends(math.pipe.transformer) == {ATTENTION_KERNELS["sdpa_math"]}
    assert _attention_backends(flux.pipe.transformer) == {ATTENTION_KERNELS["sdpa"]}  # named on every layer
    # kernels of the same attention differ only in floating-point rounding
    default = run(flux, seed=5)
    forced = run(math, seed=5)
    assert np.abs(default - forced).max() < 1e-4


def test_hidream_attention_kernel_is_selectable(load_tiny):
    """diffusers' HiDream processor calls torch's SDPA itself; ours goes through diffusers' dispatcher, so HiDream
    takes ``attention=`` like the other transformers."""
    from aitk_inference.pipelines.runtime.options import ATTENTION_KERNELS

    default, math = load_tiny("hidream"), load_tiny("hidream", attention="sdpa_math")
    assert _attention_backends(math.pipe.transformer) == {ATTENTION_KERNELS["sdpa_math"]}
    assert _attention_backends(default.pipe.transformer) == {ATTENTION_KERNELS["sdpa"]}
    assert np.abs(run(default, seed=5) - run(math, seed=5)).max() < 1e-4


def test_attention_choices_fail_clearly(tiny_dir, load_tiny):
    with pytest.raises(ValueError, match="Unknown attention kernel 'fast'; use one of sdpa, sdpa_cudnn, .*sdpa_math"):
        load_tiny("flux", attention="fast")
    with pytest.raises(ValueError, match="'sdpa_cudnn' is a CUDA kernel; on cpu use 'sdpa' or 'sdpa_math'"):
        load_tiny("flux", attention="sdpa_cudnn")
    # flash-attn is a CUDA-only package: either the device or the missing package is named
    with pytest.raises(ValueError, match="flash_attn") as error:
        load_tiny("flux", attention="flash_attn")
    assert "CUDA" in str(error.value) or "flash-attn" in str(error.value), error.value
    # a UNet has no selectable attention: only the default is accepted
    with pytest.raises(ValueError, match="sd15's UNet2DConditionModel cannot choose its attention kernel; use "
                                         "attention='sdpa'"):
        load_tiny("sd15", attention="sdpa_math")
    sd15 = load_tiny("sd15", attention="sdpa")
    assert sd15.attention == "sdpa" and np.isfinite(run(sd15)).all()


def test_a_kernel_without_masks_on_a_model_that_masks_says_which_kernel_to_use(load_tiny):
    """Chroma masks its padded text tokens; diffusers' mask-less kernels (here torch's flash kernel, the one that
    needs no package) raise for such a call. The error names the model, the kernel and the fix, and the pipeline
    still generates once its kernel is set back."""
    from aitk_inference.pipelines.runtime.accelerate import set_attention_kernel

    chroma = load_tiny("chroma")
    expected = run(chroma, seed=5)
    set_attention_kernel([chroma.pipe.transformer], "sdpa_flash", "cuda", "chroma")  # the device check passes
    chroma.attention = "sdpa_flash"
    with pytest.raises(ValueError, match="chroma masks its attention .*attention='sdpa_flash' cannot take; load it "
                                         "with attention='sdpa'"):
        run(chroma, seed=5)
    set_attention_kernel([chroma.pipe.transformer], "sdpa", "cpu", "chroma")
    chroma.attention = "sdpa"
    assert np.array_equal(run(chroma, seed=5), expected)


def test_quantize_fp8_needs_a_cuda_gpu(load_tiny):
    with pytest.raises(ValueError, match="FP8 needs a CUDA GPU.*not 'cpu'"):
        load_tiny("flux", quantize="fp8")
    with pytest.raises(ValueError, match="Unknown quantize mode 'int4'; use one of none, fp8"):
        load_tiny("flux", quantize="int4")


def test_cache_key_includes_attention_and_quantize(monkeypatch):
    from aitk_inference.pipelines.runtime import options

    key = LoadOptions(device="cpu", dtype="fp32").cache_key("flex1")
    assert key[-2:] == ("sdpa", "none") and key[5] == "fused"  # flex1's registry LoRA mode
    assert LoadOptions(device="cpu", dtype="fp32", attention="sdpa").cache_key("flex1") == key
    assert LoadOptions(device="cpu", dtype="fp32", attention="sdpa_math").cache_key("flex1") != key
    monkeypatch.setattr(options, "fp8_unavailable", lambda device: None)  # as on an FP8 GPU
    fp8 = LoadOptions(device="cpu", dtype="fp32", quantize="fp8").cache_key("flex1")
    assert fp8 != key and fp8[-1] == "fp8"
    assert fp8[5] == "fused"  # FP8 weights follow the LoRA mode asked for (or the registry's)
    dynamic = LoadOptions(device="cpu", dtype="fp32", quantize="fp8", lora_mode="dynamic")
    assert dynamic.cache_key("flex1")[5] == "dynamic"


def test_persistent_compile_cache_folder(monkeypatch, tmp_path):
    from aitk_inference.pipelines.runtime.accelerate import use_persistent_compile_cache

    # setenv first, so that the variable the function sets is removed again after the test
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unused")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("AITK_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = str(tmp_path / "home" / ".cache" / "aitk_inference" / "torchinductor")
    assert use_persistent_compile_cache() == default and os.path.isdir(default)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("AITK_COMPILE_CACHE", str(tmp_path / "ours"))
    assert use_persistent_compile_cache() == str(tmp_path / "ours") and (tmp_path / "ours").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ours")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch"))  # torch's own variable wins
    assert use_persistent_compile_cache() == str(tmp_path / "torch") and (tmp_path / "torch").is_dir()


def test_each_image_of_a_batch_reports_its_own_seed(flux):
    from aitk_inference.pipelines.base import MAX_SEED

    result = flux.generate(prompt="x", width=64, height=64, steps=1, seed=5, batch_size=2)
    assert result.params.seeds == [5, 6] and result.seed == 5
    assert [result.metadata(i)["seed"] for i in range(2)] == [5, 6]
    with pytest.raises(ValueError, match=r"uses seed \+ i: with batch_size 2, `seed` must be at most"):
        flux.generate(prompt="x", width=64, height=64, steps=1, seed=MAX_SEED, batch_size=2)
