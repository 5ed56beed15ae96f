"""Reading LoRA files and applying a stack of them to a loaded pipeline, without ever reloading the base model.

Two application modes, chosen per pipeline:

* ``dynamic``: LoRA factors are injected as PEFT adapters (``peft.inject_adapter_in_model``); the LoRA branch runs in
  float32 next to the base layer, as ai-toolkit's live sampling does. A strength change sets PEFT's scale in place.
  Removing the last adapter removes the PEFT layers, which restores the original modules bit for bit.
* ``fused``: every patch is merged into the weights as ``W = cast(W_fp32 + strength * delta_fp32)``, ai-toolkit's own
  ``merge_in`` math. A strength change adds ``(new - old) * delta`` in place; removal subtracts it (exact up to one
  rounding of the weight dtype per change).

LoKr and full-layer (``.diff``) patches have no PEFT adapter type for ai-toolkit's layout, so they are always merged
(in both modes) with the same arithmetic.

Quantized (FP8) weights cannot take an in-place merge. In fused mode each one has a host master copy (see
``pipelines.runtime.quantize``); once a change is complete, every quantized layer it touched is rebuilt as
``quantize(master + sum(strength * delta))`` over the LoRAs then active, in place.

Every request is checked against the model (:meth:`LoraStack.check`: strength, file, conversion, module match) before
anything is touched, and a failure part-way through puts back the previous LoRA set, so a cached pipeline is never
left half-patched. Finite LoRA tensors can still overflow once multiplied out and merged (fp16 weights, absurd
magnitudes), so every merge of a change that could overflow is first replayed on a scratch copy of its weight, one
layer at a time, and a change that would leave a NaN or inf weight is refused before any weight is written. A merge
whose factors bound its growth far below the range of a bfloat16/float32 weight cannot overflow and is not replayed.

A family may name *pass sides* (Ideogram 4's ``"uncond"``): a LoRA requested on such a side is held as a PEFT adapter in
both modes and stays switched off except inside :meth:`LoraStack.pass_side`, which the family's sampling loop wraps
around the one denoiser pass it belongs to (ai-toolkit's unconditional LoRA, active only in the CFG negative pass).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import check_strength
from .convert import ConvertedLora, LoraFormatError, ModulePatch, convert_ai_toolkit_lora, guess_architecture
from ..registry import LORA_MODES
from ..runtime.quantize import is_quantized, master_weight, rebuild_device, requantize_

logger = logging.getLogger(__name__)

#: converted LoRA files kept per pipeline (host memory) so that switching back and forth re-reads nothing
MAX_CONVERTED_CACHED = 8


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA to apply.

    Args:
        path (str, *optional*): a ``.safetensors`` file. Either ``path`` or ``state_dict`` is given.
        strength (float, defaults to 1.0): ai-toolkit's ``network_multiplier``, within ``pipelines.lora.STRENGTH_RANGE``.
        side (str, *optional*): ``"high"`` or ``"low"`` for two-expert (MoE) models; None elsewhere.
        state_dict (Mapping[str, Tensor], *optional*): the LoRA tensors themselves, instead of a file.
        name (str, *optional*): a label for logs and reports; defaults to the file name.
    """

    path: str | None = None
    strength: float = 1.0
    side: str | None = None
    state_dict: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, hash=False, repr=False)
    name: str | None = None

    def label(self) -> str:
        return self.name or (os.path.basename(self.path) if self.path else "<tensors>")


def as_lora_request(item) -> LoraRequest:
    """A :class:`LoraRequest` from a request, a path, or a ``(path, strength[, side])`` tuple."""
    if isinstance(item, LoraRequest):
        return item
    if isinstance(item, (str, os.PathLike)):
        return LoraRequest(path=os.fspath(item))
    path, strength, *rest = item
    return LoraRequest(path=os.fspath(path), strength=strength, side=rest[0] if rest else None)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a LoRA ``.safetensors`` file (tensors on CPU) and its metadata, with errors that say what to fix."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path!r}. Give the path of a .safetensors file.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LoraFormatError(
            f"{path!r} is not a readable .safetensors LoRA file ({e}). The file may be truncated (an interrupted "
            "download) or in another format (.ckpt/.pt/HTML page): download or export it again as .safetensors."
        ) from e
    return tensors, metadata


