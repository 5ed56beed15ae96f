"""Load options as one type: each option's validation, the device rules checked before any weights load, the cache
key of equivalent spellings, and the node, CLI and server choice lists read from ``pipelines.runtime.options``."""

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from aitk_inference.pipelines import get_spec
from aitk_inference.pipelines.runtime import options as opts
from aitk_inference.pipelines.runtime.options import LoadOptionError, LoadOptions


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("option,value,message", [
    ("dtype", "int8", "Unknown dtype 'int8'; use one of auto, fp32, bf16, fp16."),
    ("dtype", "AUTO", "Unknown dtype 'AUTO'; use one of auto, fp32, bf16, fp16."),  # "auto" is spelled in lower case
    ("offload", "disk", "Unknown offload mode 'disk'; use one of none, model, sequential, group, auto."),
    ("lora_mode", "merged", "Unknown LoRA mode 'merged'; use one of dynamic, fused."),
    ("compile", "max", "Unknown compile mode 'max'; use one of none, regional, full."),
    ("attention", "fast", "Unknown attention kernel 'fast'; use one of sdpa, sdpa_cudnn, sdpa_flash, sdpa_efficient, "
                          "sdpa_math, flash_attn, flash_attn_3, flash_attn_3_fp8, sage, xformers."),
    ("quantize", "int4", "Unknown quantize mode 'int4'; use one of none, fp8."),
])
def test_each_option_rejects_values_outside_its_choices(option, value, message):
    with pytest.raises(LoadOptionError) as error:
        LoadOptions(**{option: value})
    assert str(error.value) == message
    assert error.value.options == {option: value} and error.value.choices == opts.CHOICES[option][1]
    assert isinstance(error.value, ValueError)


def test_unset_options_take_their_defaults():
    unset = dict(base=None, device=None, dtype=None, offload=None, lora_mode=None, compile=None, attention=None,
                 quantize=None)
    assert LoadOptions(**unset) == LoadOptions() == LoadOptions(**{name: "" for name in unset})
    assert (LoadOptions().offload, LoadOptions().compile, LoadOptions().attention, LoadOptions().quantize) == \
        ("none", "none", "sdpa", "none")
    assert LoadOptions().lora_mode is None and LoadOptions().base is None


def test_every_choice_and_dtype_spelling_is_accepted():
    for option, (_, choices) in opts.CHOICES.items():
        for value in choices:
            assert getattr(LoadOptions(**{option: value}), option) == value
    for spelling in (*opts.TORCH_DTYPE_NAMES, "BF16", "Half", torch.float16):
        assert LoadOptions(dtype=spelling).dtype == spelling


def test_fp8_with_offload_is_refused_before_any_device_check():
    with pytest.raises(LoadOptionError, match="quantize='fp8' cannot be combined with offload='group'") as error:
        LoadOptions(quantize="fp8", offload="group")
    assert error.value.options == {"quantize": "fp8", "offload": "group"} and error.value.choices == ()


def test_device_rules_are_checked_before_any_weights_load():
    from aitk_inference.pipelines import load_pipeline

    missing = "/nonexistent/aitk-options-test"  # loading it would fail with FileNotFoundError or a hub error
    with pytest.raises(LoadOptionError, match="'sdpa_cudnn' is a CUDA kernel; on cpu use 'sdpa' or 'sdpa_math'"):
        load_pipeline("flux", base=missing, device="cpu", attention="sdpa_cudnn")
    with pytest.raises(LoadOptionError, match="FP8 needs a CUDA GPU.*not 'cpu'"):
        load_pipeline("flux", base=missing, device="cpu", quantize="fp8")
    with pytest.raises(LoadOptionError, match="Unknown offload mode 'disk'"):
        load_pipeline("flux", base=missing, device="cpu", offload="disk")
    # the kernels that run anywhere pass on the CPU
    for kernel in opts.PORTABLE_ATTENTION_KERNELS:
        assert LoadOptions(device="cpu", attention=kernel).resolve(get_spec("flux")).attention == kernel


