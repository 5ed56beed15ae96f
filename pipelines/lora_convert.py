"""Turn every LoRA layout ai-toolkit writes into one canonical form: per-module patches on diffusers module names.

Pure functions on ``dict[str, Tensor]``: no model access and no file I/O. The caller passes the model's module names
where a layout needs them (kohya names replace every ``.`` of the diffusers path with ``_``, which only the list of
real module names can undo).

Layouts (see ``ai-toolkit.md`` §1):

* PEFT: ``<prefix>.<module>.lora_A.weight`` / ``.lora_B.weight`` (also ``.lora_A.default.weight``), prefix
  ``transformer.``, ``diffusion_model.``, ``unet.``, ``text_encoder(_2).`` or ``base_model.model.``; scale 1 unless the
  file carries ``.alpha`` keys.
* kohya: ``lora_unet_*`` / ``lora_transformer_*`` / ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*`` with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; scale alpha/rank per module, missing alpha = rank.
  ``lora_down``/``lora_up`` under dotted PEFT-style names follow the same alpha rule.
* LoKr: ``.lokr_w1`` / ``.lokr_w2`` (or the factored ``_a``/``_b`` pairs) and ``.alpha``; full-rank factors have
  scale 1 whatever the stored alpha (ai-toolkit stores 1e10 or inf there), factored ones alpha/rank.
* full layers: ``.diff`` / ``.diff_b``, added as they are.

Alpha is folded into the patch tensors here, once, so everything downstream applies ``W + strength * delta``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

# Suffix -> (kind, parameter). Longest suffixes first so that ".lora_A.default.weight" wins over ".weight" forms.
_SUFFIXES: list[tuple[str, str, str]] = [
    (".lora_A.default.weight", "lora", "down"),
    (".lora_B.default.weight", "lora", "up"),
    (".lora_A.weight", "lora", "down"),
    (".lora_B.weight", "lora", "up"),
    (".lora_down.weight", "lora_kohya", "down"),
    (".lora_up.weight", "lora_kohya", "up"),
    (".lokr_w1_a", "lokr", "w1_a"),
    (".lokr_w1_b", "lokr", "w1_b"),
    (".lokr_w2_a", "lokr", "w2_a"),
    (".lokr_w2_b", "lokr", "w2_b"),
    (".lokr_w1", "lokr", "w1"),
    (".lokr_w2", "lokr", "w2"),
    (".lokr_t2", "lokr", "t2"),
    (".diff_b", "full", "diff_b"),
    (".diff", "full", "diff"),
    (".alpha", "alpha", "alpha"),
]

_UNSUPPORTED = {
    ".hada_w1_a": "LoHa (LyCORIS hada_*) is not written by ai-toolkit's LoRA network and is not supported",
    ".dora_scale": "DoRA cannot be loaded as a plain LoRA; export it from ai-toolkit as type 'lora' or 'lokr'",
    ".magnitude": "DoRA cannot be loaded as a plain LoRA; export it from ai-toolkit as type 'lora' or 'lokr'",
    ".lora_up.bias": "LoRA up-projection biases (LoRM) are not supported",
}

_DOTTED_PREFIXES = {
    "transformer.": None,  # None = the model's denoiser component
    "diffusion_model.": None,
    "unet.": "unet",
    "base_model.model.": None,
    "text_encoder_2.": "text_encoder_2",
    "text_encoder.": "text_encoder",
}

_KOHYA_PREFIXES = {
    "lora_unet_": None,
    "lora_transformer_": None,
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}


class LoraFormatError(ValueError):
    """A LoRA file whose layout we cannot read, or that does not fit the model it is applied to."""


@dataclass
class ModulePatch:
    """One module's change, alpha already folded in: the module's weight becomes ``W + strength * delta``.

    ``kind`` is ``"lora"`` (tensors ``down`` (r, in[, kh, kw]) and ``up`` (out, r[, 1, 1])), ``"lokr"`` (``w1``,
    ``w2``: delta = kron(w1, w2)) or ``"full"`` (``diff`` and optionally ``diff_b`` for the bias).
    """

    kind: str
    tensors: dict[str, torch.Tensor]

    @property
    def rank(self) -> int | None:
        return int(self.tensors["down"].shape[0]) if self.kind == "lora" else None

    def delta_shape(self) -> tuple[int, ...]:
        t = self.tensors
        if self.kind == "lora":
            down, up = t["down"], t["up"]
            return (up.shape[0], down.shape[1], *down.shape[2:])
        if self.kind == "lokr":
            w1, w2 = t["w1"], t["w2"]
            return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
        return tuple(t["diff"].shape)

    def delta(self, device=None) -> torch.Tensor:
        """The full float32 weight delta on ``device`` (computed, never stored)."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            down, up = t["down"], t["up"]
            if down.dim() == 2:
                return up @ down
            if down.shape[-2:] == (1, 1):
                return (up.flatten(1) @ down.flatten(1))[:, :, None, None]
            return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        if self.kind == "lokr":
            w1, w2 = t["w1"], t["w2"]
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            return torch.kron(w1, w2)
        return t["diff"]


