"""HiDream-O1-Image (``hidream_o1``): a Qwen3-VL language model that generates images in pixel space, sampled as
ai-toolkit samples it (``extensions_built_in/diffusion_models/hidream/hidream_o1_model.py`` and its vendored
``src/hidream_o1/``).

There is no VAE and no separate text encoder. The prompt, a timestep token and the image's pixel patches form one
sequence through the Qwen3-VL decoder. :class:`HiDreamO1Transformer` is transformers' ``Qwen3VLModel`` (the
published weights' ``visual`` and ``language_model`` load unchanged) plus the three image-generation modules of the
checkpoint: ``t_embedder1`` (sinusoidal timestep -> the timestep token's embedding), ``x_embedder`` (a 32x32x3 pixel
patch -> a bottleneck of hidden/4 -> hidden) and ``final_layer2`` (hidden -> a 32x32x3 patch of the clean image).
Its module names are the checkpoint's without ``model.``, which are also the names ai-toolkit saves LoRAs under
(``diffusion_model.`` + the path with ``.model.`` removed).

What ai-toolkit's previews do, and so do we:

* **Prompt.** ``[{"role": "user", "content": prompt}]`` through the checkpoint's chat template with the generation
  prompt, then ``<|boi_token|><|tms_token|>`` appended, tokenized without special tokens and unpadded. The
  negative prompt (empty by default) is encoded the same way. The image processor is never used (text to image).
* **Sequence.** ``[prompt tokens | image patches]``; the ``<|tms_token|>`` embedding is replaced by the timestep
  embedding of the denoising progress ``1 - t / 1000``. Rotary positions (Qwen3-VL's interleaved 3-D rope): the
  text tokens count 0, 1, ... on all three axes; the image patches sit at ``4096 + (0, row, column)`` whatever the
  prompt length. Attention: the text before the timestep token is causal among itself; the timestep token and the
  image patches attend to the whole sequence.
* **Prediction.** The model predicts the clean image; the velocity is ``(x_t - x0) / max(t / 1000, 0.001)``, and
  with guidance above 1 the two velocities combine as ``u + g (c - u)`` (one pass per prompt, the negative pass
  second).
* **Noise.** ``8.0 * randn(1, 3, H, W)`` from the seeded CPU generator (ai-toolkit's ``noise_scale``; a job's
  ``model_kwargs.noise_scale_inference`` or ``noise_scale`` is our ``noise_scale`` generation option); the latents
  are patchified (``b c (h 32) (w 32) -> b (h w) (c 32 32)``) and kept in bfloat16 between steps, as ai-toolkit's
  pipeline keeps them whatever the model dtype; each Euler step runs in float32.
* **Schedule.** FlowMatch Euler with a static shift of 3.0 (``HIDREAM_O1_FLOWMATCH``; ai-toolkit's
  ``HidreamO1FlowmatchScheduler`` sets the same shift again before sampling).
* **Decode.** The final latents are the image: ``(x + 1) / 2`` (in bfloat16, like the latents), unpatchified.
* **Size.** Width and height are floored to a multiple of 32 (the patch).

ai-toolkit samples one image per call; a batch here runs the images one after another, each from its own seed.

The attention pattern is a transformers attention function of ours (:func:`generation_attention`, registered as
``hidream_o1_generation`` and set on the text model): two unmasked SDPA passes, the order ai-toolkit's sampler uses.

Where we differ, and why: ai-toolkit runs the forward under ``torch.autocast(bfloat16)``; we run it in the loaded
dtype (bfloat16 by default on a GPU, which gives the same matmuls; float32 stays float32). A single ComfyUI-style
``.safetensors`` (ai-toolkit's ``is_comfy_weight``) is not loaded here: give the published folder.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import nn
from transformers import AttentionInterface, AutoTokenizer, Qwen3VLConfig, Qwen3VLModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..base import AITKPipeline, GenerationParams, LatentLayout
from ..lora.convert import ConvertedLora
from .pixel_space import patchify_pixels, unpatchify_pixels, velocity_from_x0

PATCH_SIZE = 32
PIXEL_CHANNELS = 3
#: ai-toolkit's ``DEFAULT_NOISE_SCALE``: the initial noise is this many standard deviations wide
NOISE_SCALE = 8.0
#: floor of the flow time in the x0 -> velocity conversion (ai-toolkit's ``T_EPS``)
MIN_FLOW_TIME = 0.001
#: the dtype ai-toolkit's pipeline keeps the latents in between steps, whatever the model dtype
LATENT_DTYPE = torch.bfloat16
#: the first rotary position of the image patches on every axis (the text before them counts from 0)
IMAGE_POSITION_ORIGIN = 4096
#: the published checkpoint's ``<|tms_token|>`` id; a config may name another (``tms_token_id``)
TIMESTEP_TOKEN_ID = 151673
IMAGE_START = "<|boi_token|>"
TIMESTEP_TOKEN = "<|tms_token|>"
TIMESTEP_FREQUENCY_DIM = 256
#: the name our attention pattern is registered under in transformers' AttentionInterface
GENERATION_ATTENTION = "hidream_o1_generation"


# ---------------------------------------------------------------------------------------------------- modules
class TimestepEmbedder(nn.Module):
    """Denoising progress in ``[0, 1]`` (1 = clean) -> ``[B, hidden]``: the 256-wide cos/sin code of ``1000 x
    progress``, then Linear-SiLU-Linear (``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCY_DIM, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, progress: torch.Tensor) -> torch.Tensor:
        code = get_timestep_embedding(progress * 1000, TIMESTEP_FREQUENCY_DIM, flip_sin_to_cos=True,
                                      downscale_freq_shift=0)
        return self.mlp(code.to(self.mlp[0].weight.dtype))