# ------------------------------------------------------------------------------------------------ resolution and cache key
def test_resolve_fills_every_default_from_the_model():
    spec = get_spec("flex1")
    resolved = LoadOptions(device="cpu").resolve(spec)
    assert (resolved.base, resolved.device, resolved.dtype, resolved.lora_mode) == \
        (spec.base, "cpu", torch.float32, spec.lora_mode)
    assert LoadOptions(base="~/weights", device="cpu", lora_mode="dynamic").resolve(spec).base == \
        os.path.expanduser("~/weights")
    assert LoadOptions(device="cpu", lora_mode="dynamic").resolve(spec).lora_mode == "dynamic"


def test_cache_key_is_equal_for_equivalent_spellings(tmp_path):
    key = LoadOptions(device="cpu").cache_key("flux")
    for dtype in ("auto", "", "fp32", "float32", "FP32", torch.float32):
        assert LoadOptions(device="cpu", dtype=dtype).cache_key("flux") == key, dtype
    assert LoadOptions(device="cpu", offload="none", attention="sdpa", quantize="none", compile="none",
                       lora_mode=get_spec("flux").lora_mode).cache_key("flux") == key
    assert LoadOptions(device="cpu", dtype="bf16").cache_key("flux") != key
    assert LoadOptions(device="cpu", lora_mode="fused").cache_key("flux") != key
    assert LoadOptions(device="cpu").cache_key("flex1") != key
    # a folder and a link to it load the same pipeline
    folder = tmp_path / "weights"
    folder.mkdir()
    os.symlink(folder, tmp_path / "link")
    assert LoadOptions(base=str(folder), device="cpu").cache_key("flux") == \
        LoadOptions(base=str(tmp_path / "link"), device="cpu").cache_key("flux")


# ------------------------------------------------------------------------------------------------ front ends
def test_options_module_imports_no_torch():
    code = ("import sys, aitk_inference.pipelines.runtime.options, aitk_inference.cli as cli; cli.build_parser(); "
            "import aitk_inference.server.settings; print([m for m in ('torch', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_node_choices_come_from_the_options_module():
    from aitk_inference.nodes.schema import LOAD

    choices = {field.name: list(field.options()) for field in LOAD.inputs if field.type == "COMBO"}
    assert choices["dtype"] == list(opts.DTYPES)
    assert choices["offload"] == list(opts.OFFLOAD_MODES)
    assert choices["attention"] == list(opts.ATTENTION_KERNELS)
    assert choices["quantize"] == list(opts.QUANTIZE_MODES)
    assert choices["lora_mode"] == ["model default", *opts.LORA_MODES]
    assert set(choices["compile"]) <= set(opts.COMPILE_MODES)
    # saved workflows store these values: they must never change
    assert choices["lora_mode"] == ["model default", "dynamic", "fused"] and choices["compile"] == ["none", "regional"]


def test_cli_choices_come_from_the_options_module():
    from aitk_inference.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices = {a.dest: list(a.choices) for a in subparsers.choices["generate"]._actions if a.choices}
    assert choices == {"offload": list(opts.OFFLOAD_MODES), "lora_mode": list(opts.LORA_MODES),
                       "compile": list(opts.COMPILE_MODES), "attention": list(opts.ATTENTION_KERNELS),
                       "quantize": list(opts.QUANTIZE_MODES)}


def test_server_settings_take_every_choice_and_name_the_variable():
    from aitk_inference.server.settings import LOAD_OPTION_ENV, Settings

    for option, (_, choices) in opts.CHOICES.items():
        variable = LOAD_OPTION_ENV[option]
        for value in choices:
            assert getattr(Settings.from_env({variable: value.upper()}).load, option) == value
        with pytest.raises(ValueError, match=f"^{variable}='bad' is not valid; use one of {', '.join(choices)}.$"):
            Settings.from_env({variable: "bad"})
    settings = Settings.from_env({"DEVICE": "cpu", "AITK_BASES": "flux=/models/flux"})
    assert settings.load_options("flux") == LoadOptions(base="/models/flux", device="cpu")
    assert settings.load_options("flex1") == LoadOptions(device="cpu")


def test_auto_offload_picks_the_fastest_placement_that_fits():
    from aitk_inference.pipelines.runtime.accelerate import choose_offload

    gib = 2**30
    sizes = {"transformer": 24 * gib, "text_encoder_2": 9 * gib, "vae": gib // 4}
    reserve = 3 * gib
    assert choose_offload(sizes, budget=None, reserve=reserve) == "none"  # not a CUDA device
    assert choose_offload(sizes, budget=80 * gib, reserve=reserve) == "none"
    assert choose_offload(sizes, budget=30 * gib, reserve=reserve) == "model"  # 27 GiB fits, 36.25 does not
    assert choose_offload(sizes, budget=24 * gib, reserve=reserve) == "group"  # the transformer alone does not fit
    assert choose_offload(sizes, budget=0, reserve=reserve) == "group"


def test_auto_offload_on_the_cpu_keeps_everything_in_place_and_fp8_accepts_it(load_tiny):
    import numpy as np

    assert opts.fp8_option_conflict("auto") is None
    auto = load_tiny("flux", offload="auto")
    assert auto.offload == "none"
    gen = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 3}
    assert np.array_equal(auto.generate(**gen).images, load_tiny("flux").generate(**gen).images)


def test_a_family_that_cannot_offload_takes_auto_and_refuses_the_rest(load_tiny, monkeypatch):
    """A modular pipeline has no whole-component offloading: where auto would move whole components it streams the
    denoiser's blocks instead (tests/test_streaming.py runs it); the explicit modes are refused with the reason."""
    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.pipelines.base import AITKPipeline
    from aitk_inference.pipelines.runtime import accelerate

    assert AITKPipeline.offload_refusal is None
    spec = get_spec("anima")
    pipe = load_tiny("anima").pipe
    sizes = accelerate.component_bytes(pipe)
    reserve = accelerate.activation_reserve(pipe.vae, False, spec.width * spec.height)
    assert spec.family_class().choose_offload(spec, pipe, "cpu") == ("none", None, set())  # no GPU budget
    monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: reserve + max(sizes.values()))
    assert accelerate.choose_offload(sizes, reserve + max(sizes.values()), reserve) == "model"
    offload, resident, whole = spec.family_class().choose_offload(spec, pipe, "cuda")
    assert offload == "group" and set(resident) == {"transformer"} and whole == set()
    with pytest.raises(ValueError, match="anima runs on diffusers' modular pipeline, which has no CPU offloading"):
        load_pipeline("anima", base="unused", device="cpu", offload="group")


