"""Ideogram 4 as ai-toolkit samples it (``extensions_built_in/diffusion_models/ideogram4/``: ``ideogram4.py`` and its
own sampler ``src/pipeline.py``), with diffusers' ``Ideogram4Transformer2DModel`` and ``AutoencoderKLFlux2``.

What ai-toolkit's previews do, and so do we (our own loop, :meth:`Ideogram4FamilyPipeline.sample`):

* one transformer runs both CFG passes. The conditional pass sees ``[prompt tokens | image tokens]``; the
  unconditional one sees the image tokens alone with zero text features (Ideogram's asymmetric CFG: the negative
  prompt is never encoded). CFG runs when guidance > 1 and combines ``u + g (c - u)``; at guidance <= 1 one pass;
* an optional *unconditional LoRA* (ai-toolkit's ``unconditional_lora_path``) is switched on for the unconditional
  pass only, on top of the LoRAs that act in both passes. Here it is a LoRA request with ``side="uncond"``
  (:data:`UNCONDITIONAL`; ``lora.stack`` "pass sides"): always a live adapter, off outside that pass;
* the schedule is Ideogram's logit-normal one, shifted with the resolution (:func:`ideogram4_sigmas`: mean
  ``mu + 0.5 ln(w h / 512^2)``, std 1.75, ``mu`` 0; a job's ``model_kwargs.ideogram_schedule_mu``/``_std`` are our
  ``schedule_mu``/``schedule_std`` generation options), Euler steps ``x += v (sigma_next - sigma)`` in float32;
* the initial latents are the seeded CPU draw ``randn(1, 128, h/16, w/16)`` in float32, scaled by the first sigma;
* the prompt (wrapped in the chat template, unpadded, at most 3072 tokens) goes through Qwen3-VL; the hidden states
  of 13 of its layers, concatenated per token, are the text features;
* latents are normalised with ai-toolkit's fixed per-channel shift and scale (:data:`LATENT_SHIFT`,
  :data:`LATENT_SCALE`, on the 128 patched channels), not the VAE's batch-norm statistics; decoded images are
  clamped to [-1, 1];
* width and height are floored to a multiple of 16.

Where diffusers' ``Ideogram4Pipeline`` differs: it needs a second ``unconditional_transformer`` for the negative
pass, its default schedule std is 1.5 with a per-step guidance schedule, it draws the noise in the token layout
(another seed-to-image mapping), left-pads prompts to 2048 tokens, and denormalises with the VAE's batch-norm
statistics. We keep its transformer and VAE classes and run ai-toolkit's loop.

ai-toolkit loads the transformer from ``ideogram-ai/ideogram-4-fp8`` in Ideogram's own module names (fused
``attention.qkv``, ``attention.o``; FP8 weights with a per-row ``.weight_scale``) and the stock Qwen3-VL-8B-Instruct
text encoder; :func:`convert_original_transformer` gives diffusers' names. A diffusers-format folder (one with
``model_index.json``) loads as it is. Structured (JSON) Ideogram captions are passed as written: ai-toolkit's caption
migration (``toolkit/ideogram_caption.py``) is not reproduced; plain prompts are unaffected by it.
"""

from __future__ import annotations

import math
import os

from ..base import AITKPipeline, GenerationParams, LatentLayout
from ..lora.convert import ConvertedLora, ModulePatch, rename_patches, split_patch_rows
from ..registry import UNCONDITIONAL_LORA_SIDE as UNCONDITIONAL
from ..registry import Ideogram4Options

PATCH_SIZE = 2
#: the VAE's 8x times the 2x2 patching; ai-toolkit's get_bucket_divisibility
DIVISOR = 16
#: clamp of the flow time, from Ideogram's log-SNR range [-15, 18]
LOGSNR_MIN, LOGSNR_MAX = -15.0, 18.0
BASE_PIXELS = 512 * 512
#: our generation options -> the ai-toolkit ``model_kwargs`` its sampler reads them from
SCHEDULE_OPTIONS = {"schedule_mu": "ideogram_schedule_mu", "schedule_std": "ideogram_schedule_std"}