class PixelPatchEmbed(nn.Module):
    """A flattened pixel patch -> a bottleneck (``proj1``, no bias) -> the hidden width (``proj2``)."""

    def __init__(self, patch_features: int, bottleneck: int, hidden_size: int):
        super().__init__()
        self.proj1 = nn.Linear(patch_features, bottleneck, bias=False)
        self.proj2 = nn.Linear(bottleneck, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(patches))


class PixelHead(nn.Module):
    """The hidden state of an image token -> its predicted clean pixel patch (``linear``)."""

    def __init__(self, hidden_size: int, patch_features: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states)


def generation_attention(module, query, key, value, attention_mask, causal_length: int, **kwargs):
    """HiDream-O1's attention pattern as two unmasked SDPA passes (``[B, H, S, D]`` in, ``[B, S, H, D]`` out): every
    token attends to the whole sequence, then the first ``causal_length`` tokens (the text before the timestep token)
    are recomputed attending causally among themselves. Unmasked passes keep the fast kernels (no sequence-squared
    mask), in the order of operations ai-toolkit's sampler uses."""
    if attention_mask is not None:
        raise ValueError("HiDream-O1's generation attention builds its own pattern; pass no attention_mask.")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    output, _ = sdpa(module, query, key, value, None, is_causal=False, **kwargs)
    text = slice(None, causal_length)
    causal, _ = sdpa(module, query[:, :, text].contiguous(), key[:, :, text].contiguous(),
                     value[:, :, text].contiguous(), None, is_causal=True, **kwargs)
    return torch.cat([causal, output[:, causal_length:]], dim=1), None


AttentionInterface.register(GENERATION_ATTENTION, generation_attention)