def test_auto_keeps_a_video_models_decoders_whole_where_they_fit(load_tiny, monkeypatch):
    """When auto streams a video model's denoiser blocks, its VAE (run once per latent frame and tile) goes on the
    GPU whole, counted before the blocks; an image model's VAE, or one that does not fit, streams as before."""
    from aitk_inference.pipelines.runtime import accelerate

    monkeypatch.setattr(accelerate, "choose_offload", lambda sizes, budget, reserve: "group")
    for model_id, video in (("wan21_1b", True), ("flux", False)):
        spec, pipe = get_spec(model_id), load_tiny(model_id).pipe
        sizes = accelerate.component_bytes(pipe)
        reserve = accelerate.activation_reserve(pipe.vae, video, spec.width * spec.height)
        roomy = reserve + sum(sizes.values())
        monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: roomy)
        _, resident, whole = spec.family_class().choose_offload(spec, pipe, "cuda")
        assert whole == ({"vae"} if video else set()), model_id
        blocks = {"transformer": pipe.transformer}
        assert resident == accelerate.resident_block_budget(blocks, roomy, reserve + sum(sizes[n] for n in whole))
        monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: reserve + sizes["vae"] - 1)
        assert spec.family_class().choose_offload(spec, pipe, "cuda")[2] == set(), model_id


