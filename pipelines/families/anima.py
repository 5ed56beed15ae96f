"""Anima: diffusers' Anima modular blocks, driven as ai-toolkit drives them (``extensions_built_in/diffusion_models/anima``).

Anima is NVIDIA's Cosmos-Predict2 DiT (``CosmosTransformer3DModel``) conditioned by a small Qwen3 text encoder through
an LLM adapter (``AnimaTextConditioner``: learned T5-token queries cross-attending to the Qwen3 states), with the
Qwen-Image VAE. diffusers 0.42 ships it as a modular pipeline only (``AnimaModularPipeline`` / ``AnimaAutoBlocks``).

What ai-toolkit's previews do, and so do we:

* prompts are encoded by ai-toolkit's own code, not by diffusers' ``AnimaTextEncoderStep``: the Qwen3 last hidden
  state (padding to the longest prompt, at most 512 tokens) times the attention mask, and the T5 token ids with their
  mask. The two differ on an empty prompt (ai-toolkit's default negative is often empty): ai-toolkit encodes one pad
  token and unmasks it for the LLM adapter, so the adapter attends to that token's state; diffusers zeroes the state
  and masks everything. :class:`AnimaAitkTextEncoderStep` is ai-toolkit's rule;
* the negative prompt is always encoded; the modular guider (``ClassifierFreeGuidance``, freshly made with diffusers'
  default config, then ``guidance_scale`` set) runs real CFG unless the guidance is exactly 1;
* then diffusers' own ``AnimaCoreDenoiseStep`` and ``AnimaDecodeStep`` (ai-toolkit's ``AnimaEmbedsToImageBlocks``):
  the LLM adapter, a float32 latent draw of shape (B, 16, 1, H/8, W/8) from the seeded generator, sigmas
  ``linspace(1, 1/N, N)`` shifted by the scheduler (static shift 3.0, registry ``ANIMA_FLOWMATCH``), the transformer
  with a zero padding mask, Euler steps and the VAE decode with the latent mean/std;
* width and height are floored to multiples of 32 (``get_bucket_divisibility``).

Our only addition to the denoising loop is a step-end block that reports progress (and so can interrupt) and hands
the step's latents to the callback (live previews). LoRAs:
ai-toolkit saves them in ComfyUI / original Cosmos names (``diffusion_model.blocks.N.self_attn.q_proj``...), its LLM
adapter modules as ``diffusion_model.llm_adapter.*``; :func:`anima_original_to_diffusers` maps both.
"""

from __future__ import annotations

import os
import re

from diffusers import ClassifierFreeGuidance
from diffusers.modular_pipelines import ModularPipelineBlocks, SequentialPipelineBlocks
from diffusers.modular_pipelines.anima.denoise import AnimaDenoiseStep
from diffusers.modular_pipelines.anima.modular_blocks_anima import AnimaCoreDenoiseStep, AnimaDecodeStep
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam

from ..base import AITKPipeline, GenerationParams
from ..lora.convert import ConvertedLora
from .modular import StepEndBlock, block_errors_not_echoed, disable_progress_bars

MAX_SEQUENCE_LENGTH = 512  # ai-toolkit's model_kwargs default for both tokenizers
QWEN_PAD_TOKEN_ID = 151643  # Qwen3's <|endoftext|>, ai-toolkit's pad id when the tokenizer names none


# ---------------------------------------------------------------------------------------------------------------- prompts
def encode_qwen(components, prompts: list[str], device, dtype):
    """ai-toolkit's Qwen3 encoding: the last hidden state times the mask the LLM adapter gets, and that mask. A batch
    of empty prompts is one pad token each; an all-masked row gets its first token unmasked for the adapter (the
    text encoder itself still sees it masked)."""
    import torch

    tokens = components.tokenizer(prompts, padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                  return_tensors="pt")
    input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    if input_ids.shape[1] == 0:
        pad_id = components.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), 1), QWEN_PAD_TOKEN_ID if pad_id is None else pad_id,
                               dtype=torch.long, device=device)
        mask = torch.zeros_like(input_ids)
    adapter_mask = mask.clone()
    adapter_mask[adapter_mask.sum(dim=1) == 0, 0] = 1
    states = components.text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=False)
    states = states.last_hidden_state.to(device=device, dtype=dtype)
    return states * adapter_mask.to(states).unsqueeze(-1), adapter_mask


def t5_token_ids(components, prompts: list[str], device):
    """The T5 token ids (and mask) the LLM adapter turns into queries."""
    tokens = components.t5_tokenizer(prompts, padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                                     return_tensors="pt")
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