class HiDreamO1Transformer(Qwen3VLModel):
    """transformers' ``Qwen3VLModel`` with HiDream-O1's image-generation modules (see the module docstring).

    Loads the published checkpoint (a ``Qwen3VLForConditionalGeneration`` folder: the ``model.`` prefix is dropped,
    the unused ``lm_head`` is skipped) or a folder it saved itself.
    """

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: Qwen3VLConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        patch_features = PIXEL_CHANNELS * PATCH_SIZE * PATCH_SIZE
        self.t_embedder1 = TimestepEmbedder(hidden)
        self.x_embedder = PixelPatchEmbed(patch_features, hidden // 4, hidden)
        self.final_layer2 = PixelHead(hidden, patch_features)
        self.post_init()
        self.language_model.config._attn_implementation = GENERATION_ATTENTION

    @property
    def timestep_token_id(self) -> int:
        return getattr(self.config, "tms_token_id", TIMESTEP_TOKEN_ID)

    def forward(self, input_ids: torch.Tensor, pixel_patches: torch.Tensor, progress: torch.Tensor,
                position_ids: torch.Tensor, text_attends_causally: int) -> torch.Tensor:
        """Predict the clean image patches.

        Args:
            input_ids (torch.LongTensor): ``[B, L]`` prompt tokens; each ``<|tms_token|>`` becomes the timestep.
            pixel_patches (torch.Tensor): ``[B, N, 3*32*32]`` the noisy image, patchified.
            progress (torch.Tensor): ``[B]`` float32 denoising progress ``1 - t / 1000``.
            position_ids (torch.LongTensor): ``[3, B, L + N]`` rotary positions (:func:`rotary_positions`).
            text_attends_causally (int): how many leading tokens attend causally (the rest attend to everything).

        Returns:
            torch.Tensor: ``[B, N, 3*32*32]`` the predicted clean patches.
        """
        text = self.language_model
        if text.config._attn_implementation != GENERATION_ATTENTION:
            raise ValueError(f"The text model's attention is {text.config._attn_implementation!r}; HiDream-O1 needs "
                             f"{GENERATION_ATTENTION!r} (its causal-text / full-image pattern).")
        embeds = text.embed_tokens(input_ids)
        timestep = self.t_embedder1(progress)
        embeds = torch.where((input_ids == self.timestep_token_id)[..., None], timestep[:, None, :], embeds)
        image = self.x_embedder(pixel_patches.to(embeds.dtype))
        hidden = torch.cat([embeds, image], dim=1)
        rotary = text.rotary_emb(hidden, position_ids)
        for layer in text.layers:
            hidden = layer(hidden, position_embeddings=rotary, attention_mask=None, causal_length=text_attends_causally)
        hidden = text.norm(hidden)
        return self.final_layer2(hidden[:, input_ids.shape[1]:])


def rotary_positions(text_length: int, rows: int, columns: int, device=None) -> torch.Tensor:
    """``[3, 1, text_length + rows * columns]``: the text at ``0 .. text_length - 1`` on every axis, the image patch
    at row ``r``, column ``c`` at ``4096 + (0, r, c)`` (temporal, height, width)."""
    text = torch.arange(text_length, device=device).expand(3, -1)
    grid_rows, grid_columns = torch.meshgrid(torch.arange(rows, device=device), torch.arange(columns, device=device),
                                             indexing="ij")
    image = torch.stack([torch.zeros_like(grid_rows), grid_rows, grid_columns]).reshape(3, -1) + IMAGE_POSITION_ORIGIN
    return torch.cat([text, image], dim=1)[:, None, :]


# ---------------------------------------------------------------------------------------------------- pipeline
class HiDreamO1Pipeline(DiffusionPipeline):
    r"""Text to image with HiDream-O1 (ai-toolkit's preview loop, see the module docstring).

    Args:
        transformer ([`HiDreamO1Transformer`]): the Qwen3-VL generator.
        tokenizer ([`Qwen2TokenizerFast`]): the checkpoint's tokenizer with its chat template and the
            ``<|boi_token|>`` / ``<|tms_token|>`` tokens.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): static shift 3.0.
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: HiDreamO1Transformer, tokenizer, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, tokenizer=tokenizer, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "HiDreamO1Pipeline":
        """Load the published layout (one Qwen3-VL folder: ``config.json``, weights and tokenizer at the top, as
        ``HiDream-ai/HiDream-O1-Image``) or a folder saved by :meth:`save_pretrained` (``model_index.json``).

        Args:
            pretrained_model_name_or_path (str): a folder or a hub repo id.
            dtype (torch.dtype, *optional*): dtype of the transformer (``torch_dtype`` is accepted too).
            revision (str, *optional*): hub revision.
            device_map (str, *optional*): a device to read the weights onto directly.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        revision = kwargs.pop("revision", None)
        device_map = kwargs.pop("device_map", None)
        if kwargs:
            raise ValueError(f"HiDreamO1Pipeline.from_pretrained got unsupported option(s) {sorted(kwargs)}.")
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(folder, revision=revision,
                                       allow_patterns=["*.json", "model*.safetensors", "*.jinja", "*.txt"])
        saved = os.path.isfile(os.path.join(folder, "model_index.json"))
        model_dir = os.path.join(folder, "transformer") if saved else folder
        tokenizer_dir = os.path.join(folder, "tokenizer") if saved else folder
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"{folder!r} is not a HiDream-O1 folder: no config.json (expected the "
                                    "HiDream-ai/HiDream-O1-Image layout, or a folder saved by this pipeline).")
        options = {key: value for key, value in (("dtype", dtype), ("device_map", device_map)) if value is not None}
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        missing = [token for token in (IMAGE_START, TIMESTEP_TOKEN) if token not in tokenizer.get_vocab()]
        if not tokenizer.chat_template or missing:
            raise ValueError(f"The tokenizer in {tokenizer_dir!r} lacks HiDream-O1's chat template or its tokens "
                             f"{missing}: give the HiDream-ai/HiDream-O1-Image folder.")
        return cls(transformer=HiDreamO1Transformer.from_pretrained(model_dir, **options).eval(), tokenizer=tokenizer,
                   scheduler=FlowMatchEulerDiscreteScheduler())

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """``[1, L]`` token ids: the chat template with the generation prompt, then ``<|boi_token|><|tms_token|>``."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer.encode(text + IMAGE_START + TIMESTEP_TOKEN, add_special_tokens=False)
        return torch.tensor([ids], dtype=torch.long, device=self._execution_device)

    def predict_x0(self, input_ids: torch.Tensor, latents: torch.Tensor, t: torch.Tensor, rows: int, columns: int):
        """The clean-patch prediction for one prompt, float32."""
        positions = rotary_positions(input_ids.shape[1], rows, columns, input_ids.device)
        progress = (1.0 - t.float() / 1000.0).reshape(1)
        x0 = self.transformer(input_ids, latents.to(self.transformer.dtype), progress, positions,
                              text_attends_causally=input_ids.shape[1] - 1)
        return x0.float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[str],
        negative_prompt: list[str],
        width: int,
        height: int,
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        noise_scale: float = NOISE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ):
        """Sample one image per prompt, one after another.

        Args:
            prompt (list[str]): one prompt per image.
            negative_prompt (list[str]): the unconditional prompts, used when ``guidance_scale > 1``.
            width, height (int): the output size, multiples of 32.
            num_inference_steps (int, defaults to 30): Euler steps.
            guidance_scale (float, defaults to 4.0): CFG on the velocities above 1; one pass per step otherwise.
            noise_scale (float, defaults to 8.0): the initial noise's standard deviation.
            generator (torch.Generator or list, *optional*): CPU generator(s) of the initial noise, one per image.
            output_type (str, defaults to "np"): ``np`` (``[B, H, W, 3]`` in ``[0, 1]``), ``pt`` or ``latent``
                (the ``[-1, 1]`` pixels, ``[B, 3, H, W]``).
            callback_on_step_end (callable, *optional*): ``f(pipe, step, timestep, {"latents": latents})`` after
                every step of every image (the step count restarts with each image; ``latents``: that image's
                patch tokens ``[1, N, 3 * 32 * 32]``); raising from it stops sampling.
        """
        if width % PATCH_SIZE or height % PATCH_SIZE:
            raise ValueError(f"HiDream-O1 needs width and height in multiples of {PATCH_SIZE}, got {width}x{height}.")
        generators = generator if isinstance(generator, list) else [generator] * len(prompt)
        rows, columns = height // PATCH_SIZE, width // PATCH_SIZE
        images = []
        for text, negative, item_generator in zip(prompt, negative_prompt, generators, strict=True):
            images.append(self._sample_one(text, negative, rows, columns, num_inference_steps, guidance_scale,
                                           noise_scale, item_generator, callback_on_step_end))
        pixels = torch.cat(images)
        self.maybe_free_model_hooks()
        if output_type == "latent":
            return ImagePipelineOutput(images=pixels) if return_dict else (pixels,)
        pixels = ((pixels + 1) / 2).float().clamp(0, 1)
        if output_type == "np":
            pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type != "pt":
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}.")
        return ImagePipelineOutput(images=pixels) if return_dict else (pixels,)

    def _sample_one(self, prompt, negative, rows, columns, steps, guidance, noise_scale, generator, callback):
        device = self._execution_device
        cfg = guidance > 1.0
        prompt_ids = self.encode_prompt(prompt)
        negative_ids = self.encode_prompt(negative) if cfg else None
        noise = noise_scale * torch.randn((1, PIXEL_CHANNELS, rows * PATCH_SIZE, columns * PATCH_SIZE),
                                          generator=generator)
        latents = patchify_pixels(noise.to(device, LATENT_DTYPE), PATCH_SIZE)
        self.scheduler.set_timesteps(steps, device=device)
        for step, t in enumerate(self.scheduler.timesteps):
            flow_time = (t.float() / 1000.0).reshape(1)
            velocity = velocity_from_x0(latents.float(), self.predict_x0(prompt_ids, latents, t, rows, columns),
                                        flow_time, min_time=MIN_FLOW_TIME)
            if cfg:
                negative_velocity = velocity_from_x0(
                    latents.float(), self.predict_x0(negative_ids, latents, t, rows, columns), flow_time,
                    min_time=MIN_FLOW_TIME)
                velocity = negative_velocity + guidance * (velocity - negative_velocity)
            latents = self.scheduler.step(velocity, t, latents.float(), return_dict=False)[0].to(LATENT_DTYPE)
            if callback is not None:
                callback(self, step, t, {"latents": latents})
        return unpatchify_pixels(latents, rows * PATCH_SIZE, columns * PATCH_SIZE, PATCH_SIZE)


# ---------------------------------------------------------------------------------------------------- LoRA
def drop_lm_head(converted: ConvertedLora) -> ConvertedLora:
    """Leave out patches on ``lm_head`` (ai-toolkit adapts it only with ``transformer_only: false``): the language
    head takes no part in image generation, and this model does not load it."""
    kept = {key: patch for key, patch in converted.patches.items() if key[1].split(".")[0] != "lm_head"}
    if len(kept) == len(converted.patches):
        return converted
    notes = [*converted.notes, "lm_head left out (not used for images)"]
    return ConvertedLora(patches=kept, layout=converted.layout, notes=notes)


# ---------------------------------------------------------------------------------------------------- family
class HiDreamO1FamilyPipeline(AITKPipeline):
    """``hidream_o1``."""

    denoiser = "transformer"
    batches_distinct_prompts = True
    latent_layout = LatentLayout(tokens=True, patch=PATCH_SIZE)  # patchify_pixels' 32x32 RGB patches

    @classmethod
    def diffusers_pipeline_class(cls, spec):
        return HiDreamO1Pipeline

    @classmethod
    def load_diffusers_pipeline(cls, spec, source, torch_dtype, **overrides):
        """The published folder (no ``model_index.json``: one Qwen3-VL folder) or one saved by this pipeline."""
        if os.path.isfile(source):
            raise ValueError(f"{spec.model_id} loads a folder or hub repo ({spec.base} layout), not the single file "
                             f"{source!r} (ai-toolkit's ComfyUI-format checkpoint is not supported here).")
        return HiDreamO1Pipeline.from_pretrained(source, dtype=torch_dtype, **overrides)

    def lora_name_mapper(self):
        return drop_lm_head

    generation_options = ("noise_scale",)

    def check_inputs(self, params: GenerationParams) -> None:
        """Generation option ``noise_scale`` (a number in 0.01..100): the initial noise's standard deviation
        (ai-toolkit's ``model_kwargs.noise_scale_inference``, which defaults to its ``noise_scale``, 8.0)."""
        super().check_inputs(params)
        value = params.extra.get("noise_scale")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0.01 <= value <= 100):
            raise ValueError(f"`noise_scale` must be a number in 0.01..100 (ai-toolkit's model_kwargs."
                             f"noise_scale_inference), got {value!r}.")

    def job_options(self, model_config: dict) -> dict:
        """A job's ``model_kwargs.noise_scale_inference`` (else its ``noise_scale``) as our ``noise_scale``."""
        model_kwargs = model_config.get("model_kwargs") or {}
        for key in ("noise_scale_inference", "noise_scale"):
            if key in model_kwargs:
                return {"noise_scale": float(model_kwargs[key])}
        return {}

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params, noise_scale=float(params.extra.get("noise_scale", NOISE_SCALE)))
