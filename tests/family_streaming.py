"""What the CPU and the GPU checks of every family under ``offload="auto"`` share (tests/test_streaming.py,
tests/test_gpu.py): which ids they run, and how they make auto stream on a tiny model."""

from aitk_inference.pipelines.registry import REGISTRY


def one_id_per_family() -> list[str]:
    """The first id of each family, and Wan 2.2 A14B (a model with two denoisers, the experts)."""
    first = {}
    for model_id, spec in REGISTRY.items():
        first.setdefault(spec.family, model_id)
    return [*first.values(), "wan22_14b_t2v"]


#: the GPU memory :func:`pretend_the_weights_do_not_fit` says there is: room for everything a tiny model places whole
PRETENDED_BUDGET = 64 * 2**30


def pretend_the_weights_do_not_fit(monkeypatch) -> None:
    """From here on ``offload="auto"`` streams: it chooses ``group`` and keeps three fifths of each denoiser's block
    bytes on the device, a video model's decoders whole (the budget has room for them); the tiny models fit anywhere,
    and auto's own choices are tested in tests/test_options.py."""
    from aitk_inference.pipelines.runtime import accelerate

    def keep_three_fifths(denoisers, budget, reserve):
        return {name: sum(accelerate.module_bytes(block) for _, block in accelerate.blocks_in_order(denoiser)) * 3 // 5
                for name, denoiser in denoisers.items()}

    monkeypatch.setattr(accelerate, "gpu_memory_budget", lambda device: PRETENDED_BUDGET)
    monkeypatch.setattr(accelerate, "choose_offload", lambda sizes, budget, reserve: "group")
    monkeypatch.setattr(accelerate, "resident_block_budget", keep_three_fifths)
