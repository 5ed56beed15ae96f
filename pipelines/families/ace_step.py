"""ACE-Step 1.5 (text to music, audio only), sampled as ai-toolkit's ``ace_step_15`` / ``ace_step_15_xl`` archs
sample their previews (``extensions_built_in/audio_models/ace_step``: ``ace_step_15_model.py``, ``src/pipeline.py``).

ai-toolkit loads the publisher's ComfyUI all-in-one file (DiT + condition encoder + Qwen3 text encoder + Oobleck VAE)
into its own modules and samples with a loop of its own. We load the same file into diffusers' classes
(``AceStepTransformer1DModel``, ``AceStepConditionEncoder``, ``Qwen3Model``, ``AutoencoderOobleck``; see
:func:`split_aio`) and run that loop in :class:`AceStepAITKPipeline`, a subclass of diffusers' ``AceStepPipeline`` that
keeps its components and replaces ``__call__``:

* **Structured prompt.** A sample prompt is tagged text: ``<CAPTION>...</CAPTION>``, ``<LYRICS>``, ``<BPM>``,
  ``<KEYSCALE>``, ``<TIMESIGNATURE>``, ``<DURATION>``, ``<LANGUAGE>`` (:func:`parse_tagged_prompt`). What reaches the
  model (:class:`AceStepPrompt`): the caption in the SFT template with the metas ``- bpm``, ``- timesignature``,
  ``- keyscale``, ``- duration: <int> seconds``; a BPM given is written as a float (``112.0``, ai-toolkit's tag parser),
  none as ``120``; the key is ``C`` and the time signature ``4/4`` whatever the tags say (ai-toolkit's sampler reads
  dictionary keys its parser never sets), which our ``keyscale``/``timesignature`` options can change; the duration
  defaults to 1 second; the language to empty. A prompt without any tag is taken as the caption (ai-toolkit would
  encode an empty caption).
* **Encoding.** The caption (up to 256 tokens) through the Qwen3 text encoder's last hidden state; the lyrics block
  ``# Languages / # Lyric`` (up to 2048 tokens) through its token embeddings only; both into the condition encoder with
  a timbre reference of ``min(25 * int(duration), 750)`` frames of ai-toolkit's fixed silence latent. The condition
  encoder's lyric and timbre encoders attend to every token (ai-toolkit's modules have no sliding window there).
* **Schedule.** ``t = linspace(1, 0, N + 1)[:-1]`` shifted by 3.0 (``3t / (1 + 2t)``), in the model dtype; the DiT gets
  ``t`` as both its timesteps; Euler ``x -= v (t_i - t_{i+1})`` with ``t_N = 0``.
* **Noise and length.** ``randn(1, int(25 * duration), 64)`` in the model dtype from the seeded generator; the context
  is ai-toolkit's silence latent of that length with a mask of ones.
* **Guidance.** Plain CFG ``u + g (c - u)`` above guidance 1, the unconditional pass with the learned
  ``null_condition_emb`` in place of the encoding (so the negative prompt has no effect).
* **Audio.** The VAE decodes the final latents to 48 kHz stereo, cut to ``int(duration * 48000)`` samples; no
  loudness normalisation.

Where the stock ``AceStepPipeline`` differs, we do what ai-toolkit does: it guides with APG (momentum, norm threshold)
instead of CFG, rounds the latent length up, takes the silence latent from the checkpoint and a 750-frame timbre
reference, writes the metas from its own arguments, and normalises the output to -1 dBFS.

LoRAs: ai-toolkit adapts the DiT's block Linears (attention ``q/k/v/o_proj`` and MLP) and saves them as
``diffusion_model.decoder.`` + its ComfyUI names (PEFT ``lora_A``/``lora_B`` without alpha, or LoKr), renamed by
:func:`ace_step_original_to_diffusers`. See ``docs/models/ace_step.md``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
from diffusers import AceStepPipeline
from diffusers.utils.torch_utils import randn_tensor

from ..base import AITKPipeline, GenerationParams
from ..registry import AceStepOptions, ModelSpec

logger = logging.getLogger(__name__)

#: ai-toolkit's flow shift (``src/pipeline.py`` computes the schedule with 3.0, whatever the scheduler config says)
SHIFT = 3.0
#: latent frames per second (48 kHz / the VAE's 1920x downsampling)
LATENT_RATE = 25
#: the longest timbre reference ai-toolkit feeds the condition encoder, in latent frames
TIMBRE_FRAMES = 750
CAPTION_MAX_TOKENS = 256
LYRICS_MAX_TOKENS = 2048
INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
MAX_DURATION = 600.0

# ai-toolkit's fixed silence latent (``get_silence_latent``, from ComfyUI): four leading frames, then the fifth vector
# repeated for the rest of the length. 64 channels each.
SILENCE_HEAD = (
    (
        0.5707, 0.0982, 0.6909, -0.5658, 0.6266, 0.6996, -0.1365, -0.1291, -0.0776, -0.1171, -0.2743, -0.8422,
        -0.1168, 1.5539, -4.6936, 0.7436, -1.1846, -0.2637, 0.6933, -6.7266, 0.0966, -0.1187, -0.3501, -1.1736,
        0.0587, -2.0517, -1.3651, 0.7508, -0.249, -1.3548, -0.129, -0.7261, 1.1132, -0.3249, 0.2337, 0.3004, 0.6605,
        -0.0298, -0.1989, -0.4041, 0.2843, -1.0963, -0.5519, 0.2639, -1.0436, -0.1183, 0.064, 0.446, -1.1001,
        -0.6172, -1.3241, 1.1379, 0.5623, -0.1507, -0.1963, -0.4742, -2.4697, 0.5302, 0.5381, 0.4636, -0.1782,
        -0.0687, 1.0333, 0.4202,
    ),
    (
        0.304, -0.1367, 0.62, 0.0665, -0.0642, 0.4655, -0.1187, -0.044, 0.2941, -0.2753, 0.0173, -0.2421, -0.0147,
        1.5603, -2.7025, 0.7907, -0.9736, -0.0682, 0.1294, -5.0707, -0.2167, 0.3302, -0.1513, -0.81, -0.3894,
        -0.2884, -0.3149, 0.866, -0.3817, -1.7061, 0.5824, -0.484, 0.6938, 0.1859, 0.1753, 0.3081, 0.0195, 0.1403,
        -0.0754, -0.2091, 0.1251, -0.1578, -0.4968, -0.1052, -0.4554, -0.032, 0.1284, 0.4974, -1.1889, -0.0344,
        -0.8313, 0.2953, 0.5445, -0.6249, -0.1595, -0.0682, -3.1412, 0.0484, 0.4153, 0.826, -0.1526, -0.0625, 0.5366,
        0.8473,
    ),
    (
        0.053524, -0.17534, 0.54443, -0.43501, -0.0021317, 0.372, -0.0040143, -0.15516, -0.12968, -0.15375,
        -0.077107, -0.20593, -0.3278, 1.5142, -2.6101, 0.58698, -1.2716, -0.24773, -0.027933, -5.0799, 0.11601,
        0.40987, -0.02203, -0.66495, -0.20995, -0.63474, -0.15893, 0.82745, -0.22992, -1.6816, 0.5444, -0.49579,
        0.55128, 0.30477, 0.083052, -0.061782, 0.0059036, 0.29553, -0.080645, -0.1006, 0.19144, -0.38124, -0.72949,
        0.02452, -0.50814, 0.23977, 0.092943, 0.39256, -1.1993, -0.32752, -0.72707, 0.29476, 0.43542, -0.88597,
        -0.41686, -0.08539, -2.9018, 0.064988, 0.53945, 0.91988, 0.058762, -0.070098, 0.64772, 0.89118,
    ),
    (
        -0.032225, -0.13195, 0.56411, -0.54766, -0.005217, 0.31425, -0.054367, -0.19419, -0.13059, -0.1366,
        -0.090984, -0.1954, -0.2559, 1.544, -2.6349, 0.68273, -1.2532, -0.1981, -0.022793, -5.0506, 0.18818, 0.50109,
        0.0073546, -0.68771, -0.30676, -0.73257, -0.16687, 0.92232, -0.18987, -1.7267, 0.53355, -0.53179, 0.44953,
        0.2882, 0.13012, -0.20943, -0.11348, 0.33929, -0.15069, -0.12919, 0.18929, -0.36166, -0.80756, 0.066387,
        -0.58867, 0.16978, 0.10134, 0.33877, -1.2133, -0.32492, -0.81237, 0.38101, 0.43765, -0.80596, -0.44531,
        -0.047513, -2.9266, 0.0011741, 0.45123, 0.93075, 0.053688, -0.19621, 0.6453, 0.9387,
    ),
)
SILENCE_TAIL = (
    -0.13672, -0.1582, 0.58594, -0.57422, 0.030273, 0.2793, -0.002594, -0.20703, -0.16113, -0.14746, -0.02771,
    -0.18066, -0.29688, 1.6016, -2.6719, 0.77734, -1.3516, -0.19434, -0.071289, -5.0938, 0.24316, 0.47266, 0.046387,
    -0.66406, -0.21973, -0.67578, -0.15723, 0.95312, -0.2002, -1.7109, 0.58984, -0.57422, 0.51562, 0.2832, 0.14551,
    -0.1875, -0.059814, 0.36719, -0.10059, -0.15723, 0.20605, -0.43359, -0.82812, 0.045654, -0.66016, 0.14844,
    0.094727, 0.38477, -1.2578, -0.33203, -0.85547, 0.43359, 0.42383, -0.89453, -0.50391, -0.056152, -2.9219,
    -0.024658, 0.50391, 0.98438, 0.072754, -0.21582, 0.63672, 1,
)


def silence_latent(frames: int, device, dtype) -> torch.Tensor:
    """ai-toolkit's silence latent, ``[1, frames, 64]``: the fixed head frames, then the tail vector repeated."""
    head = torch.tensor(SILENCE_HEAD, dtype=torch.float32, device=device)
    tail = torch.tensor(SILENCE_TAIL, dtype=torch.float32, device=device)
    latent = tail.expand(frames, -1).clone()
    latent[: head.shape[0]] = head[:frames]
    return latent.unsqueeze(0).to(dtype)