# ai-toolkit's latent normalisation (src/latent_norm.py): per channel of the 128 patched channels, in the order
# (patch row, patch column, VAE channel) with the VAE channel fastest; latents = (patched - shift) / scale.
LATENT_SHIFT = (
    0.01984364, 0.10149707, 0.29689495, 0.27188619, -0.21445648, -0.15979549, 0.05021099, -0.15083604, -0.15360136,
    -0.20131799, 0.01922352, 0.0622626, 0.10140969, -0.06739428, 0.3758261, -0.233712, 0.35164491, -0.02590912,
    -0.0271935, -0.10833897, -0.1476848, -0.01130957, -0.2298372, 0.23526423, -0.10893522, 0.11957631, 0.04047799,
    0.3134589, -0.17225064, -0.18646109, -0.34691978, -0.03571246, 0.02583857, 0.10190072, 0.28402294, 0.26952152,
    -0.21634675, -0.17938656, 0.04358909, -0.15007621, -0.1548502, -0.18971131, 0.02710861, 0.05609494, 0.10697846,
    -0.06854968, 0.38167698, -0.24269937, 0.35705471, -0.03063305, -0.02946109, -0.11244286, -0.14336038, -0.01362137,
    -0.21863696, 0.23228983, -0.11739769, 0.11693044, 0.02563311, 0.31356594, -0.17420591, -0.19006285, -0.34905377,
    -0.04025005, 0.01924137, 0.07652984, 0.2995608, 0.2628057, -0.22011674, -0.12715361, 0.04879879, -0.14075719,
    -0.15935895, -0.2123584, 0.01974813, 0.05523547, 0.10011992, -0.06428964, 0.37781868, -0.21491644, 0.34254215,
    -0.03153528, -0.0310082, -0.10761415, -0.14730405, -0.02475182, -0.2285588, 0.2515081, -0.10445128, 0.12446,
    0.07062869, 0.30880162, -0.18016875, -0.18869164, -0.34533499, -0.0129177, 0.02578168, 0.07993659, 0.28642181,
    0.26038408, -0.22459419, -0.14820155, 0.04059549, -0.14043529, -0.16111187, -0.2020305, 0.02602069, 0.04852717,
    0.10432153, -0.06309942, 0.38402443, -0.22397003, 0.34814481, -0.03774432, -0.03381438, -0.11245691, -0.14128767,
    -0.02853208, -0.21752016, 0.24872463, -0.11399775, 0.1222687, 0.05620835, 0.309178, -0.18065738, -0.19401479,
    -0.34495114, -0.01760592,
)
LATENT_SCALE = (
    1.63933691, 1.70204478, 1.73642566, 1.90004803, 1.6675316, 1.69059584, 1.56853198, 1.62314944, 1.89106626,
    1.58086668, 1.60822129, 1.60962993, 1.63322129, 1.56074359, 1.73419528, 1.7919265, 1.64040632, 1.66802808,
    1.60390303, 1.75480492, 1.63187587, 1.64334594, 1.61722884, 1.60146046, 1.63459219, 1.55291476, 1.68771497,
    1.68415657, 1.78966054, 1.66631641, 1.65626686, 1.65976433, 1.63487607, 1.69513249, 1.72933756, 1.91310663,
    1.67035057, 1.72286863, 1.56719251, 1.61934825, 1.88628859, 1.56911539, 1.59455129, 1.60829869, 1.62470611,
    1.56052853, 1.73677003, 1.77563606, 1.63732541, 1.66370527, 1.59508952, 1.75153949, 1.63029275, 1.64517667,
    1.61659342, 1.59722044, 1.64103121, 1.5408531, 1.68610394, 1.67772755, 1.78998563, 1.66621713, 1.65458955,
    1.66041308, 1.64710857, 1.68163503, 1.74000294, 1.92784786, 1.67411194, 1.67395548, 1.57406532, 1.62199356,
    1.87618195, 1.5584375, 1.57438785, 1.61711053, 1.63094305, 1.55644029, 1.73124302, 1.80666627, 1.6463621,
    1.65932006, 1.60816188, 1.75682671, 1.64695873, 1.63121722, 1.61380832, 1.60478651, 1.63396035, 1.53505068,
    1.65534289, 1.67132281, 1.80317197, 1.6767314, 1.65700938, 1.68426259, 1.65339716, 1.67540638, 1.73298504,
    1.94067348, 1.67893609, 1.70635117, 1.5730906, 1.61928553, 1.87148809, 1.56244866, 1.56697152, 1.61584394,
    1.62759496, 1.55480378, 1.73484107, 1.79055143, 1.64688773, 1.66121492, 1.60135887, 1.75254572, 1.64798332,
    1.62989921, 1.61381592, 1.60792883, 1.63939668, 1.53075757, 1.65371318, 1.66801185, 1.80029087, 1.67591476,
    1.65655173, 1.68533454,
)


