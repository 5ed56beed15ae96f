"""Write LoRA files, in each layout ai-toolkit produces, for a tiny pipeline's modules.

The factors are random and non-zero (a zero-initialised lora_B would make every LoRA a no-op), so tests can see each
LoRA's effect. ``reference_deltas`` gives the weight change each file must produce, computed directly from the
tensors and the layout's alpha rule, so a loader can be checked against it.
"""

from __future__ import annotations

import os
import re

# Module-name filter ai-toolkit applies with transformer_only: only modules inside the repeated blocks.
BLOCK_PATTERN = re.compile(r"(^|\.)(transformer_blocks|single_transformer_blocks|blocks|layers|double_blocks|single_blocks)\.\d+\.")

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


def write_lora(path: str, layout: str, targets, metadata: dict | None = None, **kwargs) -> str:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": "pt", "software": '{"name": "ai-toolkit", "version": "0.12.26"}', "training_info": '{"step": 0}'}
    meta.update(metadata or {})
    save_file({k: v.contiguous() for k, v in make_state_dict(layout, targets, **kwargs).items()}, path, metadata=meta)
    return path


def write_family_loras(pipe, out_dir: str, layouts=TRANSFORMER_LAYOUTS, seed: int = 0) -> dict[str, str]:
    """One LoRA file per layout for ``pipe``'s denoiser; returns ``{layout: path}``."""
    denoiser = pipe.transformer
    targets = lora_targets(denoiser)
    return {layout: write_lora(os.path.join(out_dir, f"tiny_{layout}.safetensors"), layout, targets, seed=seed)
            for layout in layouts}
