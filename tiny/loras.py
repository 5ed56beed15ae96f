"""Write LoRA files, in each layout ai-toolkit produces, for a tiny pipeline's modules.

The factors are random and non-zero (a zero-initialised lora_B would make every LoRA a no-op), so tests can see each
LoRA's effect. ``reference_deltas`` gives the weight change each file must produce, computed directly from the
tensors and the layout's alpha rule, so a loader can be checked against it.
"""

from __future__ import annotations

import os
import re

# Module-name filter ai-toolkit applies with transformer_only: only modules inside the repeated blocks.
BLOCK_PATTERN = re.compile(r"(^|\.)(transformer_blocks|single_transformer_blocks|blocks|layers|double_blocks|single_blocks|double_stream_blocks|single_stream_blocks|double_stream_layers|single_stream_layers)\.\d+\.")

TRANSFORMER_LAYOUTS = ("peft", "peft_diffusion_model", "down_up_alpha", "kohya", "lokr", "lokr_factored", "full")


def lora_targets(denoiser, limit: int | None = None) -> list[tuple[str, object]]:
    """The Linear modules of a transformer's blocks (what ai-toolkit's transformer_only LoRA targets)."""
    import torch

    targets = [(n, m) for n, m in denoiser.named_modules()
               if isinstance(m, torch.nn.Linear) and BLOCK_PATTERN.search(n)]
    return targets[:limit] if limit else targets


def _factorize(dim: int) -> tuple[int, int]:
    """LyCORIS' factorization with factor -1: the divisor pair m <= n of ``dim`` closest to a square."""
    m = int(dim ** 0.5)
    while dim % m:
        m -= 1
    return m, dim // m


def make_state_dict(layout: str, targets, rank: int = 4, alpha: float = 2.0, seed: int = 0, std: float = 0.3,
                    prefix: str = "transformer") -> dict:
    """Random LoRA tensors for ``targets`` in ``layout`` (float32)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in targets:
        out_f, in_f = module.weight.shape[:2]
        if layout in ("peft", "peft_diffusion_model"):
            key = ("diffusion_model." if layout == "peft_diffusion_model" else prefix + ".") + name
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * std
            sd[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
        elif layout in ("down_up_alpha", "kohya"):
            key = f"{prefix}.{name}" if layout == "down_up_alpha" else f"lora_{'unet' if prefix == 'unet' else 'transformer'}_{name.replace('.', '_')}"
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * std
            sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * std
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        elif layout in ("lokr", "lokr_factored"):
            key = f"{prefix}.{name}"
            (out_l, out_k), (in_m, in_n) = _factorize(out_f), _factorize(in_f)
            sd[f"{key}.lokr_w1"] = torch.randn(out_l, in_m, generator=g) * std
            if layout == "lokr":
                sd[f"{key}.lokr_w2"] = torch.randn(out_k, in_n, generator=g) * std
                sd[f"{key}.alpha"] = torch.tensor(1e10)  # what ai-toolkit stores for full-rank LoKr; must be ignored
            else:
                sd[f"{key}.lokr_w2_a"] = torch.randn(out_k, rank, generator=g) * std
                sd[f"{key}.lokr_w2_b"] = torch.randn(rank, in_n, generator=g) * std
                sd[f"{key}.alpha"] = torch.tensor(alpha)
        elif layout == "full":
            key = f"{prefix}.{name}"
            sd[f"{key}.diff"] = torch.randn(out_f, in_f, generator=g) * std * 0.1
            if module.bias is not None:
                sd[f"{key}.diff_b"] = torch.randn(out_f, generator=g) * std * 0.1
        else:
            raise ValueError(f"Unknown LoRA layout {layout!r}; known: {TRANSFORMER_LAYOUTS}.")
    return sd


def reference_deltas(layout: str, state_dict: dict, rank: int = 4, alpha: float = 2.0) -> dict:
    """The weight delta per module key that ``layout``'s alpha rule implies, computed directly (float32)."""
    import torch

    deltas = {}
    for key in state_dict:
        if layout in ("peft", "peft_diffusion_model") and key.endswith(".lora_A.weight"):
            m = key[: -len(".lora_A.weight")]
            deltas[m] = state_dict[f"{m}.lora_B.weight"] @ state_dict[key]
        elif layout in ("down_up_alpha", "kohya") and key.endswith(".lora_down.weight"):
            m = key[: -len(".lora_down.weight")]
            deltas[m] = state_dict[f"{m}.lora_up.weight"] @ state_dict[key] * (alpha / rank)
        elif layout == "lokr" and key.endswith(".lokr_w1"):
            m = key[: -len(".lokr_w1")]
            deltas[m] = torch.kron(state_dict[key], state_dict[f"{m}.lokr_w2"])
        elif layout == "lokr_factored" and key.endswith(".lokr_w1"):
            m = key[: -len(".lokr_w1")]
            w2 = state_dict[f"{m}.lokr_w2_a"] @ state_dict[f"{m}.lokr_w2_b"]
            deltas[m] = torch.kron(state_dict[key], w2) * (alpha / rank)
        elif layout == "full" and key.endswith(".diff"):
            deltas[key[: -len(".diff")]] = state_dict[key]
    return deltas