def file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _tensor_identity(state_dict: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for k in sorted(state_dict):
        t = state_dict[k]
        h.update(k.encode())
        h.update(str((tuple(t.shape), t.dtype, t.data_ptr(), t._version)).encode())
    return "tensors|" + h.hexdigest()


def patchable_module_names(component: torch.nn.Module) -> list[str]:
    """Names of the Linear/Conv2d modules of a component (PEFT wrappers report their wrapped module's name)."""
    names = []
    for name, module in component.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            if name.endswith(".base_layer"):
                name = name[: -len(".base_layer")]
            elif ".lora_" in name:
                continue
            names.append(name)
    return names


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _add_patch_(merged: torch.Tensor, patch: ModulePatch, coefficient: float) -> None:
    """``merged += coefficient * delta`` for a float32 weight on its device: ai-toolkit's merge_in math, one fused
    addmm for a linear LoRA (``W_fp32 + c * up @ down``), the full delta otherwise (LoKr, conv, ``.diff``)."""
    if patch.kind == "lora" and merged.dim() == 2:
        factors = patch.factors(merged.device)
        merged.addmm_(factors["up"], factors["down"], alpha=coefficient)
    else:
        merged.add_(coefficient * patch.delta(merged.device))


# bfloat16 and float32 reach 3.4e38: a weight that moves by less than this cannot overflow (see _cannot_overflow)
SAFE_MERGE_GROWTH = 1e30


def _cannot_overflow(weight: torch.Tensor, merges) -> bool:
    """True when LoRA merges provably keep a bfloat16/float32 weight finite, so the replay can be skipped:
    ``|W + c * up @ down| <= |W| + |c| * rank * max|up| * max|down|``, a bound that costs a pass over the small factors
    instead of one over the weight. float16 weights, LoKr, full and bias patches always get the replay."""
    if weight.dtype not in (torch.bfloat16, torch.float32) or is_quantized(weight):
        return False
    growth = 0.0
    for patch, coefficient, _ in merges:
        if patch.kind != "lora" or "diff_b" in patch.tensors:
            return False
        up, down = patch.tensors["up"], patch.tensors["down"]
        growth += abs(coefficient) * down.shape[0] * float(up.abs().max()) * float(down.abs().max())
    return growth <= SAFE_MERGE_GROWTH


@dataclass
class LoadedLora:
    """A converted LoRA bound to one pipeline's module layout."""

    key: str
    label: str
    converted: ConvertedLora

    @property
    def patches(self) -> dict[tuple[str, str], ModulePatch]:
        return self.converted.patches

    def summary(self) -> dict:
        kinds = Counter(p.kind for p in self.patches.values())
        return {"name": self.label, "layout": self.converted.layout, "modules": len(self.patches),
                "components": sorted(self.converted.components()), "kinds": dict(kinds)}


@dataclass(frozen=True)
class CheckedLora:
    """A request checked against one stack's model, nothing applied yet: ``request`` as checked (a family may have
    filled in its side), its ``strength`` in range, and its file converted and matched (``loaded``)."""

    request: LoraRequest
    strength: float
    loaded: LoadedLora

    @property
    def slot(self) -> tuple[str, str | None]:
        return (self.loaded.key, self.request.side)

    def summary(self) -> dict:
        return {**self.loaded.summary(), "strength": self.strength}


@dataclass
class _Active:
    loaded: LoadedLora
    strength: float
    adapter: str


class LoraStack:
    """The LoRA set applied to one pipeline's components.

    Args:
        components (Mapping[str, nn.Module]): the modules LoRAs may patch, by pipeline component name.
        mode (str): ``"dynamic"`` or ``"fused"`` (see the module docstring).
        denoiser (str): the component that ``transformer.``/``diffusion_model.`` keys target.
        model_label (str): the model id, for error messages.
        name_mapper (callable, *optional*): the family's key renaming stage (see ``lora.convert``).
        route (callable, *optional*): ``route(converted, side) -> converted`` for MoE families; without it a ``side``
            is an error.
        pass_sides (tuple[str, ...], *optional*): sides whose LoRAs act only inside :meth:`pass_side` (see the module
            docstring); ``route`` must accept them.
    """

    def __init__(
        self,
        components: Mapping[str, torch.nn.Module],
        mode: str,
        denoiser: str,
        model_label: str,
        name_mapper: Callable[[ConvertedLora], ConvertedLora] | None = None,
        route: Callable[[ConvertedLora, str | None], ConvertedLora] | None = None,
        pass_sides: tuple[str, ...] = (),
    ):
        if mode not in LORA_MODES:
            raise ValueError(f"LoRA mode {mode!r} is not one of 'dynamic', 'fused'.")
        self.components = dict(components)
        self.mode = mode
        self.denoiser = denoiser
        self.model_label = model_label
        self.name_mapper = name_mapper
        self.route = route
        self.pass_sides = frozenset(pass_sides)
        self._passes_on: set[str] = set()
        self.active: "OrderedDict[tuple[str, str | None], _Active]" = OrderedDict()
        self._loaded_cache: "OrderedDict[tuple[str, str | None], LoadedLora]" = OrderedDict()
        self._module_names = {c: patchable_module_names(m) for c, m in self.components.items()}
        self._stale_quantized: set[tuple[str, str]] = set()
        self.stats = Counter()

    # ------------------------------------------------------------------ reading and validation
    def check(self, request: LoraRequest) -> CheckedLora:
        """Check one request against the model without touching any weight: its strength, then its file (read,
        converted, routed and matched; cached by file identity, so applying it later re-reads nothing)."""
        strength = check_strength(request.strength, request.label())
        return CheckedLora(request=request, strength=strength, loaded=self._load(request))

    def _load(self, request: LoraRequest) -> LoadedLora:
        """Read, convert, route and validate one LoRA (cached by file identity); touches no weights."""
        if request.state_dict is not None:
            key = _tensor_identity(request.state_dict)
        elif request.path:
            key = file_identity(request.path) if os.path.isfile(request.path) else request.path
        else:
            raise ValueError("A LoRA request needs a `path` or a `state_dict`.")
        cache_key = (key, request.side)
        if cache_key in self._loaded_cache:
            self._loaded_cache.move_to_end(cache_key)
            return self._loaded_cache[cache_key]
        tensors = dict(request.state_dict) if request.state_dict is not None else read_lora_file(request.path)[0]
        converted = convert_ai_toolkit_lora(tensors, self.denoiser, self._module_names, self.name_mapper,
                                            label=request.label())
        if self.route is not None:
            converted = self.route(converted, request.side)
        elif request.side is not None:
            raise ValueError(
                f"{request.label()}: model {self.model_label!r} has a single transformer, so `side`/`transformer` "
                f"({request.side!r}) does not apply. Leave it empty (high/low files are for Wan 2.2 14B)."
            )
        loaded = LoadedLora(key=key, label=request.label(), converted=converted)
        if request.side in self.pass_sides:
            kinds = sorted({p.kind for p in converted.patches.values()} - {"lora"})
            if kinds:
                raise LoraFormatError(
                    f"{request.label()}: a LoRA for the {request.side!r} pass must be a plain LoRA, this file has "
                    f"{', '.join(kinds)} patches, which would be merged into weights that every pass uses. Apply it "
                    "without a side, or export it as type 'lora'."
                )
        self._validate(loaded, list(tensors), request.side)
        self._loaded_cache[cache_key] = loaded
        active = {(a.loaded.key, slot[1]) for slot, a in self.active.items()}
        while len(self._loaded_cache) > MAX_CONVERTED_CACHED:
            stale = next((k for k in self._loaded_cache if k not in active and k != cache_key), None)
            if stale is None:
                break
            del self._loaded_cache[stale]
        self.stats["files_converted"] += 1
        return loaded

    def _validate(self, loaded: LoadedLora, raw_keys: list[str], side: str | None = None) -> None:
        unmatched, mismatched, quantized = [], [], []
        for (component, path), patch in loaded.patches.items():
            module = self._find_module(component, path)
            if module is None:
                unmatched.append(f"{component}.{path.lstrip('?')}")
                continue
            weight = _base_layer(module).weight
            if tuple(weight.shape) != patch.delta_shape():
                mismatched.append(f"{component}.{path}: LoRA {patch.delta_shape()} vs model {tuple(weight.shape)}")
            elif is_quantized(weight) and not self._uses_peft(patch, side) and master_weight(_base_layer(module)) is None:
                quantized.append(f"{component}.{path} ({patch.kind})")
        if quantized:
            raise LoraFormatError(
                f"{loaded.label}: {len(quantized)} of its patches would have to be merged into FP8 weights (e.g. "
                f"{quantized[:2]}), which rounds them away; only plain LoRA patches run next to FP8 layers as "
                "adapters. Load the model with lora_mode='fused' (FP8 weights re-quantized from a bf16 copy) or "
                "without quantize='fp8' to use this file."
            )
        if unmatched or mismatched:
            guess = guess_architecture(raw_keys)
            looks = f" Its keys look like a LoRA for {guess}." if guess else ""
            if len(unmatched) == len(loaded.patches):
                raise LoraFormatError(
                    f"{loaded.label}: none of its {len(loaded.patches)} modules exist in model {self.model_label!r} "
                    f"(e.g. {unmatched[:3]}).{looks} Load it with the model it was trained on."
                )
            if unmatched:
                raise LoraFormatError(
                    f"{loaded.label}: {len(unmatched)} of {len(loaded.patches)} modules do not exist in model "
                    f"{self.model_label!r} (e.g. {unmatched[:3]}).{looks} The LoRA was trained on a different variant."
                )
            raise LoraFormatError(
                f"{loaded.label}: {len(mismatched)} module shapes do not match model {self.model_label!r} "
                f"(e.g. {mismatched[:2]}).{looks} The LoRA was trained on a model of another size."
            )

    def _find_module(self, component: str, path: str) -> torch.nn.Module | None:
        if path.startswith("?") or component not in self.components:
            return None
        try:
            module = self.components[component].get_submodule(path)
        except AttributeError:
            return None
        base = _base_layer(module)
        return module if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)) else None

    # ------------------------------------------------------------------ the public operation
    def set(self, requests: Sequence[LoraRequest], before_change: Callable[[], object] | None = None) -> list[dict]:
        """Check every request (:meth:`check`), then make them the applied set (:meth:`set_checked`)."""
        return self.set_checked([self.check(request) for request in requests], before_change)

    def set_checked(self, checked: Sequence[CheckedLora], before_change: Callable[[], object] | None = None) -> list[dict]:
        """Make ``checked`` the applied LoRA set; unchanged entries are kept, strength-only changes rescale in place.

        Args:
            checked (Sequence[CheckedLora]): the wanted set, in order, each from this stack's :meth:`check`.
            before_change (callable, *optional*): called once, only when weights will really change; what it returns
                is used as a context manager around the change (the pipeline uses it to take sequential-offload hooks
                off the weights while they are patched).

        Returns one summary dict per request (modules matched, layout, strength).
        """
        wanted: "OrderedDict[tuple[str, str | None], tuple[LoadedLora, float]]" = OrderedDict()
        for item in checked:
            if item.slot in wanted:
                raise ValueError(f"{item.request.label()} is given twice for the same side; give it once with one strength.")
            wanted[item.slot] = (item.loaded, item.strength)
        summaries = [item.summary() for item in checked]
        unchanged = list(wanted) == list(self.active) and all(
            self.active[slot].strength == strength for slot, (_, strength) in wanted.items())
        if unchanged:
            return summaries
        if before_change is None:
            self._apply(wanted)
        else:
            with before_change():
                self._apply(wanted)
        return summaries

    def _apply(self, wanted) -> None:
        self._check_merges_finite(wanted)
        previous = [(slot, a.loaded, a.strength) for slot, a in self.active.items()]
        try:
            self._transition(wanted)
        except BaseException:
            logger.error("Applying the LoRA set failed; restoring the previous set.")
            self._restore(previous)
            raise

    def _merge_plan(self, wanted) -> dict[tuple[str, str], list]:
        """Per weight, the merges ``_transition(wanted)`` makes, in its order: ``[(patch, coefficient, label)]``."""
        plan: dict[tuple[str, str], list] = {}

        def add(loaded: LoadedLora, coefficient: float, side: str | None) -> None:
            for key, patch in loaded.patches.items():
                if coefficient != 0.0 and not self._uses_peft(patch, side):
                    plan.setdefault(key, []).append((patch, coefficient, loaded.label))

        for slot, entry in self.active.items():
            if slot not in wanted:
                add(entry.loaded, -entry.strength, slot[1])
        for slot, (loaded, strength) in wanted.items():
            add(loaded, strength - (self.active[slot].strength if slot in self.active else 0.0), slot[1])
        return plan

    @torch.no_grad()
    def _check_merges_finite(self, wanted) -> None:
        """Replay the merges of ``_transition(wanted)`` on a scratch copy of each weight (the same arithmetic as
        :meth:`_merge`) and raise a ValueError, before any weight is written, if one would become NaN or inf."""
        for (component, path), merges in self._merge_plan(wanted).items():
            base = _base_layer(self.components[component].get_submodule(path))
            if _cannot_overflow(base.weight, merges):
                continue
            weight = None if is_quantized(base.weight) else base.weight.to(torch.float32, copy=True)
            bias = None if base.bias is None else base.bias.detach()
            for patch, coefficient, label in merges:
                if weight is not None:
                    _add_patch_(weight, patch, coefficient)
                    weight = weight.to(base.weight.dtype).float()
                    finite = bool(torch.isfinite(weight).all())
                else:
                    finite = True
                diff_b = patch.tensors.get("diff_b")
                if bias is not None and diff_b is not None:
                    bias = (bias.float() + coefficient * diff_b.to(bias.device, torch.float32)).to(base.bias.dtype)
                    finite = finite and bool(torch.isfinite(bias).all())
                if not finite:
                    raise ValueError(
                        f"{label}: merging it into {component}.{path} (coefficient {coefficient:g}) would make "
                        f"{self.model_label}'s {base.weight.dtype} weights NaN or inf, so the change was refused and "
                        "no weight was changed. The LoRA's values are far too large (a training run that diverged?): "
                        "use an earlier checkpoint or a lower strength.")

    def clear(self) -> None:
        self.set([])

    def _transition(self, wanted) -> None:
        for slot in [s for s in self.active if s not in wanted]:
            self._remove(slot)
        for slot, (loaded, strength) in wanted.items():
            if slot in self.active:
                if self.active[slot].strength != strength:
                    self._rescale(slot, strength)
            else:
                self._add(slot, loaded, strength)
        # Keep the requested order (it decides nothing numerically, but reports follow it).
        self.active = OrderedDict((s, self.active[s]) for s in wanted)
        self._requantize_stale()

    def _restore(self, previous) -> None:
        try:
            self._transition(OrderedDict((slot, (loaded, strength)) for slot, loaded, strength in previous))
        except Exception:  # pragma: no cover - a second failure leaves the stack empty rather than inconsistent
            logger.exception("Could not restore the previous LoRA set; removing all LoRAs.")
            for slot in list(self.active):
                self._remove(slot)

    # ------------------------------------------------------------------ mechanics
    def _uses_peft(self, patch: ModulePatch, side: str | None = None) -> bool:
        return patch.kind == "lora" and (self.mode == "dynamic" or side in self.pass_sides)

    def _free_adapter_name(self) -> str:
        """The lowest ``aitk_N`` no applied LoRA holds. A LoRA that replaces another takes over its name: a compiled
        denoiser's guards name the adapters, so a new name per LoRA would compile new graphs at every switch until
        Dynamo's recompile limit, which a ``fullgraph`` compile turns into an error."""
        taken = {entry.adapter for entry in self.active.values()}
        return next(name for name in (f"aitk_{n}" for n in itertools.count(1)) if name not in taken)

    def _add(self, slot, loaded: LoadedLora, strength: float) -> None:
        adapter = self._free_adapter_name()
        entry = _Active(loaded, strength, adapter)
        self.active[slot] = entry
        peft_patches: dict[str, dict[str, ModulePatch]] = {}
        for (component, path), patch in loaded.patches.items():
            if self._uses_peft(patch, slot[1]):
                peft_patches.setdefault(component, {})[path] = patch
            else:
                self._merge(component, path, patch, strength)
        for component, patches in peft_patches.items():
            self._inject(component, adapter, patches, strength)
        self.stats["adds"] += 1

    def _rescale(self, slot, strength: float) -> None:
        entry = self.active[slot]
        for (component, path), patch in entry.loaded.patches.items():
            if self._uses_peft(patch, slot[1]):
                self._peft_layer(component, path).set_scale(entry.adapter, strength)
            else:
                self._merge(component, path, patch, strength - entry.strength)
        entry.strength = strength
        self.stats["rescales"] += 1

    def _remove(self, slot) -> None:
        entry = self.active.pop(slot)
        touched = set()
        for (component, path), patch in entry.loaded.patches.items():
            if self._uses_peft(patch, slot[1]):
                layer = self._peft_layer(component, path)
                if entry.adapter in layer.lora_A:
                    layer.delete_adapter(entry.adapter)
                touched.add(component)
            else:
                self._merge(component, path, patch, -entry.strength)
            patch.release_device_copies()
        for component in touched:
            self._drop_adapter_config(component, entry.adapter)
        self.stats["removes"] += 1

    @torch.no_grad()
    def _merge(self, component: str, path: str, patch: ModulePatch, coefficient: float) -> None:
        if coefficient == 0.0:
            return
        base = _base_layer(self.components[component].get_submodule(path))
        weight = base.weight
        if is_quantized(weight):
            self._stale_quantized.add((component, path))  # rebuilt from its master once the whole set is applied
        else:
            merged = weight.float()
            _add_patch_(merged, patch, coefficient)
            weight.copy_(merged)
        diff_b = patch.tensors.get("diff_b")
        if diff_b is not None and base.bias is not None:
            bias = base.bias
            bias.copy_((bias.float() + coefficient * diff_b.to(bias.device, torch.float32)).to(bias.dtype))

    @torch.no_grad()
    def _requantize_stale(self) -> None:
        """Rebuild every quantized layer a change touched: quantize(master + sum over active LoRAs of c * delta)."""
        for key in sorted(self._stale_quantized):
            component, path = key
            base = _base_layer(self.components[component].get_submodule(path))
            master = master_weight(base)
            merged = master.to(rebuild_device(base), non_blocking=True).float()
            for entry in self.active.values():
                patch = entry.loaded.patches.get(key)
                if patch is not None:
                    _add_patch_(merged, patch, entry.strength)
            requantize_(base, merged, master.dtype)
            self._stale_quantized.discard(key)
            self.stats["requantized_layers"] += 1

    def _peft_layer(self, component: str, path: str):
        return self.components[component].get_submodule(path)

    @torch.no_grad()
    def _inject(self, component: str, adapter: str, patches: dict[str, ModulePatch], strength: float) -> None:
        import re

        from peft import LoraConfig, inject_adapter_in_model

        model = self.components[component]
        ranks = {path: p.rank for path, p in patches.items()}
        default_rank = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {re.escape(path): r for path, r in ranks.items() if r != default_rank}
        config = LoraConfig(
            r=default_rank,
            lora_alpha=default_rank,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            target_modules=sorted(patches),
            init_lora_weights=False,
        )
        with warnings.catch_warnings():
            # Several adapters on one model is exactly what a LoRA stack is; PEFT warns about it by default.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # FP8 (torchao) base layers: PEFT warns that merging is unavailable; we never merge adapters.
            warnings.filterwarnings("ignore", message=".*instantiated without `get_apply_tensor_subclass`")
            inject_adapter_in_model(config, model, adapter_name=adapter)
        for path, patch in patches.items():
            layer = model.get_submodule(path)
            for factor, name in ((layer.lora_A, "down"), (layer.lora_B, "up")):
                param = factor[adapter].weight
                param.copy_(patch.tensors[name].reshape(param.shape))
            layer.set_scale(adapter, strength)
        self._activate_all(component)

    def _activate_all(self, component: str) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        names = [a.adapter for slot, a in self.active.items()
                 if slot[1] not in self.pass_sides or slot[1] in self._passes_on]
        for module in self.components[component].modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter([n for n in names if n in module.lora_A])
        for name, param in self.components[component].named_parameters():
            if ".lora_" in name:
                param.requires_grad_(False)

    def _drop_adapter_config(self, component: str, adapter: str) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.components[component]
        getattr(model, "peft_config", {}).pop(adapter, None)
        remaining = any(isinstance(m, BaseTunerLayer) and len(m.lora_A) for m in model.modules())
        if remaining:
            self._activate_all(component)
            return
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = False

    @contextlib.contextmanager
    def pass_side(self, side: str):
        """Switch the LoRAs of pass side ``side`` on for the duration (one denoiser pass); off again after."""
        if side not in self.pass_sides:
            raise ValueError(f"{side!r} is not a pass side of model {self.model_label!r} ({sorted(self.pass_sides)}).")
        if not any(slot[1] == side for slot in self.active):
            yield
            return
        self._passes_on.add(side)
        try:
            for component in self.components:
                self._activate_all(component)
            yield
        finally:
            self._passes_on.discard(side)
            for component in self.components:
                self._activate_all(component)

    def describe(self) -> list[dict]:
        return [{**a.loaded.summary(), "strength": a.strength, "side": slot[1]} for slot, a in self.active.items()]
