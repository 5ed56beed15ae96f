"""Zeta-Chroma (lodestones' pixel-space Z-Image-style model), sampled as ai-toolkit's ``zeta_chroma`` arch samples it.

diffusers has no Zeta-Chroma classes. ai-toolkit (``extensions_built_in/diffusion_models/zeta_chroma``) runs its own
transformer (``ZImageDCT``, from lodestones' code) inside its own loop (``ZetaChromaPipeline.__call__``, a
``ZImagePipeline`` subclass that replaces the whole sampling). We run our own transformer
(:class:`~.zeta_chroma_transformer.ZetaChromaTransformer2DModel`, the checkpoint's names, proven equal to
``ZImageDCT`` on the same weights in ``tests/test_zeta_chroma.py``) inside :class:`ZetaChromaPipeline`, which does
what ai-toolkit's loop does:

* **Pixel space, 32x32 patches.** No VAE: the image in ``[-1, 1]`` is cut into 32x32 patches, 3072 values each with
  the three channels of a pixel together; each patch is one transformer token. Sizes are floored to 32.
* **Prompts.** Qwen3's chat template (one user turn, generation prompt, ``enable_thinking=True``), padded and
  truncated to 512 tokens, the second-to-last hidden state with its mask (run under bfloat16 autocast on CUDA, as
  ai-toolkit does). The negative prompt is always encoded, because the image's rope positions start at the longer
  of the two prompts (so a negative longer than the prompt changes the image even without guidance).
* **The text mask is a bias, not a mask.** ai-toolkit's sampler casts the prompt's 0/1 mask to the model dtype
  before the pipeline sees it, and the transformer adds a floating-point mask to the attention logits instead of
  masking: real tokens (text and image) get +1, padding +0, so the padded text tokens are attended with a relative
  bias of -1. The transformer's output depends on the padding, and we reproduce it (our transformer takes a boolean
  mask too, which masks the padding out).
* **Initial noise.** ``randn(B, N, 3072)`` in the transformer's dtype from the seeded CPU generator, drawn in patch
  layout; the latents stay in that dtype.
* **Schedule** (no scheduler object): ``N + 1`` times from ``linspace(1, 0, N + 1)`` (float32), shifted by
  ``e^mu / (e^mu + 1/t - 1)`` with ``mu`` linear in the patch count (0.5 at 256 patches, 1.15 at 4096). With at most
  8 steps and guidance at most 1 (ai-toolkit's "low step" schedule) the times stay unshifted. The FlowMatch scheduler
  with static shift 3.0 that ai-toolkit builds for this arch is its training scheduler; previews never call it.
* **x0 prediction.** The transformer predicts the clean image and returns the velocity ``(x - x0) / t``; the Euler
  step is ``x + (t_next - t) v``.
* **Guidance.** Above 1: ``v = v_neg + g (v_pos - v_neg)`` (the two passes batched here, one after the other in
  ai-toolkit). ai-toolkit's pipeline takes ``cfg_normalization`` / ``cfg_truncation`` arguments but never reads them,
  and its sampler never passes them, so there are none here.

The text encoder and tokenizer are Z-Image-Turbo's (ai-toolkit's ``extras_name_or_path``; our ``zimage`` ids load the
same ones), the transformer a single file of ``lodestones/Zeta-Chroma``. LoRAs: ai-toolkit saves ``diffusion_model.``
+ the checkpoint's module names (PEFT ``lora_A`` / ``lora_B``, or LoKr); by default only the ``layers.N`` blocks.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, Qwen3Model

from ..base import AITKPipeline, GenerationParams, LatentLayout
from ..registry import ModelSpec, ZetaChromaOptions
from .pixel_space import unpatchify_pixels_channels_last
from .zeta_chroma_transformer import X0_MARKER, ZetaChromaTransformer2DModel

#: pixels per side of one image patch (one transformer token); also the size divisor
PATCH_SIZE = 32
#: prompt tokens, padded and truncated
MAX_PROMPT_TOKENS = 512
#: the schedule's shift: mu grows linearly from BASE_SHIFT at BASE_PATCHES patches to MAX_SHIFT at MAX_PATCHES
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_PATCHES, MAX_PATCHES = 256, 4096
#: ai-toolkit samples with unshifted times up to this many steps when guidance is at most 1
LOW_STEP_MAX_STEPS = 8


def flow_times(steps: int, num_patches: int, low_step: bool) -> list[float]:
    """The ``steps + 1`` flow times from 1 (noise) to 0 that ai-toolkit's Zeta-Chroma loop walks."""
    times = torch.linspace(1, 0, steps + 1)
    if low_step:
        return times.tolist()
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_PATCHES - BASE_PATCHES)
    mu = slope * num_patches + (BASE_SHIFT - slope * BASE_PATCHES)
    exp_mu = math.exp(mu)
    return (exp_mu / (exp_mu + (1 / times - 1))).tolist()


