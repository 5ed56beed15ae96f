"""Text encoders and VAEs as the single ``.safetensors`` files ComfyUI users keep in ``models/text_encoders`` (the
older ``models/clip``) and ``models/vae``: ``clip_l``, ``t5xxl_fp16`` / ``t5xxl_fp8_e4m3fn(_scaled)``, ``clip_g``,
``umt5_xxl_fp16`` / ``umt5_xxl_fp8_e4m3fn_scaled``, ``qwen_2.5_vl_7b(_fp8_scaled)``, FLUX's ``ae``, an SD/SDXL VAE,
``wan_2.1_vae``, ``qwen_image_vae``.

Which components a family can take from such files, and the layout each expects, is data on the family class
(``AITKPipeline.component_files``: component -> :class:`ComponentFileLayout`). A file is recognised by its weight
names (:data:`FILE_KINDS`), checked against the component the user gave it for, converted to the names of the
component's class (configured by the components folder, so a file of another size fails) and loaded with every weight
accounted for: a file of another kind or size, with weights missing or left over, or that cannot be read, stops the
load with one error naming the file, what it holds and what the model expects.

The published layouts: text encoders in transformers' own names (``clip_g`` also in open_clip's; Qwen2.5-VL in its
original ``model.``/``visual.`` names, which transformers 5 nests under ``model.language_model.``/``model.visual.``),
VAEs in their reference code's names (the LDM names of BFL's ``ae.safetensors`` and the SD VAEs, Wan's original names
for ``wan_2.1_vae`` and ``qwen_image_vae``, an architecture Qwen-Image shares), or a VAE in diffusers' own names. FP8
files are upcast (scaled FP8 dequantized) to the load dtype as the denoiser's are.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

#: the components a file can replace (option ``<component>_file``), in the order the front ends list them -> the
#: ComfyUI folders such files lie in (``clip`` is the older name of ``text_encoders``) and what goes there, for help
FILE_COMPONENTS = {
    "text_encoder": (("text_encoders", "clip"), "FLUX.1, SD, SDXL: clip_l; Wan: umt5_xxl; Qwen-Image: qwen_2.5_vl_7b"),
    "text_encoder_2": (("text_encoders", "clip"), "FLUX.1: t5xxl (fp16, fp8_e4m3fn, fp8_e4m3fn_scaled); SDXL: clip_g"),
    "vae": (("vae",), "FLUX.1: ae; SD, SDXL: their VAE; Wan 2.1 / 2.2 A14B: wan_2.1_vae; Qwen-Image: qwen_image_vae"),
}


# ------------------------------------------------------------------------------------------------------ converting
def convert_ldm_vae(state_dict: dict, config: dict) -> dict:
    """An LDM-named VAE (BFL's ae, the SD VAEs) -> ``AutoencoderKL`` names, by diffusers' own conversion."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state_dict, config)


def convert_clip(state_dict: dict, config) -> dict:
    """A CLIP text encoder in transformers' names; files of ComfyUI's older CLIPSave keep the projection as a
    transposed ``text_projection`` tensor."""
    if "text_projection" in state_dict:
        state_dict = dict(state_dict)
        state_dict["text_projection.weight"] = state_dict.pop("text_projection").T.contiguous()
    return state_dict


def convert_open_clip(state_dict: dict, config) -> dict:
    """An OpenCLIP text tower in open_clip's names (``transformer.resblocks``...) -> transformers' CLIP names, by
    diffusers' own conversion (it reads the width from the projection, else from the config)."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    return convert_open_clip_checkpoint(SimpleNamespace(config=config), state_dict, prefix="")


#: Wan's residual block (``residual`` is a Sequential: norm, act, conv, norm, act, dropout, conv) -> diffusers' names
WAN_RESIDUAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
                "shortcut.": "conv_shortcut."}
WAN_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
           "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
           "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
           "decoder.head.2.": "decoder.conv_out."}
#: the middle Sequential: resnet, attention, resnet
WAN_MIDDLE = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}
_WAN_KEY = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples|middle)\.(\d+)\.(.+)$")


def _wan_residual(rest: str) -> str:
    for original, ours in WAN_RESIDUAL.items():
        if rest.startswith(original):
            return ours + rest[len(original):]
    return rest


def convert_wan_vae(state_dict: dict, config: dict) -> dict:
    """A VAE in Wan 2.1's original names (``wan_2.1_vae``, ``qwen_image_vae``) -> ``AutoencoderKLWan`` /
    ``AutoencoderKLQwenImage`` names, sized by ``config``: the encoder's flat ``downsamples`` keep their indices; the
    decoder's flat ``upsamples`` hold, per level, ``num_res_blocks + 1`` residual blocks and (but the last level) an
    upsampler, which diffusers nests as ``up_blocks.<level>.resnets`` / ``.upsamplers.0``. (Diffusers' own converter
    assumes the released model's block count.)"""
    per_level = config["num_res_blocks"] + 1
    levels = len(config["dim_mult"])
    up_slots = []
    for level in range(levels):
        up_slots += [(level, f"resnets.{j}.") for j in range(per_level)]
        if level < levels - 1:
            up_slots.append((level, "upsamplers.0."))
    converted = {}
    for key, value in state_dict.items():
        match = _WAN_KEY.match(key)
        if match is None:
            top = next((k for k in WAN_TOP if key.startswith(k)), None)
            converted[WAN_TOP[top] + key[len(top):] if top else key] = value
            continue
        side, part, index, rest = match.groups()
        if part == "middle":
            target = WAN_MIDDLE.get(index, f"middle.{index}.")
            rest = _wan_residual(rest) if target.startswith("mid_block.resnets") else rest
            converted[f"{side}.{target}{rest}"] = value
        elif part == "downsamples":
            converted[f"{side}.down_blocks.{index}.{_wan_residual(rest)}"] = value
        elif int(index) < len(up_slots):
            level, slot = up_slots[int(index)]
            rest = _wan_residual(rest) if slot.startswith("resnets") else rest
            converted[f"{side}.up_blocks.{level}.{slot}{rest}"] = value
        else:
            converted[key] = value  # no such block in this config: reported as unexpected
    return converted


@dataclass(frozen=True)
class FileKind:
    """A family of file layouts: how a file of it is recognised, and how its names become the model class's.

    Args:
        name (str): what such a file holds, as messages say it.
        marker (str): a weight name every such file has, after the prefix some files put before all of them.
        size (tuple): (weight name, axis, what that axis is) telling the file's size in messages.
        renames (tuple): (regex, replacement) pairs from the file's names to the model class's.
        fills (dict): weights the model has and the files leave out -> the weight whose tensor they share.
        extras (tuple): regexes of weights the published files carry and the model class has none of.
        optional_prefix (str, *optional*): a prefix of the file's names that some model classes leave out of theirs
            (transformers 5's ``CLIPTextModel`` has no ``text_model.``, ``CLIPTextModelWithProjection`` has it).
        converter (callable, *optional*): maps the names when renames do not suffice (``(state_dict, config of
            the model class) -> state_dict``).
    """

    name: str
    marker: str
    size: tuple[str, int, str]
    renames: tuple[tuple[str, str], ...] = ()
    fills: dict = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    optional_prefix: str | None = None
    converter: Callable[[dict, dict], dict] | None = None

    def describe(self, state_dict: dict) -> str:
        key, axis, what = self.size
        value = state_dict.get(key)
        return f"{self.name} ({what} {value.shape[axis]})" if value is not None and value.ndim > axis else self.name


CLIP = FileKind("a CLIP text encoder", "text_model.encoder.layers.0.self_attn.q_proj.weight",
                ("text_model.final_layer_norm.weight", 0, "width"),
                # ComfyUI's CLIP-L files keep the projection and logit scale of the full CLIP model
                extras=(r"text_projection\.weight", r"logit_scale", r"(text_model\.)?embeddings\.position_ids"),
                optional_prefix="text_model.", converter=convert_clip)
OPEN_CLIP = FileKind("an OpenCLIP text encoder (open_clip layout)", "transformer.resblocks.0.attn.in_proj_weight",
                     ("ln_final.weight", 0, "width"), optional_prefix="text_model.", converter=convert_open_clip)
T5 = FileKind("a T5 encoder", "encoder.block.0.layer.0.SelfAttention.q.weight", ("shared.weight", 1, "width"),
              fills={"encoder.embed_tokens.weight": "shared.weight"},
              # ComfyUI's UMT5 files may carry their SentencePiece tokenizer; the tokenizer comes from the components
              extras=(r"spiece_model",))
QWEN25_VL = FileKind("a Qwen2.5-VL language model", "model.layers.0.self_attn.k_proj.bias",
                     ("model.embed_tokens.weight", 1, "width"),
                     renames=((r"^model\.", "model.language_model."), (r"^visual\.", "model.visual.")),
                     # ComfyUI's files have no LM head: the pipelines read hidden states, never the logits, so the
                     # head shares the token embedding instead of being drawn at random
                     fills={"lm_head.weight": "model.language_model.embed_tokens.weight"})
LDM_VAE = FileKind("an SD/FLUX VAE (LDM layout)", "decoder.mid.block_1.conv1.weight",
                   ("decoder.conv_in.weight", 1, "latent channels"), converter=convert_ldm_vae)
WAN_VAE = FileKind("a Wan 2.1 VAE (Wan layout)", "decoder.middle.0.residual.0.gamma",
                   ("conv2.weight", 0, "latent channels"), converter=convert_wan_vae)
#: a VAE saved by diffusers (ComfyUI's VAE loader takes these too): its names are already the model class's
DIFFUSERS_VAE = FileKind("a VAE in diffusers' names", "decoder.mid_block.resnets.0.conv1.weight",
                         ("decoder.conv_in.weight", 1, "latent channels"))
#: recognised only to say what a file given in the wrong place holds
DENOISERS = tuple(FileKind("a diffusion model (a base_file, not a component)", marker, ("", 0, ""))
                  for marker in ("double_blocks.0.img_attn.qkv.weight", "blocks.0.self_attn.q.weight",
                                 "transformer_blocks.0.attn.to_q.weight", "input_blocks.0.0.weight"))
FILE_KINDS = (CLIP, OPEN_CLIP, T5, QWEN25_VL, LDM_VAE, WAN_VAE, DIFFUSERS_VAE, *DENOISERS)


@dataclass(frozen=True)
class ComponentFileLayout:
    """What a family's component takes from a file: the kind of file published for it (``kind``, as ComfyUI users
    know it: ``examples`` in ``models/<folder>``), and the other kinds it also reads (``also``)."""

    label: str
    kind: FileKind
    folder: str
    examples: tuple[str, ...]
    also: tuple[FileKind, ...] = ()

    def expected(self) -> str:
        return (f"{self.label} ({self.kind.name}, e.g. {' or '.join(self.examples)} from ComfyUI's "
                f"models/{self.folder})")


CLIP_L = ComponentFileLayout("CLIP-L", CLIP, "text_encoders", ("clip_l.safetensors",))
SD_CLIP = ComponentFileLayout("CLIP-L (SD 2.x: OpenCLIP-H)", CLIP, "text_encoders", ("clip_l.safetensors",))
CLIP_G = ComponentFileLayout("CLIP-G", CLIP, "text_encoders", ("clip_g.safetensors",), also=(OPEN_CLIP,))
T5_XXL = ComponentFileLayout("T5-XXL", T5, "text_encoders", ("t5xxl_fp16.safetensors",
                                                             "t5xxl_fp8_e4m3fn_scaled.safetensors"))
UMT5_XXL = ComponentFileLayout("UMT5-XXL", T5, "text_encoders", ("umt5_xxl_fp16.safetensors",
                                                                 "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
QWEN25_VL_7B = ComponentFileLayout("Qwen2.5-VL 7B", QWEN25_VL, "text_encoders",
                                   ("qwen_2.5_vl_7b.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors"))
FLUX_VAE = ComponentFileLayout("the FLUX.1 VAE", LDM_VAE, "vae", ("ae.safetensors",), also=(DIFFUSERS_VAE,))
SD_VAE = ComponentFileLayout("an SD 1.5/SDXL VAE", LDM_VAE, "vae",
                             ("sdxl_vae.safetensors", "vae-ft-mse-840000-ema-pruned.safetensors"),
                             also=(DIFFUSERS_VAE,))
WAN21_VAE = ComponentFileLayout("the Wan 2.1 VAE", WAN_VAE, "vae", ("wan_2.1_vae.safetensors",), also=(DIFFUSERS_VAE,))
QWEN_IMAGE_VAE = ComponentFileLayout("the Qwen-Image VAE", WAN_VAE, "vae", ("qwen_image_vae.safetensors",),
                                     also=(DIFFUSERS_VAE,))


# ------------------------------------------------------------------------------------------------------ recognising
def recognise(keys) -> tuple[FileKind, str] | None:
    """(the kind, the prefix before every name) of a file with weight names ``keys``, or None."""
    keys = list(keys)
    for kind in FILE_KINDS:
        for key in keys:
            prefix = key[: -len(kind.marker)]
            if key.endswith(kind.marker) and (not prefix or prefix.endswith(".")):
                return kind, prefix
    return None


def read_file(path: str, what: str) -> dict:
    """Every tensor of the safetensors file ``path``; a ValueError naming ``what`` when it cannot be read."""
    from safetensors import SafetensorError

    from .single_file import read_safetensors

    try:
        return read_safetensors(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{what} cannot be read as a .safetensors file (truncated, or another format?): {e}") from None


def check_component_files(family_cls, spec, files: dict[str, str]) -> None:
    """A ValueError when ``spec``'s pipeline takes one of ``files``' components from no file."""
    from .single_file import pipeline_components

    if not files:
        return
    present = pipeline_components(family_cls.diffusers_pipeline_class(spec))
    layouts = {c: layout for c, layout in family_cls.component_files.items() if c in present}
    for component in files:
        if component not in layouts:
            takes = ", ".join(f"{c} ({layout.label})" for c, layout in layouts.items())
            raise ValueError(f"{spec.model_id} does not take a {component} file"
                             + (f"; it takes {takes}." if takes else "; give that component in base (a diffusers "
                                                                     "folder or repo)."))


# --------------------------------------------------------------------------------------------------------- loading
def _state_dict_for(layout: ComponentFileLayout, state_dict: dict, dtype, what: str,
                    expected: str) -> tuple[dict, FileKind, str]:
    """(the file's weights as ``dtype`` under the names of its kind (prefix stripped, renamed, FP8 dequantized), its
    kind, what it holds); a ValueError when it is not a kind ``layout`` takes."""
    from .single_file import dequantize_scaled_fp8

    found = recognise(state_dict)
    if found is None:
        raise ValueError(f"{what} holds no text encoder or VAE layout known here (its first weights: "
                         f"{sorted(state_dict)[:3]}); expected {expected}.")
    kind, prefix = found
    if kind not in (layout.kind, *layout.also):
        raise ValueError(f"{what} holds {kind.describe(_strip(state_dict, prefix))}; expected {expected}.")
    outside = [k for k in state_dict if not k.startswith(prefix)]
    if outside:
        raise ValueError(f"{what} holds more than {kind.name}: {len(outside)} weight(s) outside its prefix "
                         f"{prefix!r}, e.g. {outside[:3]}; expected {expected} alone.")
    state_dict = dequantize_scaled_fp8(_strip(state_dict, prefix), dtype)
    for key, value in state_dict.items():  # in place: each original is freed once cast
        if value.is_floating_point() and value.dtype != dtype:
            state_dict[key] = value.to(dtype)
    holds = kind.describe(state_dict)
    for pattern, replacement in kind.renames:
        state_dict = {re.sub(pattern, replacement, k): v for k, v in state_dict.items()}
    return state_dict, kind, holds


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)} if prefix else state_dict


def check_weights(expected: dict, state_dict: dict, what: str, holds: str, wanted: str) -> None:
    """A ValueError naming the first weights missing, left over or of another shape (``expected``: name -> tensor
    of the model, e.g. on the meta device)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} holds {holds} whose weights do not match {wanted}: {len(missing)} missing (e.g. "
                         f"{missing[:3]}), {len(unexpected)} left over (e.g. {unexpected[:3]}). Is it a file of "
                         "this model?")
    resized = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
               if tuple(state_dict[k].shape) != tuple(v.shape)]
    if resized:
        name, got, want = resized[0]
        raise ValueError(f"{what} holds {holds}, which does not fit {wanted}: {len(resized)} weight(s) of another "
                         f"shape, e.g. {name} {list(got)} where the model has {list(want)}. Is it a file of another "
                         "model or size?")


def load_component_file(spec, component: str, layout: ComponentFileLayout, path: str, folder: str, model_cls,
                        dtype):
    """``component`` of ``spec``'s pipeline (class ``model_cls``, configured by ``folder/component``) with every
    weight from the file ``path``."""
    from accelerate import init_empty_weights

    what = f"{spec.model_id} {component} file {path!r}"
    expected_text = f"{spec.model_id}'s {component}: {layout.expected()}"
    state_dict, kind, holds = _state_dict_for(layout, read_file(path, what), dtype, what, expected_text)
    config_dir = os.path.join(folder, component)
    transformers_model = not hasattr(model_cls, "load_config")
    if transformers_model:
        config = model_cls.config_class.from_pretrained(config_dir)
        with init_empty_weights():
            skeleton = model_cls._from_config(config)
    else:
        config = model_cls.load_config(config_dir)
        with init_empty_weights():
            skeleton = model_cls.from_config(config)
    expected = skeleton.state_dict()
    if kind.converter:
        state_dict = kind.converter(state_dict, config)
    prefix = kind.optional_prefix
    if prefix and not any(k.startswith(prefix) for k in expected):
        state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    for target, source in kind.fills.items():
        if target in expected and target not in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]
    state_dict = {k: v for k, v in state_dict.items()
                  if k in expected or not any(re.fullmatch(p, k) for p in kind.extras)}
    check_weights(expected, state_dict, what, holds, f"{spec.model_id}'s {component} ({model_cls.__name__} "
                  f"configured by {config_dir!r}, {layout.label})")
    if transformers_model:
        # transformers' own loader: its tied weights, kept-in-fp32 modules and attention choice, as from a folder
        model = model_cls.from_pretrained(None, config=config, state_dict=state_dict, torch_dtype=dtype)
    else:
        skeleton.load_state_dict(state_dict, strict=True, assign=True)
        model = skeleton.to(dtype)  # its float buffers, as from_pretrained(torch_dtype=) has them
    if any(t.is_meta for t in model.state_dict().values()):
        raise ValueError(f"{what}: some weights of {model_cls.__name__} were left unset.")
    return model.eval().requires_grad_(False)