def flow_schedule(steps: int, shift: float = SHIFT) -> list[float]:
    """ai-toolkit's sampling times: ``linspace(1, 0, steps + 1)`` without the final 0, shifted (float64, numpy's
    ``linspace`` arithmetic)."""
    times = [i * (-1.0 / steps) + 1.0 for i in range(steps)]
    return [shift * t / (1 + (shift - 1) * t) for t in times]


# ------------------------------------------------------------------------------------------------- structured prompt
_TAGS = {"caption": "CAPTION", "lyrics": "LYRICS", "bpm": "BPM", "keyscale": "KEYSCALE",
         "timesignature": "TIMESIGNATURE", "duration": "DURATION", "language": "LANGUAGE"}


@dataclass(frozen=True)
class AceStepPrompt:
    """What ACE-Step is conditioned on, with ai-toolkit's effective defaults.

    ``bpm`` None is written ``120``; a number is written as a float (``96.0``), as ai-toolkit's tag parser makes it.
    ``keyscale`` and ``timesignature`` default to what ai-toolkit's sampler always writes (``C``, ``4/4``).
    ``duration`` (seconds, at least 1) sets the audio length and the metas' ``int(duration)``.
    """

    caption: str = ""
    lyrics: str = ""
    bpm: float | None = None
    keyscale: str = "C"
    timesignature: str = "4/4"
    duration: float = 1.0
    language: str = ""

    def __post_init__(self):
        for name in ("caption", "lyrics", "keyscale", "timesignature", "language"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"ACE-Step `{name}` must be a string, got {getattr(self, name)!r}.")
        if self.bpm is not None and (isinstance(self.bpm, bool) or not isinstance(self.bpm, (int, float))
                                     or not 0 < self.bpm <= 1000):
            raise ValueError(f"ACE-Step `bpm` must be a number in (0, 1000], got {self.bpm!r}.")
        if isinstance(self.duration, bool) or not isinstance(self.duration, (int, float)) \
                or not 1.0 <= self.duration <= MAX_DURATION:
            raise ValueError(f"ACE-Step `duration` must be seconds in 1..{MAX_DURATION:g} (ai-toolkit builds the "
                             f"timbre reference from int(duration) seconds), got {self.duration!r}.")

    @property
    def latent_frames(self) -> int:
        return int(self.duration * LATENT_RATE)

    @property
    def timbre_frames(self) -> int:
        return min(int(self.duration) * LATENT_RATE, TIMBRE_FRAMES)

    def caption_text(self) -> str:
        bpm = "120" if self.bpm is None else str(float(self.bpm))
        metas = (f"- bpm: {bpm}\n- timesignature: {self.timesignature}\n- keyscale: {self.keyscale}\n"
                 f"- duration: {int(self.duration)} seconds\n")
        return f"# Instruction\n{INSTRUCTION}\n\n# Caption\n{self.caption}\n\n# Metas\n{metas}<|endoftext|>\n"

    def lyrics_text(self) -> str:
        return f"# Languages\n{self.language}\n\n# Lyric\n{self.lyrics}<|endoftext|>"