def uses_low_step_schedule(steps: int, guidance: float) -> bool:
    return steps <= LOW_STEP_MAX_STEPS and guidance <= 1.0


def text_positions(lengths: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """``[B, L, 3]`` int32: token ``i`` at ``(min(i + 1, length), 0, 0)`` (padding repeats the last real position)."""
    first = torch.arange(1, max_tokens + 1, device=lengths.device)[None].expand(len(lengths), -1)
    positions = torch.zeros(len(lengths), max_tokens, 3, dtype=torch.int32, device=lengths.device)
    positions[..., 0] = torch.minimum(first, lengths[:, None])
    return positions


def image_positions(offsets: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[B, rows * cols, 3]`` int32: patch ``(r, c)`` at ``(offset, r, c)``, row-major."""
    grid_r, grid_c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    grid = torch.stack([torch.zeros_like(grid_r), grid_r, grid_c], dim=-1).reshape(1, rows * cols, 3)
    positions = grid.expand(len(offsets), -1, -1).clone().to(device=offsets.device, dtype=torch.int32)
    positions[..., 0] = offsets[:, None]
    return positions


class ZetaChromaPipeline(DiffusionPipeline):
    """Zeta-Chroma text-to-image with ai-toolkit's preview loop (see the module docstring).

    Args:
        transformer ([`ZetaChromaTransformer2DModel`]): the pixel-space denoiser.
        text_encoder ([`~transformers.Qwen3Model`]): Z-Image-Turbo's Qwen3 text model.
        tokenizer ([`~transformers.Qwen2Tokenizer`]): its tokenizer, with the chat template.
    """

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: ZetaChromaTransformer2DModel, text_encoder: Qwen3Model, tokenizer):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer)
        self.image_processor = VaeImageProcessor(vae_scale_factor=PATCH_SIZE)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "ZetaChromaPipeline":
        """Load a folder saved by :meth:`save_pretrained` (``transformer/``, ``text_encoder/``, ``tokenizer/``).

        Args:
            pretrained_model_name_or_path (str): the folder.
            dtype (torch.dtype, *optional*): dtype of the weighted components (``torch_dtype`` is accepted too).
            device_map (str, *optional*): a device to read the weighted components onto directly.
        """
        options = {"dtype": kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None),
                   "device_map": kwargs.pop("device_map", None)}
        options = {key: value for key, value in options.items() if value is not None}
        if kwargs:
            raise ValueError(f"ZetaChromaPipeline.from_pretrained got unsupported option(s) {sorted(kwargs)}.")
        folder = os.fspath(pretrained_model_name_or_path)
        return cls(
            transformer=ZetaChromaTransformer2DModel.from_pretrained(folder, subfolder="transformer", **options),
            text_encoder=Qwen3Model.from_pretrained(folder, subfolder="text_encoder", **options).eval(),
            tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        )

    def encode_prompts(self, prompts: list[str], dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 512, D]`` second-to-last hidden states (in ``dtype``) and the ``[B, 512]`` bool token mask."""
        device = self._execution_device
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for prompt in prompts]
        tokens = self.tokenizer(texts, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True,
                                return_tensors="pt").to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                       output_hidden_states=True).hidden_states[-2]
        return hidden.to(dtype), tokens.attention_mask.bool()

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[str],
        negative_prompt: list[str],
        width: int,
        height: int,
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ):
        """Sample one image per prompt.

        Args:
            prompt (list[str]): one prompt per image.
            negative_prompt (list[str]): one negative per image: the unconditional pass above guidance 1, and always
                the start of the image's rope positions (with the prompt's length).
            width, height (int): the output size, multiples of 32.
            num_inference_steps (int, defaults to 30): Euler steps.
            guidance_scale (float, defaults to 4.0): CFG ``n + g (p - n)`` above 1; one pass per step otherwise.
            generator (torch.Generator or list, *optional*): draws the initial noise (one per image for a list).
            output_type (str, defaults to "np"): ``np``, ``pil``, ``pt`` or ``latent`` (the ``[-1, 1]`` pixels).
            callback_on_step_end (callable, *optional*): ``f(pipe, step, timestep, {"latents": latents})`` after
                every step.
        """
        if width % PATCH_SIZE or height % PATCH_SIZE:
            raise ValueError(f"Zeta-Chroma needs a width and height that are multiples of {PATCH_SIZE}, got "
                             f"{width}x{height}.")
        device = self._execution_device
        dtype = self.transformer.dtype
        batch_size = len(prompt)
        rows, cols = height // PATCH_SIZE, width // PATCH_SIZE
        cfg = guidance_scale > 1.0

        # 1. Prompts and rope positions: the image starts after the longer of the prompt and the negative
        embeds, mask = self.encode_prompts(prompt, dtype)
        negative_embeds, negative_mask = self.encode_prompts(negative_prompt, dtype)
        lengths, negative_lengths = mask.sum(1), negative_mask.sum(1)
        image_ids = image_positions(torch.maximum(lengths, negative_lengths), rows, cols)
        text_ids = text_positions(lengths, MAX_PROMPT_TOKENS)
        if cfg:
            embeds, mask = torch.cat([embeds, negative_embeds]), torch.cat([mask, negative_mask])
            text_ids = torch.cat([text_ids, text_positions(negative_lengths, MAX_PROMPT_TOKENS)])
            image_ids = image_ids.repeat(2, 1, 1)

        # 2. Initial noise in patch layout, then the flow times
        in_channels = self.transformer.config.in_channels * self.transformer.config.patch_size**2
        latents = randn_tensor((batch_size, rows * cols, in_channels), generator=generator, device=device, dtype=dtype)
        times = flow_times(num_inference_steps, rows * cols,
                           uses_low_step_schedule(num_inference_steps, guidance_scale))
        self._num_timesteps = num_inference_steps

        # 3. Denoise: the transformer returns the velocity; guidance on it; Euler step
        passes = 2 if cfg else 1
        for i, (time, next_time) in enumerate(zip(times[:-1], times[1:])):
            flow_time = torch.full((batch_size * passes,), time, dtype=dtype, device=device)
            velocity = self.transformer(img=latents.repeat(passes, 1, 1), img_ids=image_ids, txt=embeds,
                                        txt_ids=text_ids, txt_mask=mask.to(dtype), timesteps=flow_time)
            if cfg:
                positive, negative = velocity.chunk(2)
                velocity = negative + guidance_scale * (positive - negative)
            latents = latents + (next_time - time) * velocity
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, time, {"latents": latents})

        # 4. The latents are the image in [-1, 1]
        pixels = unpatchify_pixels_channels_last(latents.float(), height, width, PATCH_SIZE)
        images = pixels if output_type == "latent" else self.image_processor.postprocess(pixels, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def resolve_transformer_file(source: str, default_file: str) -> str | None:
    """The local path of the transformer file ``source`` names, or None when ``source`` is a saved pipeline folder.

    ``source`` is a local ``.safetensors`` file, a local folder holding ``default_file``, a hub repo id (its
    ``default_file``) or, as ai-toolkit accepts it, ``owner/repo/file.safetensors`` on the hub."""
    if os.path.isfile(source):
        if not source.endswith(".safetensors"):
            raise ValueError(f"{source!r}: a Zeta-Chroma transformer file must be a .safetensors file.")
        return source
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "model_index.json")):
            return None
        path = os.path.join(source, default_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source!r} holds neither a saved pipeline (model_index.json) nor {default_file}; "
                                    "give the folder of the checkpoint, the .safetensors file itself or a hub repo id.")
        return path
    from huggingface_hub import hf_hub_download

    repo, filename = source, default_file
    if source.endswith(".safetensors"):
        repo, _, filename = source.rpartition("/")
    return hf_hub_download(repo_id=repo, filename=filename)


