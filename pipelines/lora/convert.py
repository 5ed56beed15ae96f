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

from ..registry import Experts

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
    ``w2``: delta = kron(w1, w2)) or ``"full"`` (``diff`` and optionally ``diff_b`` for the bias). ``rows``
    (``"lokr"`` only) keeps output rows ``start:stop`` of the Kronecker product: one part of a fused projection that
    a family splits (see :func:`split_patch_rows`).
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    rows: tuple[int, int] | None = None
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def factors(self, device) -> dict[str, torch.Tensor]:
        """The float32 tensors on ``device``. LoRA and LoKr factors (small) are kept there after the first use, so a
        strength change on the GPU copies nothing from the host; full ``.diff`` tensors (weight-sized) never are."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.kind == "full" or device.type == "cpu":
            return {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if device not in self._on_device:
            self._on_device.clear()
            self._on_device[device] = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        return self._on_device[device]

    def release_device_copies(self) -> None:
        self._on_device.clear()

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
            rows = w1.shape[0] * w2.shape[0] if self.rows is None else self.rows[1] - self.rows[0]
            return (rows, w1.shape[1] * w2.shape[1], *w2.shape[2:])
        return tuple(t["diff"].shape)

    def delta(self, device=None) -> torch.Tensor:
        """The full float32 weight delta on ``device`` (computed, never stored)."""
        t = self.factors(device)
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
            if self.rows is None:
                return torch.kron(w1, w2)
            # only the rows of w1 whose blocks overlap start:stop are expanded
            start, stop = self.rows
            block = w2.shape[0]
            first, last = start // block, (stop - 1) // block + 1
            return torch.kron(w1[first:last], w2)[start - first * block: stop - first * block]
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
    if rank is not None and alpha is not None and not math.isfinite(alpha):
        raise LoraFormatError(f"Module {module_key!r} has a non-finite alpha ({alpha}) on factored LoKr weights.")
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


def _non_finite(tensor: torch.Tensor) -> str | None:
    """``"NaN"``, ``"inf"`` or ``"NaN and inf"`` for a tensor holding such values; None when every value is finite."""
    if torch.isfinite(tensor).all():
        return None
    return " and ".join(name for name, found in (("NaN", torch.isnan), ("inf", torch.isinf)) if found(tensor).any())


def convert_ai_toolkit_lora(
    state_dict: Mapping[str, torch.Tensor],
    denoiser: str,
    module_names: Mapping[str, Iterable[str]],
    name_mapper: Callable[[ConvertedLora], ConvertedLora] | None = None,
    label: str = "The LoRA file",
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
        label (str, *optional*): the file's name, for error messages.

    Returns:
        ConvertedLora: float32 patches keyed by (component, module path). Module paths that could not be resolved
        start with ``?`` so that the applier can report them.

    Raises:
        LoraFormatError: for a layout it cannot read, or a weight tensor holding NaN or inf: merged into a model's
            weights such a value could never be subtracted again (``W + NaN - NaN`` is NaN).
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
        tensor = state_dict[key].to(torch.float32)
        problem = None if kind == "alpha" else _non_finite(tensor)
        if problem:
            tensor_name = key[len(module_key) + 1:].split(".")[0]
            raise LoraFormatError(
                f"{label}: {module_key}: {tensor_name} holds {problem}. The file is corrupt or the training diverged; "
                "use an earlier checkpoint."
            )
        grouped[module_key][param] = tensor
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


def guess_architecture(keys: Iterable[str]) -> str | None:
    """The family a LoRA's keys were written for (a registry ``LoraSignature`` label), or None. Of the signatures
    that match, one that another matching signature refines, directly or through others, gives way to it (SDXL over
    SD 1.5; Boogu-Image over OmniGen2 and Lumina2)."""
    from ..registry import lora_signatures

    keys = list(keys)
    matches = [s for s in lora_signatures() if any(re.search(s.pattern, k) for k in keys)]
    refined = set()
    for signature in matches:
        while signature.refines is not None:
            signature = signature.refines
            refined.add(signature)
    return next((s.label for s in matches if s not in refined), None)


# ------------------------------------------------------------------------------------------ Wan original names (Wan)
# ai-toolkit saves every Wan LoRA (2.1, 2.2 5B, 2.2 14B) in the original Wan module names (ai-toolkit.md §1.3):
# `diffusion_model.blocks.N.self_attn.q`, `cross_attn.k_img`, `ffn.0`... The generic parsing above has already
# stripped the `diffusion_model.` prefix; these two stages rename to diffusers' WanTransformer3DModel names and, for
# the two-expert Wan 2.2 14B, place each half on its expert.

WAN_BLOCK_RENAMES = {
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

# Outside the blocks (only in LoRAs trained with transformer_only: false). Both tables are public: the ComfyUI benchmark
# inverts them to give ComfyUI the original names.
WAN_TOP_RENAMES = {
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
        if block and block.group(2) in WAN_BLOCK_RENAMES:
            rest = block.group(1) + WAN_BLOCK_RENAMES[block.group(2)]
            renamed += 1
        elif rest in WAN_TOP_RENAMES:
            rest = WAN_TOP_RENAMES[rest]
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


def route_wan_experts(converted: ConvertedLora, side: str | None, experts: Experts) -> ConvertedLora:
    """Place a Wan 2.2 14B LoRA on its expert(s), the components the registry's ``experts`` names.

    A combined file (``transformer_1.``/``transformer_2.`` infixes, ai-toolkit's ``split_multistage_loras: false``)
    goes to both experts, or only to ``side``'s when one is given. A single-expert file (``*_high_noise`` /
    ``*_low_noise``) needs ``side``.

    Args:
        converted (ConvertedLora): the renamed LoRA (:func:`wan_original_to_diffusers`).
        side (str | None): one of ``Experts.SIDES`` (``"high"``, ``"low"``) or None.
        experts (Experts): the model's two experts.
    """
    if side is not None and side not in Experts.SIDES:
        raise ValueError(f"LoRA side {side!r} is not one of 'high' (high-noise expert) or 'low' (low-noise expert).")
    halves = {_split_wan_expert(path)[0] for component, path in converted.patches if component == experts.high}
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
        if component != experts.high:
            patches[(component, path)] = patch
            continue
        infix, rest = _split_wan_expert(path)
        expert = _WAN_EXPERT_INFIXES[infix] if infix else side
        if side is not None and expert != side:
            continue
        patches[(experts.component(expert), rest)] = patch
    if combined and side is not None:
        notes.append(f"combined file: only its {side}-noise half is applied for side {side!r}")
    if not patches:
        raise LoraFormatError(f"The combined LoRA has no {side}-noise (transformer_{1 if side == 'high' else 2}) keys.")
    return ConvertedLora(patches=patches, layout=converted.layout, notes=notes)


# ------------------------------------------------------------------ original BFL names (FLUX.2, FLUX.2-klein, Chroma)
# ai-toolkit trains FLUX.2 / klein / Chroma on BFL-layout models and saves their module names (ai-toolkit.md §1.3):
# `diffusion_model.double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`... The generic parsing above has already
# stripped the prefix; these stages rename onto diffusers' Flux2Transformer2DModel / ChromaTransformer2DModel.
# Where diffusers splits a fused BFL projection, the patch is split by output rows: a LoRA keeps its lora_A (down)
# and splits lora_B (up), so each module keeps the file's own rank and alpha; a LoKr splits its w1 when the rows
# line up with the Kronecker blocks, else each part keeps both factors and its row range (nothing is expanded until
# it is merged); a `.diff` splits its rows.
# Diffusers names pass through unchanged, so both spellings of a LoRA load the same way.

# A tuple of names is a fused projection: every part but the last takes ``in_features`` (hidden size) rows, the last
# part the rest (q, k, v: hidden rows each; Chroma's linear1: q, k, v, then the MLP input).
_QKV = ("to_q", "to_k", "to_v")
_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

_FLUX2_DOUBLE = {
    "img_attn.qkv": tuple(f"attn.{n}" for n in _QKV),
    "txt_attn.qkv": tuple(f"attn.{n}" for n in _ADDED_QKV),
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_FLUX2_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}  # diffusers keeps linear1 fused
_FLUX2_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
# BFL's final modulation outputs (shift, scale); diffusers' norm_out.linear (scale, shift): its rows are swapped.
_SWAPPED_HALVES = {"norm_out.linear"}

_CHROMA_DOUBLE = {
    **{k: v for k, v in _FLUX2_DOUBLE.items() if "mlp" not in k},
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
# Chroma's linear1 is q, k, v (hidden rows each) and the MLP input (the rest); diffusers has four Linears.
_CHROMA_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": "proj_out"}
_CHROMA_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
_CHROMA_APPROXIMATOR = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.(in_layer|out_layer)$")

_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def split_patch_rows(patch: ModulePatch, sizes: list[int]) -> list[ModulePatch]:
    """Split a patch by output rows into consecutive parts of ``sizes`` rows (they must add up to its rows)."""
    rows = patch.delta_shape()[0]
    if sum(sizes) != rows or min(sizes) <= 0:
        raise LoraFormatError(f"Cannot split a fused projection of {rows} output rows into parts of {sizes} rows.")
    t = patch.tensors
    if patch.kind == "lora":
        return [ModulePatch("lora", {"down": t["down"], "up": up}) for up in t["up"].split(sizes, dim=0)]
    if patch.kind == "lokr":
        block = t["w2"].shape[0]
        if patch.rows is None and all(size % block == 0 for size in sizes):
            # kron(w1, w2) stacks one block of w2's rows per row of w1: aligned parts are kron(w1 rows, w2)
            return [ModulePatch("lokr", {"w1": w1, "w2": t["w2"]})
                    for w1 in t["w1"].split([size // block for size in sizes], dim=0)]
        offset = 0 if patch.rows is None else patch.rows[0]
        bounds = [offset + sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return [ModulePatch("lokr", dict(t), rows=(start, stop)) for start, stop in zip(bounds, bounds[1:])]
    diffs = t["diff"].split(sizes, dim=0)
    biases = t["diff_b"].split(sizes, dim=0) if "diff_b" in t else [None] * len(sizes)
    return [ModulePatch("full", {"diff": d} if b is None else {"diff": d, "diff_b": b}) for d, b in zip(diffs, biases)]


def join_patch_rows(parts: list[ModulePatch]) -> ModulePatch:
    """Stack patches by output rows (the inverse of :func:`split_patch_rows`)."""
    kinds = {p.kind for p in parts}
    if kinds == {"lora"} and all(p.tensors["down"] is parts[0].tensors["down"] for p in parts):
        return ModulePatch("lora", {"down": parts[0].tensors["down"], "up": torch.cat([p.tensors["up"] for p in parts])})
    if kinds == {"lokr"} and all(p.rows is None and p.tensors["w2"] is parts[0].tensors["w2"] for p in parts):
        return ModulePatch("lokr", {"w1": torch.cat([p.tensors["w1"] for p in parts]), "w2": parts[0].tensors["w2"]})
    joined = {"diff": torch.cat([p.delta() for p in parts])}
    if any("diff_b" in p.tensors for p in parts):
        joined["diff_b"] = torch.cat([p.tensors.get("diff_b", torch.zeros(p.delta_shape()[0])) for p in parts])
    return ModulePatch("full", joined)


def _fused_sizes(patch: ModulePatch, parts: int) -> list[int]:
    rows, in_features = patch.delta_shape()[:2]
    return [in_features] * (parts - 1) + [rows - in_features * (parts - 1)]


def _rename_bfl(converted: ConvertedLora, double: dict, single: dict, top: dict, top_rule=None) -> ConvertedLora:
    patches: dict[tuple[str, str], ModulePatch] = {}
    renamed = split = 0

    def put(component: str, path: str, patch: ModulePatch) -> None:
        if (component, path) in patches:
            raise LoraFormatError(f"Module {path!r} of {component} appears twice in the LoRA file (BFL and diffusers names).")
        patches[(component, path)] = patch

    for (component, path), patch in converted.patches.items():
        block = _BFL_BLOCK.match(path)
        target = None
        if block:
            kind, index, rest = block.groups()
            table, parent = (double, "transformer_blocks") if kind == "double_blocks" else (single, "single_transformer_blocks")
            if rest in table:
                target = (f"{parent}.{index}.", table[rest])
        elif path in top:
            target = ("", top[path])
        elif top_rule is not None and (top_path := top_rule(path)) is not None:
            target = ("", top_path)
        if target is None:
            put(component, path, patch)
            continue
        parent, names = target
        renamed += 1
        if isinstance(names, str):
            if names in _SWAPPED_HALVES:
                rows = patch.delta_shape()[0]
                first, second = split_patch_rows(patch, [rows // 2, rows - rows // 2])
                patch = join_patch_rows([second, first])
            put(component, parent + names, patch)
            continue
        split += 1
        for name, part in zip(names, split_patch_rows(patch, _fused_sizes(patch, len(names)))):
            put(component, parent + name, part)
    notes = list(converted.notes)
    if renamed:
        notes.append(f"{renamed} module(s) renamed from original BFL names, {split} fused projection(s) split")
    return ConvertedLora(patches=patches, layout=converted.layout, notes=notes)


def convert_bfl_to_diffusers_flux2(converted: ConvertedLora) -> ConvertedLora:
    """Rename a FLUX.2 / FLUX.2-klein LoRA from original BFL names onto ``Flux2Transformer2DModel``.

    ``double_blocks.N.{img,txt}_attn.qkv`` is split onto ``to_q/to_k/to_v`` (``add_*_proj`` for text);
    ``single_blocks.N.linear1`` maps whole onto the fused ``attn.to_qkv_mlp_proj``; the final modulation's rows are
    swapped into diffusers' (scale, shift) order. Diffusers names pass through.
    """
    return _rename_bfl(converted, _FLUX2_DOUBLE, _FLUX2_SINGLE, _FLUX2_TOP)


def _chroma_approximator(path: str) -> str | None:
    match = _CHROMA_APPROXIMATOR.match(path)
    if match is None:
        return None
    return f"distilled_guidance_layer.layers.{match.group(1)}.{'linear_1' if match.group(2) == 'in_layer' else 'linear_2'}"


def convert_bfl_to_diffusers_chroma(converted: ConvertedLora) -> ConvertedLora:
    """Rename a Chroma LoRA from original BFL names onto ``ChromaTransformer2DModel``.

    Fused ``qkv`` is split onto ``to_q/to_k/to_v`` (``add_*_proj`` for text) and ``single_blocks.N.linear1`` onto
    ``attn.to_q/to_k/to_v`` plus ``proj_mlp``; ``linear2`` is ``proj_out``. Diffusers names pass through.
    """
    return _rename_bfl(converted, _CHROMA_DOUBLE, _CHROMA_SINGLE, _CHROMA_TOP, top_rule=_chroma_approximator)


# ------------------------------------------------------------------------- original LTX names (LTX-2, LTX-2.3)
# ai-toolkit saves LTX-2 LoRAs in the original Lightricks names (ai-toolkit.md §1.3: `transformer.` -> `diffusion_model.`,
# then its convert_lora_diffusers_to_original). Inside `transformer_blocks` the original names are diffusers' own
# (attn1, audio_attn2, audio_to_video_attn, ff.net.0.proj...); only top-level modules differ. The generic parsing
# above has already stripped the prefix. Diffusers names pass through, so both spellings load the same way.
_LTX2_TOP_RENAMES = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    # LTX-2.3. ai-toolkit's renaming is a chain of str.replace calls, so `audio_prompt_adaln` is saved as
    # `audio_prompt_adaln_single_single` (both of its inverse rules apply); its own loader undoes that the same way.
    "prompt_adaln_single": "prompt_adaln",
    "audio_prompt_adaln_single": "audio_prompt_adaln",
    "audio_prompt_adaln_single_single": "audio_prompt_adaln",
}


def rename_patches(converted: ConvertedLora, rename, names: str, layout_tag: str = "") -> ConvertedLora:
    """Move every patch of ``converted`` to the module(s) ``rename(path, patch)`` gives: ``None`` keeps it where it is
    (diffusers names pass through), else a list of ``(path, patch)`` (several for a fused projection split by rows).
    A module reached twice (original and diffusers names for the same module) is refused; the renamed count becomes
    a note ("renamed from original ``names`` names") and, when any was renamed, ``layout_tag`` is appended to the
    layout."""
    patches: dict[tuple[str, str], ModulePatch] = {}
    renamed = 0
    for (component, path), patch in converted.patches.items():
        targets = rename(path, patch)
        if targets is None:
            targets = [(path, patch)]
        else:
            renamed += 1
        for target, part in targets:
            if (component, target) in patches:
                raise LoraFormatError(
                    f"Module {target!r} of {component} appears twice in the LoRA file ({names} and diffusers names).")
            patches[(component, target)] = part
    notes = list(converted.notes)
    if renamed:
        notes.append(f"{renamed} module(s) renamed from original {names} names")
    return ConvertedLora(patches=patches, layout=converted.layout + (layout_tag if renamed else ""), notes=notes)


def ltx2_original_to_diffusers(converted: ConvertedLora) -> ConvertedLora:
    """Rename an LTX-2 / LTX-2.3 LoRA from original LTX names onto ``LTX2VideoTransformer3DModel``.

    ``patchify_proj`` -> ``proj_in``, ``adaln_single`` -> ``time_embed``, ``av_ca_*_adaln_single`` ->
    ``av_cross_attn_*`` and (2.3) ``prompt_adaln_single`` -> ``prompt_adaln``, with their ``audio_`` twins; block
    modules keep their names. Diffusers names pass through.
    """
    def rename(path: str, patch: ModulePatch):
        head, dot, rest = path.partition(".")
        return [(_LTX2_TOP_RENAMES[head] + dot + rest, patch)] if head in _LTX2_TOP_RENAMES else None

    return rename_patches(converted, rename, "LTX", "+ltx_names")


# Original Krea 2 module names (ai-toolkit's SingleStreamDiT) -> Krea2Transformer2DModel. Within a block or a
# text-fusion block, the attention projections and the SwiGLU take diffusers' names; a few top-level modules move.
_KREA2_BLOCK = re.compile(r"^(blocks|txtfusion\.layerwise_blocks|txtfusion\.refiner_blocks)\.(\d+)\.(attn|mlp)\.(\w+)$")
_KREA2_BLOCK_LISTS = {"blocks": "transformer_blocks", "txtfusion.layerwise_blocks": "text_fusion.layerwise_blocks",
                      "txtfusion.refiner_blocks": "text_fusion.refiner_blocks"}
_KREA2_ATTENTION = {"wq": "to_q", "wk": "to_k", "wv": "to_v", "wo": "to_out.0", "gate": "to_gate"}
_KREA2_TOP_RENAMES = {
    "first": "img_in",
    "tmlp.0": "time_embed.linear_1",
    "tmlp.2": "time_embed.linear_2",
    "tproj.1": "time_mod_proj",
    "txtmlp.1": "txt_in.linear_1",
    "txtmlp.3": "txt_in.linear_2",
    "txtfusion.projector": "text_fusion.projector",
    "last.linear": "final_layer.linear",
}


def _krea2_path(path: str) -> str | None:
    block = _KREA2_BLOCK.match(path)
    if block:
        blocks, index, part, name = block.groups()
        if part == "attn" and name in _KREA2_ATTENTION:
            return f"{_KREA2_BLOCK_LISTS[blocks]}.{index}.attn.{_KREA2_ATTENTION[name]}"
        if part == "mlp" and name in ("gate", "up", "down"):
            return f"{_KREA2_BLOCK_LISTS[blocks]}.{index}.ff.{name}"
        return None
    return _KREA2_TOP_RENAMES.get(path)


def krea2_original_to_diffusers(converted: ConvertedLora) -> ConvertedLora:
    """Rename a Krea 2 LoRA (or LoKr) from original Krea names (``blocks.N.attn.wq``, ``txtfusion...``, ``first``,
    ``tmlp.0``...), as ai-toolkit saves it, onto ``Krea2Transformer2DModel``. Diffusers names pass through."""
    def rename(path: str, patch: ModulePatch):
        target = _krea2_path(path)
        return None if target is None else [(target, patch)]

    return rename_patches(converted, rename, "Krea 2", "+krea2_names")