class AnimaAitkTextEncoderStep(ModularPipelineBlocks):
    """Encode the prompt and the negative prompt as ai-toolkit's ``AnimaModel.get_prompt_embeds`` does."""

    model_name = "anima"

    @property
    def description(self) -> str:
        return "Encode Anima prompts into Qwen3 states and T5 token ids as ai-toolkit does."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        from transformers import Qwen2Tokenizer, Qwen3Model, T5TokenizerFast

        return [ComponentSpec("text_encoder", Qwen3Model), ComponentSpec("tokenizer", Qwen2Tokenizer),
                ComponentSpec("t5_tokenizer", T5TokenizerFast)]

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("prompt", required=True, type_hint=list), InputParam("negative_prompt", type_hint=list)]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        names = ("qwen_prompt_embeds", "qwen_attention_mask", "t5_input_ids", "t5_attention_mask")
        return [OutputParam(prefix + name) for prefix in ("", "negative_") for name in names]

    def __call__(self, components, state):
        import torch

        block_state = self.get_block_state(state)
        device, dtype = components._execution_device, components.text_encoder.dtype
        negative = block_state.negative_prompt or [""] * len(block_state.prompt)
        with torch.no_grad():
            for prefix, prompts in (("", block_state.prompt), ("negative_", negative)):
                embeds, mask = encode_qwen(components, prompts, device, dtype)
                ids, ids_mask = t5_token_ids(components, prompts, device)
                for name, value in (("qwen_prompt_embeds", embeds), ("qwen_attention_mask", mask),
                                    ("t5_input_ids", ids), ("t5_attention_mask", ids_mask)):
                    setattr(block_state, prefix + name, value)
        self.set_block_state(state, block_state)
        return components, state


# ---------------------------------------------------------------------------------------------------------------- torchvision
def _nearest_resize(tensor, size, interpolation):
    import torch

    return torch.nn.functional.interpolate(tensor, size=list(size), mode=interpolation)


def provide_padding_mask_resize() -> None:
    """Let ``CosmosTransformer3DModel`` run without torchvision (not a dependency of ours).

    With ``concat_padding_mask`` (Anima's config) its forward resizes the padding mask with torchvision's
    ``transforms.functional.resize(..., InterpolationMode.NEAREST)``, a name diffusers imports only when torchvision
    is installed. For a tensor that resize is ``torch.nn.functional.interpolate(mode="nearest")``, which we give it
    under the same name when torchvision is absent (and the mask ai-toolkit samples with is all zeros anyway)."""
    from types import SimpleNamespace

    from diffusers.models.transformers import transformer_cosmos

    if not hasattr(transformer_cosmos, "transforms"):
        transformer_cosmos.transforms = SimpleNamespace(
            InterpolationMode=SimpleNamespace(NEAREST="nearest"), functional=SimpleNamespace(resize=_nearest_resize))


# ---------------------------------------------------------------------------------------------------------------- blocks
class AnimaStepEnd(StepEndBlock):
    model_name = "anima"
    step_outputs = ("latents",)  # (B, 16, 1, H/8, W/8), normalised as the decode step's latent mean/std say


class AnimaAitkDenoiseStep(AnimaDenoiseStep):
    block_classes = [*AnimaDenoiseStep.block_classes, AnimaStepEnd]
    block_names = [*AnimaDenoiseStep.block_names, "step_end"]


class AnimaAitkCoreDenoiseStep(AnimaCoreDenoiseStep):
    block_classes = [AnimaAitkDenoiseStep if name == "denoise" else block
                     for name, block in zip(AnimaCoreDenoiseStep.block_names, AnimaCoreDenoiseStep.block_classes)]
    block_names = AnimaCoreDenoiseStep.block_names


class AnimaAitkBlocks(SequentialPipelineBlocks):
    """ai-toolkit's Anima sample path: its prompt encoding, then diffusers' denoise and decode blocks."""

    model_name = "anima"
    block_classes = [AnimaAitkTextEncoderStep, AnimaAitkCoreDenoiseStep, AnimaDecodeStep]
    block_names = ["text_encoder", "denoise", "decode"]


