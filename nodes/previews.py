"""Live step previews for the AITK Sample node, as ComfyUI's KSampler shows them: after each denoising step the latent
becomes a small image that goes out with ComfyUI's progress update, made the way ComfyUI's ``--preview-method`` says.

* ``none``: no preview and no cost (the library is not even asked for the latents).
* ``latent2rgb`` (and ``auto``, as in ComfyUI): a linear projection of the latent's channels onto RGB with the factors
  of the model's latent space (``latent_rgb.json``: the numbers ComfyUI uses for that VAE).
* ``taesd``: ComfyUI's TAESD decoder for the latent space when ``models/vae_approx`` holds its file, else latent2rgb.

Videos show a strip of up to :data:`STRIP_FRAMES` latent frames, evenly spaced, side by side; batches show their first
item. torch is imported only when a preview is made.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any, Callable

from .comfy import comfy_module

logger = logging.getLogger(__name__)

#: latent frames side by side in a video's preview (first, last and evenly spaced between)
STRIP_FRAMES = 4
#: ComfyUI's default ``--preview-size`` (the longest side of a preview), used when ComfyUI does not say
DEFAULT_PREVIEW_SIZE = 512

#: the file-name prefix of ComfyUI's TAESD decoder (``models/vae_approx``) per latent space that has one
TAESD_DECODERS = {"sd15": "taesd_decoder", "sdxl": "taesdxl_decoder", "sd3": "taesd3_decoder", "flux1": "taef1_decoder"}

#: the latent space of each model id's VAE (a key of ``latent_rgb.json``); ``rgb``: pixel space, the latent is the
#: image in [-1, 1]; None: no preview (no known factors for that VAE, or no image at all)
MODEL_LATENT_SPACES: dict[str, str | None] = {
    # FLUX.1's 16-channel VAE (also Z-Image, Lumina 2, OmniGen2, HiDream, Boogu-Image, F-Lite)
    **dict.fromkeys(("flux", "flex1", "flux_kontext", "flex2", "chroma", "zimage", "zimage_turbo", "zimage_deturbo",
                     "lumina2", "omnigen2", "hidream", "hidream_e1", "boogu_image", "boogu_image_edit", "f_lite"),
                    "flux1"),
    # SD 1.x's 4-channel VAE (also SD 2 and PixArt-alpha, which ship it)
    **dict.fromkeys(("sd15", "sd2", "pixart"), "sd15"),
    # SDXL's 4-channel VAE (also the distilled SDXL UNets, PixArt-Sigma and AuraFlow, which ship it)
    **dict.fromkeys(("sdxl", "ssd", "vega", "pixart_sigma", "auraflow"), "sdxl"),
    # Wan 2.1's 16-channel video VAE, which Qwen-Image's VAE (and so Nucleus-Image, Krea 2 and Anima) shares
    **dict.fromkeys(("wan21_1b", "wan21_14b", "wan21_i2v_14b", "wan21_i2v_14b480p", "wan22_14b_t2v", "wan22_14b_i2v",
                     "qwen_image", "qwen_image_2512", "qwen_image_edit", "qwen_image_edit_plus",
                     "qwen_image_edit_plus_2511", "nucleus_image", "krea2", "krea2_turbo", "krea2_o_edit",
                     "krea2_o_edit_turbo", "anima"), "wan21"),
    "wan22_5b": "wan22",  # Wan 2.2's 48-channel VAE
    "sd3": "sd3",  # SD 3.5's own 16-channel VAE (scaling 1.5305, shift 0.0609)
    # FLUX.2's 32-channel VAE (latents 2x2-patchified to 128 channels; the family unpatches them). Ideogram 4 decodes
    # with it too (ComfyUI's Comfy-Org/Ideogram-4 ships vae/flux2-vae.safetensors); its preview_latents swaps its own
    # latent normalisation for FLUX.2's first
    **dict.fromkeys(("flux2", "flux2_diffusers", "flux2_klein_4b", "flux2_klein_9b", "ernie_image", "ideogram4"),
                    "flux2"),
    **dict.fromkeys(("ltx2", "ltx2.3", "ltx2.5"), "ltxv"),  # the 128-channel LTX video latent
    **dict.fromkeys(("prx_pixel", "chroma_radiance", "zeta_chroma", "zimage_l2p", "hidream_o1"), "rgb"),
    # no known factors: own VAEs that ComfyUI has no latent format for (CogView4's 16 channels, Mage-Flow's
    # 128-channel codec, MiniMax-H3's video VAE); or audio only (ACE-Step: a waveform's latent, no image)
    **dict.fromkeys(("cogview4", "mageflow", "mageflow_edit", "minimax_h3", "minimax_h3_ref2va", "ace_step_15",
                     "ace_step_15_xl"), None),
}

Previewer = Callable[[Any], tuple]


@functools.cache
def latent_rgb_factors() -> dict[str, dict]:
    """``latent_rgb.json``: per latent space, ``factors`` (one RGB row per latent channel) and ``bias`` (or None)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "latent_rgb.json"), encoding="utf-8") as file:
        return json.load(file)