def ideogram4_sigmas(steps: int, width: int, height: int, mu: float = 0.0, std: float = 1.75):
    """The ``steps + 1`` noise levels ai-toolkit samples Ideogram 4 with, from 1 down to 0 (float32).

    Evenly spaced quantiles ``u`` of a logit-normal flow time whose mean grows with the image area
    (``mu + 0.5 ln(w h / 512^2)``): the time ``t(u) = 1 - sigmoid(mean + std * Phi^-1(u))`` is clamped to the log-SNR
    range, the noise level is ``1 - t`` in reverse order, and the last one is exactly 0. Computed in float64.
    """
    import torch

    mean = mu + 0.5 * math.log(width * height / BASE_PIXELS)
    quantiles = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    flow_time = 1.0 - torch.special.expit(mean + std * torch.special.ndtri(quantiles))
    flow_time = flow_time.clamp(1.0 / (1.0 + math.exp(0.5 * LOGSNR_MAX)), 1.0 / (1.0 + math.exp(0.5 * LOGSNR_MIN)))
    sigmas = (1.0 - flow_time).flip(0)
    sigmas[-1] = 0.0
    return sigmas.to(torch.float32)


# ------------------------------------------------------------------------------------- Ideogram's own module names
# ai-toolkit's transformer (and the checkpoint it loads) name the attention projections `attention.qkv` (q, k, v
# stacked by output rows) and `attention.o`; diffusers splits the first into to_q/to_k/to_v and calls the second
# `attention.to_out.0`. Every other module has the same name in both.
_FUSED_QKV = ("to_q", "to_k", "to_v")
FP8_SCALE_SUFFIX = "_scale"  # `<name>.weight_scale`: the per-output-row scale of an FP8 `<name>.weight`


def _diffusers_path(path: str) -> tuple[str, tuple[str, ...] | str] | None:
    """(parent, new name or names) for an Ideogram module path that diffusers names differently, else None."""
    parent, _, leaf = path.rpartition(".")
    if not parent.endswith(".attention"):
        return None
    if leaf == "qkv":
        return parent, _FUSED_QKV
    if leaf == "o":
        return parent, "to_out.0"
    return None


def convert_original_transformer(state_dict: dict, dtype=None) -> dict:
    """A transformer state dict in Ideogram's names (ai-toolkit's model, ``ideogram-ai/ideogram-4-fp8``) in
    diffusers' names, FP8 weights folded with their ``.weight_scale`` in float32 (``w * scale[:, None]``), floating
    tensors then cast to ``dtype`` when given (ai-toolkit's ``_dequantize_fp8_state_dict``)."""
    import torch

    converted = {}
    for key, tensor in state_dict.items():
        if key.endswith(".weight" + FP8_SCALE_SUFFIX):
            continue
        scale = state_dict.get(key + FP8_SCALE_SUFFIX)
        if scale is not None:
            tensor = tensor.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        module, _, parameter = key.rpartition(".")
        target = _diffusers_path(module)
        if target is None:
            converted[key] = tensor
            continue
        parent, names = target
        if isinstance(names, str):
            converted[f"{parent}.{names}.{parameter}"] = tensor
            continue
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            converted[f"{parent}.{name}.{parameter}"] = part.contiguous()
    return converted