# ---------------------------------------------------------------------------------------------------------------- LoRA names
# ComfyUI / original Cosmos module names (as ai-toolkit saves them) -> diffusers' CosmosTransformer3DModel names.
COSMOS_BLOCK_NAMES = {
    "adaln_modulation_self_attn.1": "norm1.linear_1",
    "adaln_modulation_self_attn.2": "norm1.linear_2",
    "adaln_modulation_cross_attn.1": "norm2.linear_1",
    "adaln_modulation_cross_attn.2": "norm2.linear_2",
    "adaln_modulation_mlp.1": "norm3.linear_1",
    "adaln_modulation_mlp.2": "norm3.linear_2",
    "self_attn.q_proj": "attn1.to_q",
    "self_attn.k_proj": "attn1.to_k",
    "self_attn.v_proj": "attn1.to_v",
    "self_attn.output_proj": "attn1.to_out.0",
    "cross_attn.q_proj": "attn2.to_q",
    "cross_attn.k_proj": "attn2.to_k",
    "cross_attn.v_proj": "attn2.to_v",
    "cross_attn.output_proj": "attn2.to_out.0",
    "mlp.layer1": "ff.net.0.proj",
    "mlp.layer2": "ff.net.2",
}
COSMOS_TOP_NAMES = {
    "final_layer.adaln_modulation.1": "norm_out.linear_1",
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
    "final_layer.linear": "proj_out",
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "x_embedder.proj.1": "patch_embed.proj",
}
_ANIMA_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# the LLM adapter: ComfyUI's `llm_adapter.` and diffusers' `text_conditioner.` both name AnimaTextConditioner's modules
_ANIMA_ADAPTER_PREFIXES = ("llm_adapter.", "text_conditioner.")


def anima_original_to_diffusers(converted: ConvertedLora) -> ConvertedLora:
    """Place an Anima LoRA on diffusers' modules: original Cosmos block and top-level names become
    ``CosmosTransformer3DModel`` names, ``llm_adapter.*`` goes to the ``text_conditioner`` component (its module names
    are the original ones). diffusers names pass through."""
    patches = {}
    renamed = 0
    for (component, path), patch in converted.patches.items():
        block = _ANIMA_BLOCK.match(path)
        adapter_prefix = next((p for p in _ANIMA_ADAPTER_PREFIXES if path.startswith(p)), None)
        if adapter_prefix:
            component, path = "text_conditioner", path[len(adapter_prefix):]
            renamed += adapter_prefix == "llm_adapter."  # text_conditioner. is diffusers' own name
        elif block and block.group(2) in COSMOS_BLOCK_NAMES:
            path = f"transformer_blocks.{block.group(1)}.{COSMOS_BLOCK_NAMES[block.group(2)]}"
            renamed += 1
        elif path in COSMOS_TOP_NAMES:
            path = COSMOS_TOP_NAMES[path]
            renamed += 1
        patches[(component, path)] = patch
    layout = converted.layout + ("+cosmos_names" if renamed else "")
    return ConvertedLora(patches=patches, layout=layout, notes=list(converted.notes))


# ---------------------------------------------------------------------------------------------------------------- family
class AnimaFamilyPipeline(AITKPipeline):
    """``anima``."""

    denoiser = "transformer"
    # not batched: the text step pads the prompts to the longest of the batch and the denoiser sees the
    # padding, so a shorter prompt's image changes (measured 0.024 on the tiny model, BENCHMARKS.md "Previews in bulk")
    batches_distinct_prompts = False

    offload_refusal = ("runs on diffusers' modular pipeline, which has no CPU offloading: use offload='none' (Anima's "
                       "transformer and text encoder are small, about 2B and 0.6B), or 'auto', which streams the "
                       "transformer's blocks where it does not fit.")

    @classmethod
    def load_diffusers_pipeline(cls, spec, source, torch_dtype, **overrides):
        """The modular pipeline of :class:`AnimaAitkBlocks` with the checkpoint's components. A local folder loads
        every component from its own subfolders (its ``modular_model_index.json`` may name where it was saved)."""
        if os.path.exists(source) and not os.path.isfile(os.path.join(source, "modular_model_index.json")):
            raise FileNotFoundError(f"{source!r} is not an Anima modular pipeline folder (no modular_model_index.json). "
                                    f"Give a snapshot of {spec.base}, or the hub repo id.")
        # components load on the CPU and `place` moves them: load_components takes no device map (`overrides`)
        provide_padding_mask_resize()
        pipe = AnimaAitkBlocks().init_pipeline(source)
        local = {"pretrained_model_name_or_path": source} if os.path.isdir(source) else {}
        pipe.load_components(dtype=torch_dtype, **local)
        missing = [name for name in ("transformer", "text_conditioner", "text_encoder", "tokenizer", "t5_tokenizer",
                                     "vae") if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"{source!r}: the Anima components {missing} could not be loaded (see the log above).")
        pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=spec.guidance))
        disable_progress_bars(pipe._blocks)
        return pipe

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return self.prompt_call(params)

    def call_pipeline(self, call: dict):
        # ai-toolkit sets the guidance on the guider, which the denoising loop reads
        self.pipe.guider.guidance_scale = call.pop("guidance_scale")
        with block_errors_not_echoed():
            return self.pipe(**call, output="images")

    def postprocess(self, output, params: GenerationParams) -> dict:
        import numpy as np

        return {"images": np.asarray(output, dtype=np.float32)}

    def lora_name_mapper(self):
        return anima_original_to_diffusers