def _number(name: str, text: str):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"ACE-Step <{_TAGS[name]}> must be a number, got {text!r}.") from None


def parse_tagged_prompt(prompt: str, **overrides) -> AceStepPrompt:
    """An :class:`AceStepPrompt` from ai-toolkit's tagged sample prompt (an empty or absent tag keeps the default; a
    prompt without any tag is the caption), then ``overrides`` (the typed generation options) on top."""
    found = {}
    for name, tag in _TAGS.items():
        match = re.search(rf"<{tag}>(.*?)</{tag}>", prompt, re.DOTALL)
        if match and match.group(1).strip():
            value = match.group(1).strip()
            found[name] = _number(name, value) if name in ("bpm", "duration") else value
    # ai-toolkit's sampler never reads the key and time-signature tags
    found.pop("keyscale", None)
    found.pop("timesignature", None)
    if not any(re.search(rf"<{tag}>", prompt) for tag in _TAGS.values()):
        found["caption"] = prompt.strip()
    return replace(AceStepPrompt(**found), **overrides)


GENERATION_OPTIONS = tuple(f.name for f in fields(AceStepPrompt) if f.name != "caption")


# ------------------------------------------------------------------------------------------------------ the pipeline
class AceStepAITKPipeline(AceStepPipeline):
    """diffusers' ``AceStepPipeline`` with ai-toolkit's preview loop (see the module docstring)."""

    def encode_structured(self, prompt: AceStepPrompt, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition encoder's output ``[1, L, D]`` and its mask for one structured prompt."""
        device = self._execution_device
        caption = self.tokenizer(prompt.caption_text(), truncation=True, max_length=CAPTION_MAX_TOKENS,
                                 return_tensors="pt")
        lyrics = self.tokenizer(prompt.lyrics_text(), truncation=True, max_length=LYRICS_MAX_TOKENS,
                                return_tensors="pt")
        text_hidden = self.text_encoder(input_ids=caption.input_ids.to(device)).last_hidden_state.to(dtype)
        lyric_hidden = self.text_encoder.get_input_embeddings()(lyrics.input_ids.to(device)).to(dtype)
        timbre = silence_latent(prompt.timbre_frames, device, dtype)
        return self.condition_encoder(
            text_hidden_states=text_hidden, text_attention_mask=caption.attention_mask.to(device).bool(),
            lyric_hidden_states=lyric_hidden, lyric_attention_mask=lyrics.attention_mask.to(device).bool(),
            refer_audio_acoustic_hidden_states_packed=timbre,
            refer_audio_order_mask=torch.zeros(1, device=device, dtype=torch.long),
        )

    def denoise(self, encoded: torch.Tensor, prompt: AceStepPrompt, steps: int, guidance_scale: float,
                generator: torch.Generator | None, on_step: Callable[[int], None]) -> torch.Tensor:
        """ai-toolkit's Euler loop for one item: the final latents ``[1, T, 64]``."""
        device, dtype = self._execution_device, self.transformer.dtype
        frames = prompt.latent_frames
        context = torch.cat([silence_latent(frames, device, dtype),
                             torch.ones(1, frames, self.transformer.config.audio_acoustic_hidden_dim, device=device,
                                        dtype=dtype)], dim=-1)
        cfg = guidance_scale > 1.0
        conditions = encoded
        if cfg:
            null = self.condition_encoder.null_condition_emb.to(device, dtype).expand_as(encoded)
            conditions, context = torch.cat([encoded, null]), context.repeat(2, 1, 1)
        latents = randn_tensor((1, frames, self.transformer.config.audio_acoustic_hidden_dim), generator=generator,
                               device=device, dtype=dtype)
        times = torch.tensor(flow_schedule(steps), device=device, dtype=dtype)
        for i in range(steps):
            t = times[i].item()
            t_next = times[i + 1].item() if i + 1 < steps else 0.0
            timestep = torch.full((conditions.shape[0],), t, device=device, dtype=dtype)
            velocity = self.transformer(
                hidden_states=latents.repeat(conditions.shape[0], 1, 1), timestep=timestep, timestep_r=timestep,
                encoder_hidden_states=conditions, context_latents=context, return_dict=False,
            )[0]
            if cfg:
                cond, uncond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = latents - velocity * (t - t_next)
            on_step(i)
        return latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: list[AceStepPrompt],
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
    ):
        """Sample one waveform per structured prompt (they share one duration).

        Args:
            prompt (list[AceStepPrompt]): one per item.
            num_inference_steps (int, defaults to 30), guidance_scale (float, defaults to 4): ai-toolkit's defaults.
            generator (torch.Generator or list, *optional*): one per item for a list.
            output_type (str, defaults to "np"): ``np`` or ``pt`` waveforms ``[B, channels, samples]``, or ``latent``
                (``[B, T, 64]``).
            callback_on_step_end (callable, *optional*): ``f(pipe, step, timestep, {})`` after every step of every
                item.
        """
        if len({p.duration for p in prompt}) != 1:
            raise ValueError("Every item of an ACE-Step batch must have the same duration.")
        generators = generator if isinstance(generator, list) else [generator] * len(prompt)
        dtype = self.transformer.dtype
        outputs = []

        def on_step(step):
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, None, {})

        for item, item_generator in zip(prompt, generators):
            encoded, _ = self.encode_structured(item, dtype)
            latents = self.denoise(encoded, item, num_inference_steps, guidance_scale, item_generator, on_step)
            if output_type == "latent":
                outputs.append(latents)
                continue
            audio = self.vae.decode(latents.transpose(1, 2).to(self.vae.dtype)).sample
            outputs.append(audio[:, :, : int(item.duration * self.sample_rate)].float())
        result = torch.cat(outputs)
        self.maybe_free_model_hooks()
        return result.cpu().numpy() if output_type == "np" else result