def ideogram4_original_to_diffusers(converted: ConvertedLora) -> ConvertedLora:
    """Rename a LoRA saved by ai-toolkit for Ideogram 4 (``diffusion_model.`` + Ideogram's names) onto diffusers'
    modules: ``attention.qkv`` is split by output rows onto ``to_q/to_k/to_v`` (a LoRA keeps its down factor), and
    ``attention.o`` is ``attention.to_out.0``. Diffusers names pass through."""
    def rename(path: str, patch: ModulePatch):
        target = _diffusers_path(path)
        if target is None:
            return None
        parent, names = target
        if isinstance(names, str):
            return [(f"{parent}.{names}", patch)]
        rows = patch.delta_shape()[0]
        return list(zip((f"{parent}.{n}" for n in names), split_patch_rows(patch, [rows // len(names)] * len(names))))

    return rename_patches(converted, rename, "Ideogram 4")


def route_unconditional(converted: ConvertedLora, side: str | None) -> ConvertedLora:
    """Ideogram 4 takes a LoRA for both passes (no side) or for the unconditional pass (``side="uncond"``)."""
    if side not in (None, UNCONDITIONAL):
        raise ValueError(f"Ideogram 4 has one transformer: a LoRA's side is empty (both CFG passes) or "
                         f"{UNCONDITIONAL!r} (the unconditional pass only, ai-toolkit's unconditional LoRA), not {side!r}.")
    return converted


# ---------------------------------------------------------------------------------------------------------- family
class Ideogram4FamilyPipeline(AITKPipeline):
    """``ideogram4``."""

    denoiser = "transformer"
    options_type = Ideogram4Options
    # the loop's token latents (B, tokens, 128): 2x2 patches with the VAE channel fastest (LATENT_SHIFT's order)
    latent_layout = LatentLayout(tokens=True, patch=PATCH_SIZE, channels_last=True)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def load_diffusers_pipeline(cls, spec, source, torch_dtype, **overrides):
        """A diffusers-format folder or repo (``model_index.json``) loads with ``from_pretrained``, without its
        unconditional transformer; otherwise the source is in ai-toolkit's layout (``transformer/`` in Ideogram's
        names, FP8 or not; ``vae/`` in diffusers' names) and the text encoder comes from ``text_encoder/`` and
        ``tokenizer/`` there when present, else from ``spec.options.text_encoder``."""
        from diffusers import Ideogram4Pipeline

        overrides.setdefault("unconditional_transformer", None)
        overrides.setdefault("prompt_enhancer_head", None)
        if _has_file(source, "model_index.json"):
            return Ideogram4Pipeline.from_pretrained(source, dtype=torch_dtype, **overrides)
        overrides.pop("device_map", None)  # built from parts; place() moves it
        return cls._load_original_layout(spec, source, torch_dtype, **overrides)

    @classmethod
    def _load_original_layout(cls, spec, source, torch_dtype, **components):
        import json

        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline
        from accelerate import init_empty_weights
        from diffusers import Ideogram4Transformer2DModel
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        folder = _local_folder(source, ("transformer/*", "vae/*", "text_encoder/*", "tokenizer/*"))
        transformer_dir = os.path.join(folder, "transformer")
        config_path = os.path.join(transformer_dir, "config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        with init_empty_weights():  # parameters on the meta device (the rotary buffer is built), filled by assign
            transformer = Ideogram4Transformer2DModel(**config)
        state = {}
        for name in sorted(os.listdir(transformer_dir)):
            if name.endswith(".safetensors"):
                state.update(load_file(os.path.join(transformer_dir, name)))
        transformer.load_state_dict(convert_original_transformer(state, torch_dtype), strict=True, assign=True)
        transformer.eval()  # as from_pretrained leaves a model
        del state
        vae_dir = os.path.join(folder, "vae")
        if os.path.isfile(os.path.join(vae_dir, "config.json")):
            vae = AutoencoderKLFlux2.from_pretrained(vae_dir)
        else:  # the published VAE has diffusers' default AutoencoderKLFlux2 architecture
            vae = AutoencoderKLFlux2()
            vae.load_state_dict(load_file(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")), strict=True)
        text_encoder_source = folder if os.path.isdir(os.path.join(folder, "text_encoder")) else spec.options.text_encoder
        subfolder = {"subfolder": "text_encoder"} if text_encoder_source == folder else {}
        tokenizer_kwargs = {"subfolder": "tokenizer"} if text_encoder_source == folder else {}
        parts = {
            "transformer": transformer, "vae": vae.to(torch_dtype),
            "text_encoder": AutoModel.from_pretrained(text_encoder_source, dtype=torch_dtype, **subfolder),
            "tokenizer": AutoTokenizer.from_pretrained(text_encoder_source, **tokenizer_kwargs),
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }
        parts.update(components)
        return Ideogram4Pipeline(**parts)

    # ------------------------------------------------------------------------------------------------ LoRA hooks
    def lora_name_mapper(self):
        return ideogram4_original_to_diffusers

    def lora_route(self):
        return route_unconditional

    # ------------------------------------------------------------------------------------------------ generation
    generation_options = tuple(SCHEDULE_OPTIONS)

    def check_inputs(self, params: GenerationParams) -> None:
        """Generation options: ``schedule_mu`` (a number in -10..10) and ``schedule_std`` (in 0.01..10), the
        schedule's base mean and std (ai-toolkit's ``model_kwargs.ideogram_schedule_mu``/``_std``)."""
        super().check_inputs(params)
        for name, (low, high) in (("schedule_mu", (-10.0, 10.0)), ("schedule_std", (0.01, 10.0))):
            value = params.extra.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not low <= value <= high):
                raise ValueError(f"`{name}` must be a number in {low:g}..{high:g} (ai-toolkit's model_kwargs."
                                 f"{SCHEDULE_OPTIONS[name]}), got {value!r}.")

    def job_options(self, model_config: dict) -> dict:
        """A job's ``model_kwargs.ideogram_schedule_mu``/``_std`` as our ``schedule_mu``/``schedule_std``."""
        model_kwargs = model_config.get("model_kwargs") or {}
        return {ours: float(model_kwargs[theirs]) for ours, theirs in SCHEDULE_OPTIONS.items() if theirs in model_kwargs}

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        options = self.spec.options
        return {"prompt": params.prompt, "width": params.width, "height": params.height,
                "guidance": params.guidance,
                "schedule_mu": float(params.extra.get("schedule_mu", options.schedule_mu)),
                "schedule_std": float(params.extra.get("schedule_std", options.schedule_std))}

    def call_pipeline(self, call: dict):
        return self.sample(**call)

    def postprocess(self, output, params: GenerationParams) -> dict:
        return {"images": output}

    def encode_prompt(self, prompt: str):
        """The text features of ``prompt``, ``(1, tokens, hidden x 13)``: the chat-formatted prompt (no padding) through
        Qwen3-VL, the hidden states of its activation layers concatenated per token (hidden size outer, layer
        inner)."""
        import torch
        from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

        tokenizer, text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, truncation=True,
                        max_length=self.spec.options.max_text_tokens)["input_ids"] or [tokenizer.eos_token_id or 0]
        device = text_encoder.device  # the layers are called one by one: an offload hook on forward never runs
        token_ids = torch.tensor([ids], device=device)
        mask = torch.ones_like(token_ids)
        positions = torch.arange(len(ids), device=device).unsqueeze(0)
        layers = Ideogram4Pipeline._get_text_encoder_hidden_states(text_encoder, token_ids, mask, positions)
        features = torch.stack(layers, dim=-1).flatten(2)
        return features.to(self.pipe.transformer.dtype)

    def _velocity(self, latents, sigma, features, grid):
        """ai-toolkit's velocity (noise - clean) for token latents ``(B, N, 128)`` at noise level ``sigma``: the
        transformer gets flow time ``1 - sigma`` and the sequence ``[text | image]`` (image only when ``features``
        is None) and predicts clean - noise."""
        import torch
        from diffusers.models.transformers.transformer_ideogram4 import (IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR,
                                                                         OUTPUT_IMAGE_INDICATOR)

        transformer = self.pipe.transformer
        batch, image_tokens, channels = latents.shape
        device, dtype = latents.device, transformer.dtype
        text_tokens = 0 if features is None else features.shape[1]
        feature_dim = transformer.config.llm_features_dim
        grid_h, grid_w = grid
        rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
        cols = torch.arange(grid_w, device=device).repeat(grid_h)
        image_positions = torch.stack([torch.zeros_like(rows), rows, cols], dim=1) + IMAGE_POSITION_OFFSET
        text_positions = torch.arange(text_tokens, device=device).unsqueeze(1).expand(-1, 3)
        positions = torch.cat([text_positions, image_positions]).unsqueeze(0).expand(batch, -1, -1)
        indicator = torch.tensor([LLM_TOKEN_INDICATOR] * text_tokens + [OUTPUT_IMAGE_INDICATOR] * image_tokens,
                                 device=device).unsqueeze(0).expand(batch, -1)
        hidden = torch.cat([latents.new_zeros(batch, text_tokens, channels), latents], dim=1)
        text = torch.zeros(batch, image_tokens, feature_dim, device=device, dtype=dtype)
        if features is not None:
            text = torch.cat([features.to(device, dtype).expand(batch, -1, -1), text], dim=1)
        flow_time = (1.0 - sigma).expand(batch)
        out = transformer(hidden_states=hidden.to(dtype), timestep=flow_time.to(dtype), encoder_hidden_states=text,
                          position_ids=positions, segment_ids=torch.ones_like(indicator), indicator=indicator,
                          return_dict=False)[0]
        return -out[:, text_tokens:].to(torch.float32)

    def sample(self, prompt: str, width: int, height: int, guidance: float, generator,
               num_inference_steps: int, schedule_mu: float, schedule_std: float, callback_on_step_end=None):
        """ai-toolkit's Ideogram 4 sampler (see the module docstring); returns float32 images ``[B, H, W, 3]``."""
        import torch

        device = self.pipe._execution_device
        generators = generator if isinstance(generator, list) else [generator]
        sigmas = ideogram4_sigmas(num_inference_steps, width, height, schedule_mu, schedule_std)
        sigmas = sigmas.to(device)
        grid = (height // DIVISOR, width // DIVISOR)
        channels = self.pipe.transformer.config.in_channels
        noise = torch.cat([torch.randn((1, channels, *grid), generator=g, dtype=torch.float32)
                           for g in generators]).to(device)
        latents = (noise * sigmas[0]).permute(0, 2, 3, 1).flatten(1, 2)  # (B, tokens, 128), row-major tokens
        features = self.encode_prompt(prompt)
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            velocity = self._velocity(latents, sigma, features, grid)
            if guidance > 1.0:
                with self.loras.pass_side(UNCONDITIONAL):
                    unconditional = self._velocity(latents, sigma, None, grid)
                velocity = unconditional + guidance * (velocity - unconditional)
            latents = latents + velocity * (sigma_next - sigma)
            if callback_on_step_end is not None:
                callback_on_step_end(self.pipe, i, sigma, {"latents": latents})
        return self.decode(latents, grid)

    def preview_latents(self, latents, params: GenerationParams):
        """A step's latents in FLUX.2's latent space (this VAE's; the one preview factors are known for): ai-toolkit's
        denormalisation back to the VAE's patched channels (as :meth:`decode` does), FLUX.2's normalisation by the
        VAE's batch-norm statistics (indexed VAE channel slowest, so reordered to this layout), then unpacked."""
        import torch

        vae = self.pipe.vae

        def per_token_channel(values):  # (128,) as (VAE channel, patch row, patch column) -> this layout's order
            values = values.to(latents.device, torch.float32)
            return values.view(-1, PATCH_SIZE, PATCH_SIZE).permute(1, 2, 0).reshape(-1)

        shift = torch.tensor(LATENT_SHIFT, device=latents.device)
        scale = torch.tensor(LATENT_SCALE, device=latents.device)
        mean = per_token_channel(vae.bn.running_mean)
        std = torch.sqrt(per_token_channel(vae.bn.running_var) + vae.config.batch_norm_eps)
        return super().preview_latents((latents.float() * scale + shift - mean) / std, params)

    def decode(self, latents, grid):
        """Token latents ``(B, tokens, 128)`` to images in 0..1 ``[B, H, W, 3]``: ai-toolkit's denormalisation,
        the 2x2 patches back to 32 channels, the VAE, a clamp to [-1, 1]."""
        import torch

        vae = self.pipe.vae
        shift = torch.tensor(LATENT_SHIFT, device=latents.device)
        scale = torch.tensor(LATENT_SCALE, device=latents.device)
        patched = latents.to(vae.dtype) * scale.to(vae.dtype) + shift.to(vae.dtype)
        batch, (grid_h, grid_w) = latents.shape[0], grid
        z = patched.view(batch, grid_h, grid_w, PATCH_SIZE, PATCH_SIZE, -1).permute(0, 5, 1, 3, 2, 4)
        z = z.reshape(batch, -1, grid_h * PATCH_SIZE, grid_w * PATCH_SIZE)
        images = vae.decode(z, return_dict=False)[0].float().clamp(-1.0, 1.0)
        return ((images + 1.0) / 2.0).permute(0, 2, 3, 1).cpu().numpy()


def _has_file(source: str, name: str) -> bool:
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, name))
    if os.path.exists(source):
        return False
    from huggingface_hub import file_exists

    return file_exists(source, name)


def _local_folder(source: str, patterns) -> str:
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source, allow_patterns=list(patterns))