def preview_method() -> str:
    """ComfyUI's ``--preview-method`` (``none``, ``auto``, ``latent2rgb``, ``taesd``); ``none`` outside ComfyUI."""
    cli_args = comfy_module("comfy.cli_args")
    if cli_args is None:
        return "none"
    method = cli_args.args.preview_method
    return getattr(method, "value", method)


def preview_size() -> int:
    """ComfyUI's ``--preview-size``: the longest side of a preview."""
    cli_args = comfy_module("comfy.cli_args")
    return int(getattr(cli_args.args, "preview_size", DEFAULT_PREVIEW_SIZE)) if cli_args else DEFAULT_PREVIEW_SIZE


def make_previewer(model_id: str) -> Previewer | None:
    """``previewer(latents) -> ("JPEG", PIL image, max side)`` (what ComfyUI's ProgressBar takes) for ``model_id``
    under ComfyUI's preview method, or None when no preview is to be made. The previewer gives None (and warns once)
    for latents whose channel count is not the latent space's, so a preview never stops a generation."""
    method, space = preview_method(), MODEL_LATENT_SPACES.get(model_id)
    if method == "none" or space is None:
        return None
    size, channels = preview_size(), len(latent_rgb_factors()[space]["factors"])
    to_rgb = (taesd_decoder(space) if method == "taesd" else None) or functools.partial(latent_to_rgb, space=space)

    def previewer(latents):
        if latents.shape[1] != channels:
            _warn_once(model_id, space, latents.shape[1])
            return None
        return "JPEG", to_image(to_rgb(shrink(first_image(latents), size))), size

    return previewer


@functools.cache
def _warn_once(model_id: str, space: str, channels: int) -> None:
    logger.warning("AITK previews: %s gives %d-channel latents, but its latent space %s has %d; no previews (a model "
                   "that is not the released one?).", model_id, channels, space,
                   len(latent_rgb_factors()[space]["factors"]))


def first_image(latents):
    """The first batch item as ``[C, H, W]``; a video's as a strip of up to :data:`STRIP_FRAMES` frames side by side."""
    image = latents[0]
    if image.ndim == 4:
        count, shown = image.shape[1], min(image.shape[1], STRIP_FRAMES)
        picked = [round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)]
        frames = image[:, picked]
        image = frames.movedim(1, 2).reshape(image.shape[0], image.shape[2], len(picked) * image.shape[3])
    return image


def shrink(image, size: int):
    """Average-pool ``[C, H, W]`` so that its longest side is at most ``size`` (a pixel-space latent is full size)."""
    import torch

    factor = math.ceil(max(image.shape[-2:]) / size)
    return image if factor <= 1 else torch.nn.functional.avg_pool2d(image[None], factor, ceil_mode=True)[0]


def latent_to_rgb(image, space: str):
    """``[C, H, W]`` latent -> ``[H, W, 3]`` in about [-1, 1] by the linear factors of latent space ``space``."""
    import torch

    weight, bias = _factors_on(space, image.device)
    return torch.nn.functional.linear(image.float().movedim(0, -1), weight, bias)


@functools.lru_cache(maxsize=16)
def _factors_on(space: str, device):
    """The factors of ``space`` as ``F.linear``'s weight and bias on ``device`` (made once per device)."""
    import torch

    table = latent_rgb_factors()[space]
    bias = None if table["bias"] is None else torch.tensor(table["bias"], device=device)
    return torch.tensor(table["factors"], device=device).T.contiguous(), bias


def to_image(rgb):
    """``[H, W, 3]`` in [-1, 1] -> a PIL image (one copy to the CPU, as uint8)."""
    import torch
    from PIL import Image

    return Image.fromarray(((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy())


def taesd_decoder(space: str) -> Callable | None:
    """``decode([C, H, W]) -> [H, W, 3]`` in [-1, 1] by ComfyUI's TAESD decoder for ``space`` when
    ``models/vae_approx`` has its file; None (with a warning, as ComfyUI gives) otherwise."""
    prefix = TAESD_DECODERS.get(space)
    folder_paths, taesd = comfy_module("folder_paths"), comfy_module("comfy.taesd.taesd")
    if prefix is None or folder_paths is None or taesd is None:
        return None
    name = next((n for n in folder_paths.get_filename_list("vae_approx") if n.startswith(prefix)), None)
    if name is None:
        logger.warning("AITK previews: --preview-method taesd, but models/vae_approx has no %s*; using latent2rgb.",
                       prefix)
        return None
    return functools.partial(_taesd_decode, _load_taesd(folder_paths.get_full_path("vae_approx", name),
                                                        len(latent_rgb_factors()[space]["factors"])))


@functools.lru_cache(maxsize=4)
def _load_taesd(path: str, channels: int):
    return comfy_module("comfy.taesd.taesd").TAESD(None, path, latent_channels=channels)


def _taesd_decode(model, image):
    model.to(image.device)
    return model.decode(image[None].float())[0].movedim(0, -1)