@dataclass
class ConvertedLora:
    """The canonical form: ``patches[(component, module_path)]`` plus what we learned while converting."""

    patches: dict[tuple[str, str], ModulePatch]
    layout: str
    notes: list[str] = field(default_factory=list)

    def components(self) -> set[str]:
        return {c for c, _ in self.patches}


def _split_suffix(key: str) -> tuple[str, str, str] | None:
    for suffix, kind, param in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind, param
    return None


def _check_unsupported(keys: Iterable[str]) -> None:
    for key in keys:
        for marker, why in _UNSUPPORTED.items():
            if marker in key:
                raise LoraFormatError(f"{why} (found key {key!r}).")


def _resolve_module(
    module_key: str, denoiser: str, kohya_lookup: Mapping[str, Mapping[str, str]]
) -> tuple[str, str] | None:
    """Map a file's module key to (component, diffusers module path); None when it cannot be placed."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if module_key.startswith(prefix):
            component = component or denoiser
            flat = module_key[len(prefix):]
            path = kohya_lookup.get(component, {}).get(flat)
            return (component, path) if path is not None else (component, "?" + flat)
    for prefix, component in _DOTTED_PREFIXES.items():
        if module_key.startswith(prefix):
            return component or denoiser, module_key[len(prefix):]
    return denoiser, module_key


def _lokr_patch(params: dict[str, torch.Tensor], alpha: float | None, module_key: str) -> ModulePatch:
    if "t2" in params:
        raise LoraFormatError(f"LoKr with a Tucker core (lokr_t2) is not supported (module {module_key!r}).")
    rank = None
    w1 = params.get("w1")
    if w1 is None:
        w1 = params["w1_a"] @ params["w1_b"]
        rank = params["w1_b"].shape[0]
    w2 = params.get("w2")
    if w2 is None:
        w2_a, w2_b = params["w2_a"], params["w2_b"]
        rank = w2_b.shape[0]
        w2 = (w2_a @ w2_b.flatten(1)).reshape(w2_a.shape[0], *w2_b.shape[1:])
    # Full factors: LyCORIS (and so ai-toolkit) forces alpha = rank, i.e. scale 1, whatever alpha the file stores.
    scale = 1.0 if rank is None else (alpha if alpha else rank) / rank
    return ModulePatch("lokr", {"w1": w1 * scale, "w2": w2})


def _lora_patch(params: dict[str, torch.Tensor], alpha: float | None, module_key: str) -> ModulePatch:
    if "down" not in params or "up" not in params:
        missing = "down (lora_A/lora_down)" if "down" not in params else "up (lora_B/lora_up)"
        raise LoraFormatError(f"Module {module_key!r} has no {missing} weight: the LoRA file is incomplete.")
    down, up = params["down"], params["up"]
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoraFormatError(
            f"Module {module_key!r}: lora_down/A has rank {rank} but lora_up/B expects {up.shape[1]}; the file is corrupt."
        )
    scale = (alpha if alpha else rank) / rank if alpha is not None else 1.0
    return ModulePatch("lora", {"down": down, "up": up * scale if scale != 1.0 else up})


def convert_ai_toolkit_lora(
    state_dict: Mapping[str, torch.Tensor],
    denoiser: str,
    module_names: Mapping[str, Iterable[str]],
    name_mapper: Callable[[ConvertedLora], ConvertedLora] | None = None,
) -> ConvertedLora:
    """Convert any ai-toolkit LoRA state dict into :class:`ConvertedLora`.

    Args:
        state_dict (Mapping[str, Tensor]): the file's tensors.
        denoiser (str): the component that prefix-less, ``transformer.`` and ``diffusion_model.`` keys target
            (``"transformer"`` or ``"unet"``).
        module_names (Mapping[str, Iterable[str]]): per component, the names of its Linear/Conv modules; needed to undo
            kohya's ``_``-flattened names.
        name_mapper (callable, *optional*): a family's renaming stage (original BFL / Wan / LTX names to diffusers),
            applied after the generic parsing.

    Returns:
        ConvertedLora: float32 patches keyed by (component, module path). Module paths that could not be resolved
        start with ``?`` so that the applier can report them.
    """
    keys = list(state_dict)
    if not keys:
        raise LoraFormatError("The LoRA file holds no tensors.")
    _check_unsupported(keys)

    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    kinds: dict[str, set[str]] = defaultdict(set)
    unknown = []
    for key in keys:
        parsed = _split_suffix(key)
        if parsed is None:
            unknown.append(key)
            continue
        module_key, kind, param = parsed
        grouped[module_key][param] = state_dict[key].to(torch.float32)
        if kind != "alpha":
            kinds[module_key].add(kind)
    if unknown:
        raise LoraFormatError(
            f"{len(unknown)} key(s) are not LoRA, LoKr or full-layer (.diff) tensors, e.g. {unknown[:3]}. "
            "Is this a LoRA trained with ai-toolkit (or a full checkpoint given as a LoRA)?"
        )

    kohya_lookup = {c: {n.replace(".", "_"): n for n in names} for c, names in module_names.items()}
    patches: dict[tuple[str, str], ModulePatch] = {}
    layouts = set()
    for module_key, params in grouped.items():
        module_kinds = kinds.get(module_key, set())
        if not module_kinds:
            raise LoraFormatError(f"Module {module_key!r} has an alpha but no weights: the LoRA file is incomplete.")
        alpha_t = params.pop("alpha", None)
        alpha = None if alpha_t is None else float(alpha_t.reshape(-1)[0])
        if alpha is not None and not math.isfinite(alpha) and "lokr" not in module_kinds:
            raise LoraFormatError(f"Module {module_key!r} has a non-finite alpha ({alpha}).")
        target = _resolve_module(module_key, denoiser, kohya_lookup)
        if "lokr" in module_kinds:
            patch = _lokr_patch(params, alpha, module_key)
            layouts.add("lokr")
        elif "full" in module_kinds:
            patch = ModulePatch("full", {k: v for k, v in params.items() if k in ("diff", "diff_b")})
            if "diff" not in patch.tensors:
                raise LoraFormatError(f"Module {module_key!r} has a .diff_b but no .diff weight.")
            layouts.add("full")
        else:
            kohya_style = "lora_kohya" in module_kinds
            layouts.add("kohya" if module_key.startswith("lora_") else ("peft+down/up" if kohya_style else "peft"))
            patch = _lora_patch(params, alpha, module_key)
        if target in patches:
            raise LoraFormatError(f"Module {target[1]!r} of {target[0]} appears twice in the LoRA file.")
        patches[target] = patch

    converted = ConvertedLora(patches=patches, layout="+".join(sorted(layouts)))
    return name_mapper(converted) if name_mapper else converted


# Key signatures of the architectures ai-toolkit trains, to name what a mismatched LoRA was made for.
_ARCH_SIGNATURES: list[tuple[str, str]] = [
    (r"(^|[._])transformer_[12]\.blocks\.\d+\.", "Wan 2.2 14B (combined high/low-noise file)"),
    (r"(^|\.)blocks\.\d+\.(self_attn|cross_attn)\.", "Wan 2.1/2.2 (original Wan names)"),
    (r"(^|\.)blocks\.\d+\.attn1\.", "Wan (diffusers names)"),
    (r"audio_attn|audio_ff|video_to_audio", "LTX-2"),
    (r"(^|\.)double_blocks\.\d+\.img_attn|(^|\.)single_blocks\.\d+\.linear1", "FLUX.2 / FLUX.2-klein / Chroma (original BFL names)"),
    (r"single_transformer_blocks\.\d+\.", "FLUX.1 / Flex / Kontext (diffusers names)"),
    (r"transformer_blocks\.\d+\.img_mlp|transformer_blocks\.\d+\.txt_mlp", "Qwen-Image"),
    (r"layers\.\d+\.attention\.to_q|layers\.\d+\.feed_forward\.w1", "Z-Image"),
    (r"layers\.\d+\.attn\.to_q|context_refiner", "Lumina2"),
    (r"double_stream_blocks|single_stream_blocks", "HiDream"),
    (r"lora_te2_|lora_unet_.*add_embedding|lora_unet_down_blocks_2_attentions", "SDXL (kohya)"),
    (r"lora_unet_|lora_te_", "SD 1.5 (kohya)"),
]


def guess_architecture(keys: Iterable[str]) -> str | None:
    """Best guess of the model family a LoRA's keys were written for, or None."""
    keys = list(keys)
    for pattern, arch in _ARCH_SIGNATURES:
        rx = re.compile(pattern)
        if any(rx.search(k) for k in keys):
            return arch
    return None