class AceStepFamilyPipeline(AITKPipeline):
    """``ace_step_15`` and ``ace_step_15_xl``: audio only (``GenerationResult.images`` is None)."""

    denoiser = "transformer"
    options_type = AceStepOptions

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        return AceStepAITKPipeline

    def lora_name_mapper(self):
        return ace_step_lora_to_diffusers

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        """A diffusers folder (``save_pretrained`` of this pipeline) loads as usual; otherwise the all-in-one ComfyUI
        file: the path itself, ``options.aio_file`` in a local folder, or in the hub repo ``source``."""
        if os.path.isdir(source) and os.path.isfile(os.path.join(source, "model_index.json")):
            return AceStepAITKPipeline.from_pretrained(source, dtype=torch_dtype, **overrides)
        if os.path.isfile(source):
            path = source
        elif os.path.isdir(source):
            path = os.path.join(source, spec.options.aio_file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{source!r} has no {spec.options.aio_file}; download it from "
                                        f"{spec.base} or give the file's path.")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, spec.options.aio_file)
        from transformers import AutoTokenizer

        return load_aio_pipeline(path, torch_dtype, AutoTokenizer.from_pretrained(spec.options.tokenizer))

    generation_options = GENERATION_OPTIONS  # also written as <TAGS> in the prompt

    def check_inputs(self, params: GenerationParams) -> None:
        super().check_inputs(params)
        self.structured_prompt(params)

    def structured_prompt(self, params: GenerationParams) -> AceStepPrompt:
        return parse_tagged_prompt(params.prompt, **params.extra)

    def pipeline_kwargs(self, params: GenerationParams) -> dict:
        return {"prompt": [self.structured_prompt(params)] * params.batch_size,
                "guidance_scale": params.guidance, "output_type": "np"}

    def postprocess(self, output, params: GenerationParams) -> dict:
        return {"images": None, "audio": output, "sample_rate": int(self.pipe.sample_rate)}