def save_lora(path: str, state_dict: dict, metadata: dict | None = None) -> str:
    """Write LoRA tensors as a ``.safetensors`` file with the metadata keys ai-toolkit stores; returns ``path``."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": "pt", "software": '{"name": "ai-toolkit", "version": "0.12.26"}', "training_info": '{"step": 0}'}
    meta.update(metadata or {})
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path, metadata=meta)
    return path


def write_bfl_native_lora(bfl_state_dict: dict, out_dir: str) -> dict[str, str]:
    """A family's ``write_native_loras`` result for a LoRA under ai-toolkit's original BFL names (FLUX.2, Chroma)."""
    return {"ai-toolkit (BFL names)": save_lora(os.path.join(out_dir, "tiny_aitk_bfl.safetensors"), bfl_state_dict)}


def write_original_name_loras(targets, out_dir: str, stem: str, names: str, seed: int = 0) -> dict[str, str]:
    """A family's ``write_native_loras`` result for ai-toolkit's ``diffusion_model.`` + original module names
    (``targets``: ``(original name, module)`` pairs), as a LoRA (``<stem>.safetensors``) and a LoKr
    (``<stem>_lokr.safetensors``); ``names`` says whose names they are (``"Krea names"``)."""
    return {
        f"ai-toolkit ({names})": save_lora(os.path.join(out_dir, f"{stem}.safetensors"),
                                           make_state_dict("peft_diffusion_model", targets, seed=seed)),
        f"ai-toolkit LoKr ({names})": save_lora(os.path.join(out_dir, f"{stem}_lokr.safetensors"),
                                                make_state_dict("lokr", targets, seed=seed, prefix="diffusion_model")),
    }


def write_lora(path: str, layout: str, targets, metadata: dict | None = None, **kwargs) -> str:
    return save_lora(path, make_state_dict(layout, targets, **kwargs), metadata)


# ---------------------------------------------------------------------------------------------- UNet families (kohya)
# What ai-toolkit's SD/SDXL network writes: kohya names, every Linear and 1x1 conv of the UNet, 3x3 convs only with
# `network.conv` (LoCon: lora_down Conv2d(in, r, k), lora_up Conv2d(r, out, 1)), and the text encoders' CLIPAttention /
# CLIPMLP Linears with `train_text_encoder`. Keys: lora_unet_*, lora_te_* (one encoder) or lora_te1_*/lora_te2_*.
UNET_LAYOUTS = ("kohya", "kohya_locon", "kohya_te")
TEXT_ENCODER_MODULES = re.compile(r"\.(self_attn|mlp)\.")


def kohya_targets(pipe, unet: bool = True, conv3x3: bool = False, text_encoders: bool = False) -> list[tuple[str, object]]:
    """``(kohya module key, module)`` for a UNet pipeline, as ai-toolkit's SD network selects them."""
    import torch

    targets = []
    if unet:
        for name, module in pipe.unet.named_modules():
            is_conv = isinstance(module, torch.nn.Conv2d)
            if isinstance(module, torch.nn.Linear) or (is_conv and (module.kernel_size == (1, 1) or conv3x3)):
                targets.append((f"lora_unet_{name.replace('.', '_')}", module))
    if text_encoders:
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
        prefixes = ["lora_te_"] if len(encoders) == 1 else ["lora_te1_", "lora_te2_"]
        for prefix, encoder in zip(prefixes, encoders):
            targets += [(f"{prefix}{name.replace('.', '_')}", m) for name, m in encoder.named_modules()
                        if isinstance(m, torch.nn.Linear) and TEXT_ENCODER_MODULES.search(name)]
    return targets


def make_kohya_state_dict(targets, rank: int = 4, alpha: float | None = 1.0, conv_rank: int = 2,
                          conv_alpha: float | None = 1.0, seed: int = 0, std: float = 0.1) -> dict:
    """Random kohya LoRA tensors for ``targets`` (float32); ``alpha=None`` writes no ``.alpha`` key."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, module in targets:
        out_f, in_f = module.weight.shape[:2]
        kernel = tuple(module.weight.shape[2:])
        r, a = (conv_rank, conv_alpha) if kernel not in ((), (1, 1)) else (rank, alpha)
        sd[f"{key}.lora_down.weight"] = torch.randn(r, in_f, *kernel, generator=g) * std
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, r, *((1, 1) if kernel else ()), generator=g) * std
        if a is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(a))
    return sd


def kohya_reference_deltas(state_dict: dict) -> dict:
    """``{kohya module key: delta}`` by ai-toolkit's rule ``(alpha / rank) * up . down`` (missing alpha: scale 1),
    written out with einsum so that it does not share code with the loader."""
    import torch

    deltas = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_down.weight"):
            continue
        m = key[: -len(".lora_down.weight")]
        up, rank = state_dict[f"{m}.lora_up.weight"], down.shape[0]
        alpha = state_dict.get(f"{m}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / rank
        if down.dim() == 2:
            deltas[m] = torch.einsum("or,ri->oi", up, down) * scale
        else:
            deltas[m] = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * scale
    return deltas


def write_kohya_lora(path: str, targets, metadata: dict | None = None, **kwargs) -> str:
    return save_lora(path, make_kohya_state_dict(targets, **kwargs), metadata)


def write_family_loras(pipe, out_dir: str, layouts=None, seed: int = 0) -> dict[str, str]:
    """One LoRA file per layout for ``pipe`` (kohya layouts for UNet pipelines); returns ``{layout: path}``."""
    if getattr(pipe, "unet", None) is not None:
        selections = {"kohya": {}, "kohya_locon": {"conv3x3": True}, "kohya_te": {"text_encoders": True}}
        return {layout: write_kohya_lora(os.path.join(out_dir, f"tiny_{layout}.safetensors"),
                                         kohya_targets(pipe, **selections[layout]), seed=seed)
                for layout in (layouts or UNET_LAYOUTS)}
    targets = lora_targets(pipe.transformer)
    return {layout: write_lora(os.path.join(out_dir, f"tiny_{layout}.safetensors"), layout, targets, seed=seed)
            for layout in (layouts or TRANSFORMER_LAYOUTS)}
