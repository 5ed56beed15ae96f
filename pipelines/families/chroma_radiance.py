"""Chroma Radiance (``chroma_radiance``): pixel-space Chroma, our own pipeline and transformer, sampled as ai-toolkit
samples it.

diffusers has no Radiance model. ai-toolkit (``extensions_built_in/diffusion_models/chroma/chroma_radiance_model.py``,
its ``src/radiance.py`` model and its ``ChromaPipeline(is_radiance=True)``, a ``FluxPipeline`` subclass) samples it
like Chroma, on pixels instead of latents. Ours: :class:`ChromaRadianceTransformer2DModel`
(``chroma_radiance_transformer.py``, checkpoint names; proven equal to ai-toolkit's module on the same weights in
``tests/test_chroma_radiance.py``) inside :class:`ChromaRadiancePipeline`. What the previews do, and so do we:

* **Prompts.** As for Chroma (:meth:`ChromaFamilyPipeline.encode`, shared): T5-XXL over the prompt padded to 512
  tokens, run without its attention mask; the transformer attends to the prompt's tokens and the first padding token.
* **Negative prompt.** ai-toolkit's ``generate_images`` encodes the sample's ``neg`` as the unconditional prompt (its
  default is empty), so the negative prompt is used, with CFG.
* **Guidance.** Real CFG ``u + g (c - u)`` when ``guidance > 1.00001`` (one pass otherwise); the transformer's guidance
  input is fixed at 0.
* **Initial noise.** ``randn(B, 3, H, W)`` in the prompt embeddings' dtype from the seeded CPU generator: pixels, no
  packing, no scale.
* **Schedule.** FlowMatch Euler with ai-toolkit's Chroma config (dynamic exponential shift, 0.5..1.15 over 256..4096
  tokens) on ``sigmas = linspace(1, 1/N, N)``. ai-toolkit's pipeline takes the "image sequence length" for ``mu`` from
  ``latents.shape[1]``, which for unpacked pixels is the channel count, 3: ``mu`` is 0.457 at every size. We pass the
  same. The transformer gets ``t / 1000`` (flow time) and predicts the velocity.
* **Output.** The final latents are the image in ``[-1, 1]``; ``(x + 1) / 2`` clamped to ``[0, 1]``.

Sizes are floored to 16, the patch size: ai-toolkit's pipeline floors to 2 only, and off the 16 grid its model leaves
the last partial patch out of the patch tokens (the border is not sampled properly).

Checkpoints: the published Radiance checkpoints are single files in original (BFL-style) names. ai-toolkit has no
default for this arch (it is not in its UI): its ``name_or_path`` is a local ``.safetensors`` file, or a hub repo
``lodestones/Chroma1-<name>`` from which it downloads ``Chroma1-<name>.safetensors`` (for ``lodestones/Chroma1-Radiance``,
``Chroma1-Radiance.safetensors``); T5 comes from ``ostris/Flex.1-alpha`` (``text_encoder_2``, ``tokenizer_2``). We load
the same (``ChromaRadianceOptions``), or a folder saved by :meth:`ChromaRadiancePipeline.save_pretrained`. ai-toolkit
loads the checkpoint strictly into its velocity-prediction model with the 3x3 conv head: the later x0-prediction files
(``__x0__`` / ``__sequential__`` marker keys) and the early linear-head ones do not load there and are refused here
with that reason.

LoRAs: ai-toolkit saves ``diffusion_model.`` + the checkpoint's own module names (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``...), which are our transformer's names, so no renaming is needed (Chroma's
``convert_bfl_to_diffusers_chroma`` exists because diffusers' Chroma class uses other names).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..base import AITKPipeline, GenerationParams
from ..registry import ChromaRadianceOptions, ModelSpec
from .chroma import CFG_THRESHOLD, ChromaFamilyPipeline
from .chroma_radiance_transformer import ChromaRadianceTransformer2DModel, config_from_state_dict

#: the folders of a saved pipeline (``save_pretrained``)
SUBFOLDERS = ("transformer", "text_encoder", "tokenizer", "scheduler")


def _checkpoint_file(source: str, revision: str | None) -> str:
    """The Radiance checkpoint file of ``source``, resolved as ai-toolkit resolves ``name_or_path``: a local file, or
    ``<repo name>.safetensors`` of a hub repo."""
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        raise FileNotFoundError(
            f"{source!r} is neither a Chroma Radiance checkpoint file nor a saved pipeline folder (no model_index.json); "
            "give the .safetensors file, a hub repo such as lodestones/Chroma1-Radiance, or a save_pretrained folder.")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(source, f"{source.rstrip('/').split('/')[-1]}.safetensors", revision=revision)


class ChromaRadiancePipeline(DiffusionPipeline):
    r"""Text to image with Chroma Radiance, in pixel space.

    Args:
        transformer ([`ChromaRadianceTransformer2DModel`]): the denoiser.
        text_encoder ([`T5EncoderModel`]): T5-XXL.
        tokenizer ([`T5TokenizerFast`]): its tokenizer.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): with dynamic shifting (ai-toolkit's Chroma config).
    """

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "ChromaRadiancePipeline":
        """Load a folder saved by ``save_pretrained`` (``transformer/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``) with our classes.

        Args:
            pretrained_model_name_or_path (str): the folder.
            dtype (torch.dtype, *optional*): dtype of the weighted components (``torch_dtype`` is accepted too).
            device_map (str, *optional*): a device to read the weighted components onto directly.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, T5EncoderModel

        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        device_map = kwargs.pop("device_map", None)
        if kwargs:
            raise ValueError(f"ChromaRadiancePipeline.from_pretrained got unsupported option(s) {sorted(kwargs)}.")
        folder = os.fspath(pretrained_model_name_or_path)
        missing = [sub for sub in SUBFOLDERS if not os.path.isdir(os.path.join(folder, sub))]
        if missing:
            raise FileNotFoundError(f"{folder!r} is not a saved Chroma Radiance pipeline: it lacks {missing}.")
        options = {key: value for key, value in (("dtype", dtype), ("device_map", device_map)) if value is not None}
        return cls(
            transformer=ChromaRadianceTransformer2DModel.from_pretrained(folder, subfolder="transformer", **options),
            text_encoder=T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"), **options).eval(),
            tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: str, options: ChromaRadianceOptions, dtype=None, revision: str | None = None,
                        axes_dim=None) -> "ChromaRadiancePipeline":
        """Load a Radiance checkpoint in original names (a ``.safetensors`` / ``.pth`` file, or a hub repo's
        ``<repo name>.safetensors``) and the T5 that ai-toolkit pairs with it (``options``).

        Args:
            checkpoint (str): the file or hub repo id.
            options (ChromaRadianceOptions): where the text encoder and tokenizer come from.
            dtype (torch.dtype, *optional*): dtype of the weights.
            revision (str, *optional*): hub revision of the checkpoint repo.
            axes_dim (tuple, *optional*): the rotary split when the heads are not the published 128 wide.
        """
        from accelerate import init_empty_weights
        from diffusers import FlowMatchEulerDiscreteScheduler
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, T5EncoderModel

        from ..registry import FLUX_FLOWMATCH

        path = _checkpoint_file(checkpoint, revision)
        # ai-toolkit reads .pth / .pt checkpoints with torch.load, anything else as safetensors
        state = torch.load(path, map_location="cpu", weights_only=True) if path.endswith((".pth", ".pt")) \
            else load_file(path)
        config = config_from_state_dict(state, **({} if axes_dim is None else {"axes_dim": axes_dim}))
        with init_empty_weights():
            transformer = ChromaRadianceTransformer2DModel(**config)
        if dtype is not None:
            kept = tuple(f"{name}." for name in ChromaRadianceTransformer2DModel._keep_in_fp32_modules)
            state = {key: value.to(torch.float32 if key.startswith(kept) else dtype) for key, value in state.items()}
        transformer.load_state_dict(state, strict=True, assign=True)
        del state
        encoder_options = {"dtype": dtype} if dtype is not None else {}
        return cls(
            transformer=transformer.eval(),
            text_encoder=T5EncoderModel.from_pretrained(options.text_encoder, subfolder=options.text_encoder_subfolder,
                                                        **encoder_options).eval(),
            tokenizer=AutoTokenizer.from_pretrained(options.text_encoder, subfolder=options.tokenizer_subfolder),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOWMATCH),
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        width: int = 1024,
        height: int = 1024,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ):
        """Sample one image per prompt embedding.

        Args:
            prompt_embeds (torch.Tensor): T5 features ``[B, L, D]``.
            prompt_attention_mask (torch.Tensor): ``[B, L]``, the text tokens the transformer attends to.
            negative_prompt_embeds, negative_prompt_attention_mask (torch.Tensor, *optional*): the unconditional
                prompt's, required when ``guidance_scale > 1.00001``.
            width, height (int, defaults to 1024): multiples of the patch size (16).
            num_inference_steps (int, defaults to 25): Euler steps.
            guidance_scale (float, defaults to 4.0): CFG above 1.00001, one pass per step otherwise.
            generator (torch.Generator or list, *optional*): draws the initial noise (one per image for a list).
            output_type (str, defaults to "np"): ``np``, ``pil``, ``pt`` or ``latent`` (the ``[-1, 1]`` pixels).
            callback_on_step_end (callable, *optional*): ``f(pipe, step, timestep, {"latents": latents})`` after
                every step.
        """
        device = self._execution_device
        patch = self.transformer.config.patch_size
        if width % patch or height % patch:
            raise ValueError(f"width and height must be multiples of {patch}, got {width}x{height}.")
        cfg = guidance_scale > CFG_THRESHOLD
        if cfg and negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale {guidance_scale} runs CFG: pass negative_prompt_embeds and its mask.")
        batch_size = prompt_embeds.shape[0]
        embeds, mask = prompt_embeds, prompt_attention_mask
        if cfg:  # one batched pass of [unconditional, conditional] (ai-toolkit runs the two one after the other)
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
        passes = 2 if cfg else 1

        channels = self.transformer.config.in_channels
        latents = randn_tensor((batch_size, channels, height, width), generator=generator, device=device,
                               dtype=prompt_embeds.dtype)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        config = self.scheduler.config
        # ai-toolkit's "image sequence length" is latents.shape[1]: the channel count for unpacked pixels
        mu = calculate_shift(channels, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        guidance = torch.zeros(batch_size * passes, device=device, dtype=torch.float32)

        for i, t in enumerate(timesteps):
            flow_time = t.expand(batch_size).to(latents.dtype) / 1000
            velocity = self.transformer(
                hidden_states=latents.repeat(passes, 1, 1, 1), encoder_hidden_states=embeds,
                timestep=flow_time.repeat(passes), attention_mask=mask, guidance=guidance, return_dict=False,
            )[0]
            if cfg:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})

        images = latents if output_type == "latent" else self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class ChromaRadianceFamilyPipeline(AITKPipeline):
    """``chroma_radiance``."""

    denoiser = "transformer"
    options_type = ChromaRadianceOptions

    #: ai-toolkit encodes Radiance prompts exactly as Chroma's (``get_prompt_embeds`` is the same code)
    encode = ChromaFamilyPipeline.encode

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        return ChromaRadiancePipeline

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        """A folder saved by ``save_pretrained`` (``model_index.json``) loads with ``from_pretrained``; anything else
        is a checkpoint in original names (a file or hub repo, as ai-toolkit's ``name_or_path``) plus the T5 of
        ``spec.options``."""
        if os.path.isfile(os.path.join(source, "model_index.json")):
            return ChromaRadiancePipeline.from_pretrained(source, dtype=torch_dtype, **overrides)
        return ChromaRadiancePipeline.from_checkpoint(source, spec.options, dtype=torch_dtype)

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        batch = params.batch_size
        embeds, mask = self.encode([params.prompt] * batch)
        kwargs = {"prompt_embeds": embeds, "prompt_attention_mask": mask, "width": params.width,
                  "height": params.height, "guidance_scale": params.guidance, "output_type": "np"}
        if params.guidance > CFG_THRESHOLD:
            negative_embeds, negative_mask = self.encode([params.negative] * batch)
            kwargs.update(negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=negative_mask)
        return kwargs

