"""FLUX.2-dev and FLUX.2-klein 4B/9B: diffusers ``Flux2Pipeline`` / ``Flux2KleinPipeline`` as ai-toolkit samples them.

ai-toolkit samples FLUX.2 with its own copy of BFL's pipeline (``extensions_built_in/diffusion_models/flux2``), not
with diffusers'. Where the two differ we follow ai-toolkit, explicitly:

* **Schedule.** BFL's ``get_schedule``: ``t = linspace(1, 0, N+1)`` (float32), time-shifted by
  ``e^mu / (e^mu + 1/t - 1)`` with ``mu`` interpolated linearly from the packed image sequence length
  ``(H/16)*(W/16)`` (256 -> 0.5, 4096 -> 1.15), then Euler steps ``x += (t_next - t) * v``. Diffusers' pipelines
  instead shift ``linspace(1, 1/N, N)`` with an empirical, step-dependent ``mu``. We compute BFL's schedule here and
  pass its first N values as ``sigmas`` to a FlowMatch Euler scheduler with shift 1.0 and no dynamic shifting
  (``registry.FLUX2_EULER``), which keeps them as given and appends the final 0.
* **Guidance.** FLUX.2-dev is guidance-distilled: ``guidance`` feeds the guidance embedding, one forward per step, and
  the negative prompt has no effect (the base class warns). klein is not: above 1 it is real CFG ``u + g(c - u)`` with
  the ENCODED negative prompt (empty by default). diffusers' klein pipeline only encodes ``""``; we encode the
  negative ourselves and pass its embeddings. A klein checkpoint whose config says ``is_distilled`` is still sampled
  with CFG, as ai-toolkit's klein class does.
* **Reference images** (0..3 ``control_images``): prepared with ai-toolkit's rules (sides >= 64, aspect <= 8, area
  capped at 1024^2 with LANCZOS and ``int()`` sizes, then centre-cropped to multiples of 16 with no resize), then
  given to the pipeline's ``image=``, which VAE-encodes them (latent mean, 2x2 patched, batch-norm normalised) into
  reference tokens at time offsets 10, 20, 30. They need only the VAE, not FLUX.2's Pixtral processor.
* **Noise.** Both pipelines draw ``randn((B, 128, H/16, W/16))`` from the seeded CPU generator in the prompt
  embeddings' dtype, the same draw as ai-toolkit's (``tests/test_flux2_chroma.py`` checks it against the goldens).

Text encoding is the pipelines' own and matches ai-toolkit's: Mistral3 hidden states (10, 20, 30) with BFL's system
message for FLUX.2-dev, Qwen3 hidden states (9, 18, 27) through the chat template for klein, 512 tokens, padded. The
layer indices are the registry's ``Flux2Options.text_encoder_out_layers``; a text encoder with fewer layers than that
(only the tiny test models) has its last layers read instead, with a warning.
LoRAs use original BFL module names (``lora.convert.convert_bfl_to_diffusers_flux2``).
"""

from __future__ import annotations

import functools
import logging
import math

from ..base import AITKPipeline, GenerationParams, LatentLayout
from ..registry import Flux2Options

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512

# BFL's get_schedule: mu is a line through (256 tokens, 0.5) and (4096 tokens, 1.15)
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15

# ai-toolkit's reference-image preparation (flux2/src/sampling.py default_prep)
REFERENCE_MAX_PIXELS = 1024 * 1024
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8
REFERENCE_MULTIPLE = 16