# ------------------------------------------------------------------------------------------ Wan original names (Wan)
# ai-toolkit saves every Wan LoRA (2.1, 2.2 5B, 2.2 14B) in the original Wan module names (ai-toolkit.md §1.3):
# `diffusion_model.blocks.N.self_attn.q`, `cross_attn.k_img`, `ffn.0`... The generic parsing above has already
# stripped the `diffusion_model.` prefix; these two stages rename to diffusers' WanTransformer3DModel names and, for
# the two-expert Wan 2.2 14B, place each half on its expert.

_WAN_BLOCK_RENAMES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}

# Outside the blocks (only in LoRAs trained with transformer_only: false).
_WAN_TOP_RENAMES = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "head.head": "proj_out",
}

_WAN_BLOCK = re.compile(r"^(blocks\.\d+\.)(.+)$")
_WAN_EXPERT_INFIXES = {"transformer_1.": "high", "transformer_2.": "low"}
_WAN_IMAGE_ATTENTION = re.compile(r"\.attn2\.add_[kv]_proj$")


def _split_wan_expert(path: str) -> tuple[str, str]:
    for infix in _WAN_EXPERT_INFIXES:
        if path.startswith(infix):
            return infix, path[len(infix):]
    return "", path


def wan_original_to_diffusers(converted: ConvertedLora, image_attention: bool = True) -> ConvertedLora:
    """Rename original Wan module names to diffusers' ``WanTransformer3DModel`` names (diffusers names pass through).

    Args:
        converted (ConvertedLora): the generic conversion of a Wan LoRA.
        image_attention (bool, defaults to True): whether the target transformer has Wan 2.1 I2V's image
            cross-attention (``attn2.add_k_proj``/``add_v_proj``); when False, a LoRA with those keys is an error.

    Returns:
        ConvertedLora: the same patches on diffusers paths; a ``transformer_1.``/``transformer_2.`` expert infix
        is kept for :func:`route_wan_experts`.
    """
    patches: dict[tuple[str, str], ModulePatch] = {}
    renamed = 0
    for (component, path), patch in converted.patches.items():
        infix, rest = _split_wan_expert(path)
        block = _WAN_BLOCK.match(rest)
        if block and block.group(2) in _WAN_BLOCK_RENAMES:
            rest = block.group(1) + _WAN_BLOCK_RENAMES[block.group(2)]
            renamed += 1
        elif rest in _WAN_TOP_RENAMES:
            rest = _WAN_TOP_RENAMES[rest]
            renamed += 1
        patches[(component, infix + rest)] = patch
    if not image_attention:
        image_keys = sorted(p for _, p in patches if _WAN_IMAGE_ATTENTION.search(p))
        if image_keys:
            raise LoraFormatError(
                f"This LoRA patches the image cross-attention of Wan 2.1 image-to-video (cross_attn.k_img/v_img, "
                f"{len(image_keys)} modules, e.g. {image_keys[0]!r}), which this text-to-video model does not have: it "
                "was trained on Wan 2.1 I2V. Use it with wan21_i2v_14b / wan21_i2v_14b480p."
            )
    layout = converted.layout + ("+wan_names" if renamed else "")
    return ConvertedLora(patches=patches, layout=layout, notes=list(converted.notes))