def load_transformer_file(path: str, torch_dtype, architecture: dict | None = None) -> ZetaChromaTransformer2DModel:
    """A single-file checkpoint: the published architecture (or ``architecture``'s changes to it), x0 prediction when
    the file marks it, as ai-toolkit decides."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    state = load_file(path)
    with init_empty_weights(include_buffers=True):
        transformer = ZetaChromaTransformer2DModel(**{**(architecture or {}), "use_x0": X0_MARKER in state})
    state = {name: tensor.to(torch_dtype) for name, tensor in state.items()}
    transformer.load_state_dict(state, strict=True, assign=True)
    transformer.dec_net.input_embedder.float()  # the model's float32 module (_keep_in_fp32_modules)
    return transformer.eval()


class ZetaChromaFamilyPipeline(AITKPipeline):
    """``zeta_chroma``."""

    latent_layout = LatentLayout(tokens=True, patch=PATCH_SIZE, channels_last=True)

    denoiser = "transformer"
    options_type = ZetaChromaOptions
    batches_distinct_prompts = True

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        return ZetaChromaPipeline

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        """A saved pipeline folder loads as it is; otherwise the transformer is the checkpoint file ``source`` names
        and the text encoder and tokenizer come from ``spec.options.text_encoder`` (Z-Image-Turbo)."""
        path = resolve_transformer_file(source, spec.options.transformer_file)
        if path is None:
            return ZetaChromaPipeline.from_pretrained(source, dtype=torch_dtype, **overrides)
        text_source = spec.options.text_encoder
        return ZetaChromaPipeline(
            transformer=load_transformer_file(path, torch_dtype),
            text_encoder=Qwen3Model.from_pretrained(text_source, subfolder="text_encoder", dtype=torch_dtype).eval(),
            tokenizer=AutoTokenizer.from_pretrained(text_source, subfolder="tokenizer"),
        )

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params)
