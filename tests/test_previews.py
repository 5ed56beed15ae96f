"""Live step previews in the AITK Sample node (issue 19 item 2), through the nodes' shared functions with stand-ins
for the ComfyUI modules they read: the progress bar (recording each preview), ``--preview-method``/``--preview-size``,
``models/vae_approx`` and its TAESD class."""

import enum
import sys
import time
import types

import numpy as np
import pytest
import torch

from aitk_inference.nodes import core, previews
from aitk_inference.pipelines.families.pixel_space import unpatchify_pixels, unpatchify_pixels_channels_last
from aitk_inference.pipelines.registry import get_spec, model_ids

pytestmark = pytest.mark.usefixtures("one_thread")


class PreviewMethod(enum.Enum):  # the values of ComfyUI's LatentPreviewMethod
    none = "none"
    auto = "auto"
    latent2rgb = "latent2rgb"
    taesd = "taesd"


@pytest.fixture
def comfy(monkeypatch):
    """ComfyUI's modules as the nodes see them; ``state.updates`` holds ``(value, total, preview)`` per bar update."""
    state = types.SimpleNamespace(updates=[], vae_approx={}, taesd_loads=[])
    modules = {name: types.ModuleType(name) for name in
               ("comfy", "comfy.utils", "comfy.model_management", "comfy.cli_args", "comfy.taesd", "comfy.taesd.taesd",
                "folder_paths")}

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.updates.append((value, total, preview))

    class TAESD:  # ComfyUI's TAESD: decodes [B, C, h, w] to [B, 3, 8h, 8w] in [-1, 1]
        def __init__(self, encoder_path, decoder_path, latent_channels):
            state.taesd_loads.append((decoder_path, latent_channels))

        def to(self, device):
            return self

        def decode(self, latents):
            return torch.zeros(latents.shape[0], 3, latents.shape[-2] * 8, latents.shape[-1] * 8)

    modules["comfy.utils"].ProgressBar = ProgressBar
    modules["comfy.model_management"].throw_exception_if_processing_interrupted = lambda: None
    modules["comfy.model_management"].free_memory = lambda memory_required, device, keep_loaded=(): None
    modules["comfy.cli_args"].args = types.SimpleNamespace(preview_method=PreviewMethod.latent2rgb, preview_size=512)
    modules["comfy.taesd.taesd"].TAESD = TAESD
    modules["folder_paths"].get_filename_list = lambda kind: sorted(state.vae_approx) if kind == "vae_approx" else []
    modules["folder_paths"].get_full_path = lambda kind, name: state.vae_approx.get(name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    previews._load_taesd.cache_clear()

    def set_method(method: str):
        modules["comfy.cli_args"].args.preview_method = PreviewMethod(method)
        state.updates.clear()

    state.set_method = set_method
    return state


def sample(tiny_dir, model, steps=2, width=96, height=64, **kwargs):
    handle = core.load(model, tiny_dir(model), "fp32", "none", "cpu")
    spec = get_spec(model)
    if spec.video is not None:
        kwargs.setdefault("num_frames", spec.video.frames(2))
    return core.sample(handle, "a red fox", width=width, height=height, steps=steps, seed=7, **kwargs)


def test_every_model_states_its_latent_space():
    factors = previews.latent_rgb_factors()
    assert set(previews.MODEL_LATENT_SPACES) == set(model_ids())  # a new id must say which VAE it decodes with
    assert {space for space in previews.MODEL_LATENT_SPACES.values() if space} <= set(factors)
    assert set(previews.TAESD_DECODERS) <= set(factors)
    for space, table in factors.items():
        assert all(len(row) == 3 for row in table["factors"]) and (table["bias"] is None or len(table["bias"]) == 3)
    assert {space: len(table["factors"]) for space, table in factors.items()} == \
        {"sd15": 4, "sdxl": 4, "sd3": 16, "flux1": 16, "flux2": 32, "wan21": 16, "wan22": 48, "ltxv": 128, "rgb": 3}


# model id -> the preview's (width, height) at 96x64: latent size (VAE /8), the pixels (pixel space), or a strip of the
# video's latent frames side by side
PREVIEW_SIZES = {"flux": (12, 8), "sdxl": (12, 8), "sd3": (12, 8), "flux2": (12, 8), "ernie_image": (12, 8),
                 "ideogram4": (12, 8), "anima": (12, 8), "wan21_1b": (3 * 12, 8), "prx_pixel": (96, 64),
                 "hidream_o1": (96, 64)}


@pytest.mark.parametrize("model", list(PREVIEW_SIZES))
def test_a_preview_arrives_with_every_step(comfy, tiny_dir, model):
    sample(tiny_dir, model)
    assert [(value, total) for value, total, _ in comfy.updates][:2] == [(1, 2), (2, 2)]
    for _, _, preview in comfy.updates[:2]:  # Wan ticks its bar once more when it starts decoding
        kind, image, size = preview
        assert (kind, size, image.mode, image.size) == ("JPEG", 512, "RGB", PREVIEW_SIZES[model])


def _flux2_reference(pipe, packed):
    rows, columns = 64 // (2 * pipe.vae_scale_factor), 96 // (2 * pipe.vae_scale_factor)
    return pipe._unpatchify_latents(packed.reshape(1, rows, columns, -1).permute(0, 3, 1, 2))


def _ltx2_reference(pipe, packed):
    frames = (17 - 1) // pipe.vae_temporal_compression_ratio + 1
    rows, columns = 64 // pipe.vae_spatial_compression_ratio, 96 // pipe.vae_spatial_compression_ratio
    return pipe._unpack_latents(packed, frames, rows, columns, 1, 1)


# model id -> the latent diffusers' own unpacking hands to the VAE, from the packed latent of a step (96x64)
UNPACKED_BY_DIFFUSERS = {
    "flux": lambda pipe, packed: pipe._unpack_latents(packed, 64, 96, pipe.vae_scale_factor),
    "flux2": _flux2_reference,
    "ltx2": _ltx2_reference,
    "zeta_chroma": lambda pipe, packed: unpatchify_pixels_channels_last(packed, 64, 96, 32),
    "hidream_o1": lambda pipe, packed: unpatchify_pixels(packed, 64, 96, 32),  # its loop's own unpacking
}


@pytest.mark.parametrize("model", list(UNPACKED_BY_DIFFUSERS))
def test_previews_see_the_latent_the_vae_decodes(tiny_dir, model, monkeypatch):
    """A family's LatentLayout unpacks a step's latents as diffusers' own code unpacks them for the VAE."""
    pipeline = core.load(model, tiny_dir(model), "fp32", "none", "cpu").get_pipeline()
    packed, seen = [], []
    unpack = pipeline.preview_latents
    monkeypatch.setattr(pipeline, "preview_latents", lambda latents, params: packed.append(latents) or
                        unpack(latents, params))
    extra = {"num_frames": 17} if model == "ltx2" else {}
    pipeline.generate("a red fox", width=96, height=64, steps=2, seed=7,
                      on_latents=lambda step, total, latents: seen.append(latents), **extra)
    assert torch.equal(seen[-1], UNPACKED_BY_DIFFUSERS[model](pipeline.pipe, packed[-1]))


def test_ideogram4_previews_are_in_flux2_latent_space(load_tiny, monkeypatch):
    """Ideogram 4 normalises FLUX.2's VAE latent its own way: its previews are a step's latents in FLUX.2's space, so
    that FLUX.2's own denormalisation (diffusers' Flux2Pipeline: batch-norm statistics, then the 2x2 unpatching) of the
    last step's preview gives exactly the latent Ideogram's decode hands the VAE. Non-trivial statistics, so that a
    channel-order mistake shows."""
    from diffusers import Flux2Pipeline

    pipeline = load_tiny("ideogram4")
    bn = pipeline.pipe.vae.bn
    generator = torch.Generator().manual_seed(0)
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
    bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
    decoded, seen = [], []
    vae_decode = pipeline.pipe.vae.decode
    monkeypatch.setattr(pipeline.pipe.vae, "decode", lambda z, **kwargs: decoded.append(z) or vae_decode(z, **kwargs))
    pipeline.generate("a red fox", width=96, height=64, steps=2, seed=7,
                      on_latents=lambda step, total, latents: seen.append(latents))
    assert seen[-1].shape == (1, 32, 8, 12)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipeline.pipe.vae.config.batch_norm_eps)
    patched = Flux2Pipeline._patchify_latents(seen[-1]) * std + bn.running_mean.view(1, -1, 1, 1)
    assert torch.allclose(Flux2Pipeline._unpatchify_latents(patched), decoded[-1], atol=1e-5)