def test_auto_keeps_room_for_an_image_models_untiled_decode(load_tiny, monkeypatch):
    """offload="auto" keeps free what the untiled decode of an image of the model's default size takes, where that is
    more than the image reserve: Qwen-Image's VAE (its decode ran out of memory under a 24 GiB cap with 3 GiB kept),
    not FLUX's at 1024x1024; a video keeps the video reserve; an unknown VAE class, the image reserve."""
    import diffusers
    import torch

    from aitk_inference.pipelines.runtime import accelerate

    with torch.device("meta"):  # full-size configurations, no memory
        qwen = diffusers.AutoencoderKLQwenImage().to(torch.bfloat16)
        flux2 = diffusers.AutoencoderKLFlux2().to(torch.bfloat16)
        wan = diffusers.AutoencoderKLWan().to(torch.bfloat16)
    image, video = (int(accelerate.AUTO_OFFLOAD_RESERVE_GIB[kind] * 2**30) for kind in ("image", "video"))
    megapixel = 1024 * 1024
    assert accelerate.decoder_full_resolution_width(qwen) == 96
    assert accelerate.decoder_full_resolution_width(flux2) == 128
    qwen_reserve = accelerate.activation_reserve(qwen, False, megapixel)
    assert qwen_reserve == int(accelerate.DECODE_PEAK_TENSORS["AutoencoderKLQwenImage"] * megapixel * 96 * 2) > image
    assert abs(accelerate.activation_reserve(qwen, False, 2 * megapixel) - 2 * qwen_reserve) <= 1
    assert accelerate.activation_reserve(flux2, False, megapixel) == image
    assert accelerate.activation_reserve(wan, True, megapixel) == video
    assert accelerate.activation_reserve(None, False, megapixel) == image
    # the plan reads the reserve of the pipeline's own VAE at the id's default size: weights that fit beside the image
    # reserve move whole, not beside the decode of a large image
    spec, pipe = get_spec("qwen_image"), load_tiny("qwen_image").pipe
    large = dataclasses.replace(spec, width=4096, height=4096)
    decode = accelerate.activation_reserve(pipe.vae, False, large.width * large.height)
    assert decode > image
    sizes = accelerate.component_bytes(pipe)
    monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: sum(sizes.values()) + image)
    assert spec.family_class().choose_offload(spec, pipe, "cuda")[0] == "none"
    assert spec.family_class().choose_offload(large, pipe, "cuda")[0] == "group"


def test_auto_offload_budgets_the_denoiser_blocks_it_keeps(load_tiny):
    from aitk_inference.pipelines.runtime.accelerate import blocks_in_order, module_bytes, resident_block_budget

    transformer = load_tiny("flux").pipe.transformer
    blocks = blocks_in_order(transformer)
    assert [name for name, _ in blocks] == [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]
    sizes = [module_bytes(block) for _, block in blocks]
    rest = module_bytes(transformer) - sum(sizes)
    overhead = rest + 2 * max(sizes)
    assert resident_block_budget({"transformer": transformer}, budget=overhead + 1000 + 500, reserve=500) == {
        "transformer": 1000}
    assert resident_block_budget({"transformer": transformer}, budget=overhead, reserve=500) == {"transformer": 0}
    experts = {"transformer": transformer, "transformer_2": transformer}
    assert resident_block_budget(experts, budget=2 * overhead + 4000, reserve=0) == dict.fromkeys(experts, 2000)


def test_kept_blocks_are_spread_between_the_streamed_ones():
    """FLUX's shape: 19 double blocks twice the size of its 38 single ones. With room for three quarters of the bytes,
    the first block stays, no two streamed blocks follow each other (each is fetched while kept ones run), the streamed
    ones span the whole forward and the kept bytes fill the room but never exceed it."""
    from aitk_inference.pipelines.runtime.accelerate import blocks_to_keep

    sizes = [2] * 19 + [1] * 38
    keep = blocks_to_keep(sizes, resident_bytes=57)
    streamed = [index for index, kept in enumerate(keep) if not kept]
    assert keep[0] and sum(s for s, kept in zip(sizes, keep) if kept) == 57
    assert all(b - a > 1 for a, b in zip(streamed, streamed[1:]))
    assert streamed[0] < 19 and streamed[-1] > 50
    assert blocks_to_keep(sizes, resident_bytes=0) == [False] * 57
    assert blocks_to_keep(sizes, resident_bytes=sum(sizes)) == [True] * 57
    # room for the first block only (the tiny models' tests): the first stays; with more, the streamed one is between
    assert blocks_to_keep([3, 2, 2], resident_bytes=3) == [True, False, False]
    assert blocks_to_keep([3, 2, 2], resident_bytes=5) == [True, False, True]