# ------------------------------------------------------------------------------------------------ the all-in-one file
DIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "vae."
TEXT_ENCODER_PREFIX = "text_encoders.qwen3_06b.transformer.model."
#: parts of the DiT file ai-toolkit skips (the audio-code tokenizer of the cover task)
UNUSED_DIT_PARTS = ("tokenizer.", "detokenizer.")
_ATTENTION_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0", "q_norm": "norm_q",
                    "k_norm": "norm_k"}
_ATTENTION = re.compile(r"\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)(?=\.|$)")


def _attention_to_diffusers(key: str) -> str:
    return _ATTENTION.sub(lambda m: f".{m.group(1)}.{_ATTENTION_NAMES[m.group(2)]}", key)


def ace_step_original_to_diffusers(key: str) -> str:
    """A DiT module name as ai-toolkit / ComfyUI write it (``decoder.layers.0.self_attn.q_proj``) -> diffusers'
    ``AceStepTransformer1DModel`` name (``layers.0.self_attn.to_q``); other names unchanged."""
    if not key.startswith("decoder."):
        return key
    key = _attention_to_diffusers(key[len("decoder."):])
    return key.replace("proj_in.1.", "proj_in_conv.").replace("proj_out.1.", "proj_out_conv.")


def ace_step_lora_to_diffusers(converted):
    """Rename an ACE-Step LoRA (or LoKr) from ai-toolkit's ComfyUI names (``decoder.layers.N.self_attn.q_proj``) onto
    ``AceStepTransformer1DModel``. Diffusers names pass through."""
    from ..lora.convert import rename_patches

    def rename(path: str, patch):
        # the generic parsing may already have dropped the DiT's "decoder." part
        target = ace_step_original_to_diffusers(path if path.startswith("decoder.") else f"decoder.{path}")
        return None if target == path else [(target, patch)]

    return rename_patches(converted, rename, "ACE-Step (ComfyUI)", "+ace_step_names")