def test_latent2rgb_is_the_factors_projection():
    table = previews.latent_rgb_factors()["flux1"]
    latent = torch.randn(16, 8, 12)
    by_hand = torch.einsum("chw,cr->hwr", latent, torch.tensor(table["factors"])) + torch.tensor(table["bias"])
    assert torch.allclose(previews.latent_to_rgb(latent, "flux1"), by_hand, atol=1e-6)


def test_none_makes_no_preview_and_asks_for_no_latents(comfy, tiny_dir, monkeypatch):
    comfy.set_method("none")
    monkeypatch.setattr(type(core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu").get_pipeline()),
                        "preview_latents", lambda *args: pytest.fail("latents were unpacked with previews off"))
    sample(tiny_dir, "flux")
    assert comfy.updates == [(1, 2, None), (2, 2, None)]


@pytest.mark.parametrize("model", ["flux", "anima", "hidream_o1", "ideogram4"])  # FLUX; loops that hand out latents
def test_previews_never_change_the_result(comfy, tiny_dir, model):
    comfy.set_method("latent2rgb")
    with_previews = sample(tiny_dir, model).images
    assert all(preview is not None for _, _, preview in comfy.updates)
    comfy.set_method("none")
    assert torch.equal(sample(tiny_dir, model).images, with_previews)


def test_taesd_uses_comfyuis_decoder_file_else_latent2rgb(comfy, caplog):
    comfy.set_method("taesd")
    latents = torch.randn(1, 16, 8, 12)
    assert previews.make_previewer("flux")(latents)[1].size == (12, 8)  # no file in models/vae_approx: latent2rgb
    assert "no taef1_decoder" in caplog.text  # with ComfyUI's warning
    comfy.vae_approx["taef1_decoder.safetensors"] = "/models/vae_approx/taef1_decoder.safetensors"
    assert previews.make_previewer("flux")(latents)[1].size == (96, 64)  # TAESD decodes to pixels
    assert comfy.taesd_loads == [("/models/vae_approx/taef1_decoder.safetensors", 16)]
    # no TAESD for Wan's latent space in ComfyUI: latent2rgb, a strip of 4 of the video's 5 latent frames
    assert previews.make_previewer("wan21_1b")(torch.randn(1, 16, 5, 8, 12))[1].size == (4 * 12, 8)


def test_preview_size_bounds_pixel_space_previews(comfy):
    sys.modules["comfy.cli_args"].args.preview_size = 48
    kind, image, size = previews.make_previewer("prx_pixel")(torch.rand(1, 3, 64, 96) * 2 - 1)  # pooled 2x2
    assert (kind, image.size, size) == ("JPEG", (48, 32), 48)


def test_preview_cost_is_a_small_part_of_a_step(comfy, tiny_dir, record_property):
    """The preview's share of a step (CPU, tiny FLUX at 256x256): latent2rgb and the copy into a PIL image, on the
    latents of a real step; the JPEG encoding is ComfyUI's, on its server's thread. The fastest of several runs of
    each, as the machine is shared and a busy neighbour only adds waits."""
    pipeline = core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu").get_pipeline()
    previewer = previews.make_previewer("flux")
    step_times, preview_times = [], []
    for _ in range(3):  # steps and previews measured in turns, so that a slow spell of the machine hits both
        latents, step_ends = [], []
        pipeline.generate("a red fox", width=256, height=256, steps=8, seed=7,
                          on_latents=lambda step, total, unpacked: latents.append(unpacked),
                          progress=lambda step, total: step_ends.append(time.perf_counter()))
        step_times.extend(np.diff(step_ends))
        for _ in range(40):
            started = time.perf_counter()
            assert previewer(latents[-1]) is not None
            preview_times.append(time.perf_counter() - started)
    step, preview = float(min(step_times)), min(preview_times)
    ratio = preview / step
    record_property("preview_cost_ratio", round(ratio, 5))
    print(f"preview cost: {ratio:.3%} of a step ({preview * 1e3:.3f} ms per preview, step {step * 1e3:.1f} ms)")
    assert ratio <= 0.03