def route_wan_experts(
    converted: ConvertedLora, side: str | None, high: str = "transformer", low: str = "transformer_2"
) -> ConvertedLora:
    """Place a Wan 2.2 14B LoRA on its expert(s): ``high`` = the high-noise transformer, ``low`` = the low-noise one.

    A combined file (``transformer_1.``/``transformer_2.`` infixes, ai-toolkit's ``split_multistage_loras: false``)
    goes to both experts, or only to ``side``'s when one is given. A single-expert file (``*_high_noise`` /
    ``*_low_noise``) needs ``side``.

    Args:
        converted (ConvertedLora): the renamed LoRA (:func:`wan_original_to_diffusers`).
        side (str | None): ``"high"``, ``"low"`` or None.
        high, low (str): the pipeline component names of the two experts.
    """
    if side not in (None, "high", "low"):
        raise ValueError(f"LoRA side {side!r} is not one of 'high' (high-noise expert) or 'low' (low-noise expert).")
    components = {"high": high, "low": low}
    halves = {_split_wan_expert(path)[0] for component, path in converted.patches if component == high}
    combined = bool(halves - {""})
    if combined and "" in halves:
        raise LoraFormatError("The LoRA mixes keys with and without a transformer_1./transformer_2. expert infix.")
    if not combined and side is None:
        raise ValueError(
            "Wan 2.2 14B has two experts: say which one this LoRA is for with side 'high' or 'low' (files named "
            "*_high_noise / *_low_noise are recognised by name), or give a combined file with transformer_1/"
            "transformer_2 keys."
        )
    patches: dict[tuple[str, str], ModulePatch] = {}
    notes = list(converted.notes)
    for (component, path), patch in converted.patches.items():
        if component != high:
            patches[(component, path)] = patch
            continue
        infix, rest = _split_wan_expert(path)
        expert = _WAN_EXPERT_INFIXES[infix] if infix else side
        if side is not None and expert != side:
            continue
        patches[(components[expert], rest)] = patch
    if combined and side is not None:
        notes.append(f"combined file: only its {side}-noise half is applied for side {side!r}")
    if not patches:
        raise LoraFormatError(f"The combined LoRA has no {side}-noise (transformer_{1 if side == 'high' else 2}) keys.")
    return ConvertedLora(patches=patches, layout=converted.layout, notes=notes)