def _layer_count(state_dict: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1


def _attention_sizes(state_dict: dict, prefix: str) -> dict:
    head_dim = state_dict[f"{prefix}self_attn.q_norm.weight"].shape[0]
    return {"num_attention_heads": state_dict[f"{prefix}self_attn.q_proj.weight"].shape[0] // head_dim,
            "num_key_value_heads": state_dict[f"{prefix}self_attn.k_proj.weight"].shape[0] // head_dim,
            "head_dim": head_dim, "intermediate_size": state_dict[f"{prefix}mlp.gate_proj.weight"].shape[0]}


_ENCODER_BLOCK = {0: "res_unit1", 1: "res_unit2", 2: "res_unit3", 3: "snake1", 4: "conv1"}
_DECODER_BLOCK = {0: "snake1", 1: "conv_t1", 2: "res_unit1", 3: "res_unit2", 4: "res_unit3"}
_RES_UNIT = {0: "snake1", 1: "conv1", 2: "snake2", 3: "conv2"}


def _vae_to_diffusers(key: str, blocks: int) -> str:
    """ai-toolkit's Oobleck VAE names (``encoder.layers.N...`` with weight-norm parametrizations) ->
    ``AutoencoderOobleck``'s (``encoder.block.N-1.res_unit1.conv1.weight_v``...)."""
    key = key.replace(".parametrizations.weight.original0", ".weight_g").replace(
        ".parametrizations.weight.original1", ".weight_v")
    side, _, index, rest = key.split(".", 3)
    index = int(index)
    outer = {0: "conv1", blocks + 1: "snake1", blocks + 2: "conv2"}
    if index in outer:
        return f"{side}.{outer[index]}.{rest}"
    _, part, rest = rest.split(".", 2)
    name = (_ENCODER_BLOCK if side == "encoder" else _DECODER_BLOCK)[int(part)]
    if name.startswith("res_unit"):
        _, unit, rest = rest.split(".", 2)
        name = f"{name}.{_RES_UNIT[int(unit)]}"
    return f"{side}.block.{index - 1}.{name}.{rest}"


def split_aio(state_dict: dict) -> dict:
    """Split an all-in-one ComfyUI ACE-Step 1.5 file (the prefixes ai-toolkit's ``load_models`` reads) into diffusers
    state dicts and configs: ``{"transformer" | "condition_encoder" | "vae" | "text_encoder": (config, state_dict)}``.
    Every size comes from the tensors' shapes (base and XL files alike)."""
    dit = {k[len(DIT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(DIT_PREFIX)}
    vae = {k[len(VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    text = {k[len(TEXT_ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(TEXT_ENCODER_PREFIX)}
    for name, part in (("DiT (model.diffusion_model.)", dit), ("VAE (vae.)", vae),
                       ("text encoder (text_encoders.qwen3_06b.)", text)):
        if not part:
            raise ValueError(f"Not an ACE-Step 1.5 all-in-one file: it has no {name} tensors.")
    dit = {k: v for k, v in dit.items() if not k.startswith(UNUSED_DIT_PARTS)}

    transformer_sd = {ace_step_original_to_diffusers(k): v for k, v in dit.items() if k.startswith("decoder.")}
    transformer_config = {
        **_attention_sizes(dit, "decoder.layers.0."), "hidden_size": dit["decoder.scale_shift_table"].shape[2],
        "num_hidden_layers": _layer_count(dit, "decoder.layers."),
        "in_channels": dit["decoder.proj_in.1.weight"].shape[1], "patch_size": dit["decoder.proj_in.1.weight"].shape[2],
        "audio_acoustic_hidden_dim": dit["decoder.proj_out.1.weight"].shape[1],
        "encoder_hidden_size": dit["decoder.condition_embedder.weight"].shape[1],
    }

    encoder_sd = {_attention_to_diffusers(k[len("encoder."):]): v for k, v in dit.items() if k.startswith("encoder.")}
    encoder_sd["null_condition_emb"] = dit["null_condition_emb"]
    lyric_layers = _layer_count(dit, "encoder.lyric_encoder.layers.")
    encoder_config = {
        **_attention_sizes(dit, "encoder.lyric_encoder.layers.0."),
        "hidden_size": dit["encoder.text_projector.weight"].shape[0],
        "text_hidden_dim": dit["encoder.text_projector.weight"].shape[1],
        "timbre_hidden_dim": dit["encoder.timbre_encoder.embed_tokens.weight"].shape[1],
        "num_lyric_encoder_hidden_layers": lyric_layers,
        "num_timbre_encoder_hidden_layers": _layer_count(dit, "encoder.timbre_encoder.layers."),
        # ai-toolkit's lyric and timbre encoders attend to every token
        "layer_types": ["full_attention"] * lyric_layers, "sliding_window": FULL_ATTENTION_WINDOW,
    }

    blocks = _layer_count(vae, "encoder.layers.") - 3
    channels = vae["encoder.layers.0.parametrizations.weight.original1"].shape[0]
    vae_sd = {}
    for key, value in vae.items():
        new = _vae_to_diffusers(key, blocks)
        vae_sd[new] = value.reshape(1, -1, 1) if new.endswith((".alpha", ".beta")) else value
    vae_config = {
        "encoder_hidden_size": channels,
        "channel_multiples": [vae[f"encoder.layers.{i}.layers.4.parametrizations.weight.original1"].shape[0] // channels
                              for i in range(1, blocks + 1)],
        "downsampling_ratios": [vae[f"encoder.layers.{i}.layers.4.parametrizations.weight.original1"].shape[2] // 2
                                for i in range(1, blocks + 1)],
        "decoder_channels": channels, "audio_channels": vae["encoder.layers.0.parametrizations.weight.original1"].shape[1],
        "decoder_input_channels": vae["decoder.layers.0.parametrizations.weight.original1"].shape[1],
        "sampling_rate": 48000,
    }

    text_config = {
        "vocab_size": text["embed_tokens.weight"].shape[0], "hidden_size": text["embed_tokens.weight"].shape[1],
        "num_hidden_layers": _layer_count(text, "layers."), "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
        # ai-toolkit builds its Qwen3 with Qwen3Config's default RoPE theta (10000), not the published model's 1e6
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    sizes = _attention_sizes(text, "layers.0.")
    text_config.update(sizes)
    return {"transformer": (transformer_config, transformer_sd), "condition_encoder": (encoder_config, encoder_sd),
            "vae": (vae_config, vae_sd), "text_encoder": (text_config, text)}


#: a sliding window longer than any sequence: diffusers' timbre encoder then attends to every frame, as ai-toolkit's
FULL_ATTENTION_WINDOW = 1 << 30


def _build(cls, config: dict, state_dict: dict, dtype, name: str):
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = cls(**config)
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if name == "condition encoder":
        missing = [k for k in missing if k != "silence_latent"]
    if missing or unexpected:
        raise ValueError(f"ACE-Step 1.5 {name}: the all-in-one file does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}).")
    if name == "VAE" and any(state_dict[k].shape != expected[k].shape for k in state_dict if k.startswith("encoder.")):
        # diffusers sizes the encoder's last conv by its width, ai-toolkit's by twice the latent channels: equal in
        # the published files (128), not in toy ones. Text to music never encodes audio.
        logger.warning("ACE-Step 1.5: the VAE encoder does not fit AutoencoderOobleck (width != 2 x latent "
                       "channels); it is left zeroed (text to music never encodes audio).")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
        state_dict.update({k: torch.zeros(v.shape) for k, v in expected.items() if k.startswith("encoder.")})
    module.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    for buffer_name, buffer in list(module.named_buffers()):
        if buffer.is_meta:  # the condition encoder's silence_latent: unused (ai-toolkit's fixed one is)
            module.register_buffer(buffer_name, torch.zeros(buffer.shape, dtype=dtype), persistent=True)
    return module.eval().requires_grad_(False)


def load_aio_pipeline(path: str, dtype, tokenizer) -> AceStepAITKPipeline:
    """:class:`AceStepAITKPipeline` over the components of an all-in-one ComfyUI file, with ``tokenizer`` (ai-toolkit
    loads ``Qwen/Qwen3-Embedding-0.6B``'s)."""
    from diffusers import AceStepConditionEncoder, AceStepTransformer1DModel, AutoencoderOobleck, \
        FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3Model

    parts = split_aio(load_file(path))
    with torch.device("meta"):
        text_encoder = Qwen3Model(Qwen3Config(**parts["text_encoder"][0]))
    text_encoder.load_state_dict({k: v.to(dtype) for k, v in parts["text_encoder"][1].items()}, strict=True,
                                 assign=True)
    text_encoder.rotary_emb = type(text_encoder.rotary_emb)(config=text_encoder.config)
    return AceStepAITKPipeline(
        vae=_build(AutoencoderOobleck, *parts["vae"], dtype, "VAE"),
        text_encoder=text_encoder.eval().requires_grad_(False), tokenizer=tokenizer,
        transformer=_build(AceStepTransformer1DModel, *parts["transformer"], dtype, "transformer"),
        condition_encoder=_build(AceStepConditionEncoder, *parts["condition_encoder"], dtype, "condition encoder"),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
    )
