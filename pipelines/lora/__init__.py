"""LoRA files as ai-toolkit writes them: ``convert`` turns every layout into per-module patches for the model's own
module names; ``stack`` applies a set of them to a loaded pipeline (live adapters or merged weights) and changes it
without reloading the base model.

The strength rule lives here, free of torch, so that the server's request schema and the node's widget read their
limits from the same place the library checks them.
"""

#: ai-toolkit's ``network_multiplier`` range: the strengths a LoRA may be applied with
STRENGTH_RANGE = (-2.0, 2.0)


def check_strength(strength: float, label: str) -> float:
    """``strength`` as a float, or a ValueError naming ``label`` when it is outside :data:`STRENGTH_RANGE`."""
    lo, hi = STRENGTH_RANGE
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"LoRA strength for {label} must be a number in {lo}..{hi}, got {strength!r}.") from None
    if not (lo <= value <= hi):  # NaN fails this too
        raise ValueError(f"LoRA strength {value} for {label} is outside {lo}..{hi} (ai-toolkit's network_multiplier range).")
    return value