def bfl_mu(image_seq_len: int) -> float:
    """BFL's time-shift ``mu`` for a packed image sequence length (linear, 256 -> 0.5, 4096 -> 1.15)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return slope * image_seq_len + (BASE_SHIFT - slope * BASE_SEQ_LEN)


def bfl_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """BFL's ``get_schedule(num_steps, image_seq_len)``: ``num_steps + 1`` times from 1.0 down to 0.0.

    Computed as BFL does, on a float32 ``linspace``, so the values are the ones ai-toolkit samples with.
    """
    import torch

    t = torch.linspace(1, 0, num_steps + 1)
    mu = bfl_mu(image_seq_len)
    return (math.exp(mu) / (math.exp(mu) + (1 / t - 1))).tolist()


def prepare_reference_image(image):
    """ai-toolkit's preparation of one FLUX.2 reference image (PIL RGB in, PIL RGB out, sides multiples of 16)."""
    from PIL import Image

    width, height = image.size
    if width < REFERENCE_MIN_SIDE or height < REFERENCE_MIN_SIDE:
        raise ValueError(
            f"A FLUX.2 reference image must be at least {REFERENCE_MIN_SIDE}x{REFERENCE_MIN_SIDE} pixels, got "
            f"{width}x{height}; use a larger image."
        )
    if max(width / height, height / width) > REFERENCE_MAX_ASPECT:
        raise ValueError(
            f"A FLUX.2 reference image may be at most {REFERENCE_MAX_ASPECT}:1, got {width}x{height}; crop it first."
        )
    if width * height > REFERENCE_MAX_PIXELS:
        scale = math.sqrt(REFERENCE_MAX_PIXELS / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size
    new_width, new_height = width - width % REFERENCE_MULTIPLE, height - height % REFERENCE_MULTIPLE
    left, top = (width - new_width) // 2, (height - new_height) // 2
    return image.crop((left, top, left + new_width, top + new_height))


class Flux2FamilyPipeline(AITKPipeline):
    """``flux2`` (FLUX.2-dev, guidance-distilled) and ``flux2_klein_4b`` / ``flux2_klein_9b`` (real CFG)."""

    latent_layout = LatentLayout(tokens=True, patch=2)

    denoiser = "transformer"
    options_type = Flux2Options
    batches_distinct_prompts = True

    @property
    def is_klein(self) -> bool:
        return self.spec.pipeline_class == "Flux2KleinPipeline"

    @classmethod
    def load_diffusers_pipeline(cls, spec, source, torch_dtype, **overrides):
        if spec.pipeline_class == "Flux2KleinPipeline":
            overrides.setdefault("is_distilled", False)  # ai-toolkit's klein always does CFG above guidance 1
        return super().load_diffusers_pipeline(spec, source, torch_dtype, **overrides)

    @functools.cached_property
    def text_encoder_out_layers(self) -> tuple[int, ...]:
        """The text encoder's hidden-state layers stacked into the prompt embedding (ai-toolkit's, from the registry)."""
        layers = tuple(self.spec.options.text_encoder_out_layers)
        config = self.pipe.text_encoder.config
        depth = getattr(config, "text_config", config).num_hidden_layers
        if depth >= max(layers):
            return layers
        shallow = tuple(range(depth - len(layers) + 1, depth + 1))
        logger.warning("%s: the text encoder has %d layers, fewer than the hidden states %s ai-toolkit reads; using its "
                       "last layers %s (expected only for tiny test models).", self.spec.model_id, depth, layers, shallow)
        return shallow

    def lora_name_mapper(self):
        from ..lora.convert import convert_bfl_to_diffusers_flux2

        return convert_bfl_to_diffusers_flux2

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        image_seq_len = (params.height // 16) * (params.width // 16)
        schedule = bfl_schedule(params.steps, image_seq_len)
        kwargs = self.prompt_call(params, negative=False, sigmas=schedule[:-1], max_sequence_length=MAX_SEQUENCE_LENGTH,
                                  text_encoder_out_layers=self.text_encoder_out_layers)
        if params.control_images:
            kwargs["image"] = [prepare_reference_image(image) for image in params.control_images]
        if self.is_klein and params.guidance > 1.0:
            kwargs["negative_prompt_embeds"] = self.encode_negative(params)
        return kwargs

    def encode_negative(self, params: GenerationParams):
        """klein's unconditional embeddings: the negative prompt (default ``""``) encoded like the prompt."""
        import torch

        with torch.inference_mode():
            embeds, _ = self.pipe.encode_prompt(
                prompt=params.negatives,
                device=self.pipe._execution_device,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                text_encoder_out_layers=self.text_encoder_out_layers,
            )
        return embeds
