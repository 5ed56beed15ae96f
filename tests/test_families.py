"""What every registered model promises, checked for every id of the registry on its tiny random-weight model.

The checks: a LoRA changes the output; strength 0 is the output without it, bit for bit; a strength change reloads
nothing; fused LoRAs agree with dynamic ones; the same seed gives the same output; image i of a batch is the single
image of its seed (seed + i); the control-image count is bounded; the negative prompt matters exactly when the registry says
so. A newly registered id is covered without touching this file. Family-specific behaviour lives in the per-family
test files.

Batches: ``generate`` seeds one CPU generator per image (seed + i), so every image of a batch can be made again alone,
and a batch of N is the N previews ai-toolkit renders with ``walk_seed`` (up to the rounding of batched kernels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass

import numpy as np
import pytest

from aitk_inference.pipelines.registry import REGISTRY
from aitk_inference.pipelines.runtime import cache
from aitk_inference.pipelines.runtime.options import LoadOptions
from aitk_inference.tiny.loras import lora_targets, write_lora

#: an output "changes" when some pixel (or audio sample) moves by more than this (images are in 0..1)
CHANGED = 1e-3
#: fused (weights merged in float32) vs dynamic (PEFT adapters) on the fp32 tiny models: the same maths in another
#: order of float32 operations; the largest difference seen over the registry is 9e-6 (sdxl), most are about 1e-6
FUSED_VS_DYNAMIC_ATOL = 1e-4
#: ids whose latents are bfloat16 between steps whatever the model dtype (as ai-toolkit keeps them): a float32 rounding
#: difference can flip the bfloat16 rounding of a latent, one bfloat16 step of x + 1 after the decode (x + 1) / 2
FUSED_VS_DYNAMIC_ATOL_BY_ID = {"hidream_o1": 2**-8}
#: image i of a batch vs the single image of seed + i: batched kernels round differently, by how much depends on the
#: CPU's float32 kernels (most ids about 1e-6; qwen_image_edit_plus 2.6e-5 on an AVX2-only CPU), far below CHANGED
BATCH_ATOL = 5e-5
#: ai-toolkit's PixArt DDPM starts at t = 999, where x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) multiplies the batched
#: kernels' rounding of eps (5e-7) by 1 / sqrt(ab_999) = 150; the largest difference seen is 4e-5
BATCH_ATOL_BY_ID = {"pixart": 1e-4, "pixart_sigma": 1e-4}


def _control_image(size=80):
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    planes = [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 0.3, np.float32)]
    return np.stack(planes, -1)


@dataclass
class Family:
    """One registry id loaded for the checks: the pipeline (from the shared cache, in the id's default LoRA mode),
    its LoRA files and the generation inputs every check starts from."""

    model_id: str
    pipeline: object
    options: LoadOptions
    loras: list
    inputs: dict

    @property
    def spec(self):
        return self.pipeline.spec

    def run(self, **overrides) -> tuple:
        return output(self.pipeline.generate(**{**self.inputs, **overrides}))

    def set_strength(self, strength: float):
        return self.pipeline.set_loras([(path, strength) for path in self.loras])

    @contextlib.contextmanager
    def lora_free(self):
        """Start and leave the pipeline without LoRAs."""
        self.pipeline.set_loras([])
        try:
            yield
        finally:
            self.pipeline.set_loras([])


def output(result) -> tuple:
    """What a generation produced: the images, the audio of audio-video models, or the audio alone."""
    return tuple(field for field in (result.images, result.audio) if field is not None)


def max_difference(a: tuple, b: tuple) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def identical(a: tuple, b: tuple) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def write_family_loras(pipeline, folder) -> list[str]:
    """One PEFT LoRA on the denoiser's block Linears; two-expert models get a high-noise and a low-noise file, as
    ai-toolkit saves them (the same files ``demo`` writes)."""
    two_experts = pipeline.spec.experts
    if two_experts:
        experts = {two_experts.file_stem("lora", side): two_experts.component(side) for side in two_experts.SIDES}
    else:
        experts = {"lora": pipeline.denoiser}
    return [write_lora(str(folder / f"{name}.safetensors"), "peft", lora_targets(getattr(pipeline.pipe, component)),
                       seed=seed)
            for seed, (name, component) in enumerate(experts.items())]


pytestmark = pytest.mark.usefixtures("one_thread")


# Module scope: pytest runs every check of one id before loading the next, so one pipeline is in memory at a time.
@pytest.fixture(scope="module", params=list(REGISTRY))
def family(request, tiny_dir, tmp_path_factory):
    model_id = request.param
    spec = REGISTRY[model_id]
    options = LoadOptions(base=tiny_dir(model_id), device="cpu", dtype="fp32")
    pipeline = cache.get_pipeline(model_id, options)
    inputs = dict(prompt="a red fox", negative="", width=64, height=64, steps=2, seed=3,
                  control_images=[_control_image()] * spec.control_images[0])
    if spec.video is not None:
        inputs["num_frames"] = spec.video.frames(1)
    loras = write_family_loras(pipeline, tmp_path_factory.mktemp(f"loras_{model_id}"))
    yield Family(model_id, pipeline, options, loras, inputs)
    pipeline.set_loras([])
    cache.evict(options.cache_key(model_id))


def test_lora_changes_the_output(family):
    with family.lora_free():
        base = family.run()
        summaries = family.set_strength(1.0)
        assert all(summary["modules"] > 0 for summary in summaries), summaries
        assert max_difference(family.run(), base) > CHANGED


def test_strength_zero_is_the_output_without_the_lora(family):
    """Bit for bit, from a pipeline that never had a LoRA (loading freezes the weights as the first LoRA would: see
    ``base.freeze``)."""
    with family.lora_free():
        base = family.run()
        family.set_strength(0.0)
        assert identical(family.run(), base)


def test_strength_change_reloads_nothing(family, monkeypatch):
    """Changing only the strength edits the applied LoRA in place: the same pipeline and modules, no file read or
    converted again, no load (the family's loader would raise), and the result equals a fresh application."""

    def no_reload(*args, **kwargs):
        raise AssertionError(f"{family.model_id} was reloaded for a strength change")

    pipeline = family.pipeline
    with family.lora_free():
        family.set_strength(0.5)
        fresh_half = family.run()
        family.pipeline.set_loras([])
        family.set_strength(1.0)
        full = family.run()
        pipe, denoisers = pipeline.pipe, pipeline.denoisers()
        converted, rescales = pipeline.loras.stats["files_converted"], pipeline.loras.stats["rescales"]
        loads = cache.stats["loads"]
        monkeypatch.setattr(type(pipeline), "load_diffusers_pipeline", no_reload)
        family.set_strength(0.5)
        half = family.run()
        assert cache.get_pipeline(family.model_id, family.options) is pipeline
        assert cache.stats["loads"] == loads
        assert pipeline.pipe is pipe and all(a is b for a, b in zip(pipeline.denoisers(), denoisers, strict=True))
        assert pipeline.loras.stats["files_converted"] == converted
        assert pipeline.loras.stats["rescales"] == rescales + len(family.loras)
        assert max_difference(half, full) > CHANGED
        # dynamic: PEFT's scale is set, exact; fused: weights move by (0.5 - 1.0) * delta, one float32 rounding
        atol = 0.0 if pipeline.lora_mode == "dynamic" else FUSED_VS_DYNAMIC_ATOL
        assert max_difference(half, fresh_half) <= atol


def test_fused_is_close_to_dynamic(family, load_tiny):
    other_mode = "fused" if family.pipeline.lora_mode == "dynamic" else "dynamic"
    other = load_tiny(family.model_id, lora_mode=other_mode)
    with family.lora_free():
        family.set_strength(1.0)
        ours = family.run()
    other.set_loras([(path, 1.0) for path in family.loras])
    atol = FUSED_VS_DYNAMIC_ATOL_BY_ID.get(family.model_id, FUSED_VS_DYNAMIC_ATOL)
    assert max_difference(output(other.generate(**family.inputs)), ours) <= atol


def test_same_seed_same_output(family):
    with family.lora_free():
        first = family.run()
        assert identical(family.run(), first)
        assert max_difference(family.run(seed=family.inputs["seed"] + 1), first) > CHANGED


#: the fields by which two ids may differ and still run the same code on the same tiny model with the same inputs
SAME_RUN_FIELDS_THAT_MAY_DIFFER = {"model_id", "base", "aitk_archs", "lora_mode", "notes"}


def _same_run_as(model_id: str) -> str | None:
    """The earlier id whose run of a LoRA-free check this id would repeat (the same spec but for the base checkpoint,
    ai-toolkit's names and the default LoRA mode), or None."""
    spec = REGISTRY[model_id]
    for other_id, other in REGISTRY.items():
        if other_id == model_id:
            return None
        if {f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(other, f.name)} <= \
                SAME_RUN_FIELDS_THAT_MAY_DIFFER:
            return other_id
    return None


def test_each_image_of_a_batch_is_the_single_image_of_its_seed(family):
    """With the fewest and with the most control images the model takes (reference images are encoded per seed)."""
    same = _same_run_as(family.model_id)
    if same:  # qwen_image_edit_plus_2511 alone took 32 s
        pytest.skip(f"the same LoRA-free batch as {same} (same family, tiny model and defaults)")
    seed = family.inputs["seed"]
    for count in sorted(set(family.spec.control_images)):
        inputs = {"control_images": [_control_image()] * count}
        with family.lora_free():
            batch = family.run(batch_size=2, **inputs)
            singles = [family.run(seed=seed + i, **inputs) for i in range(2)]
        assert all(len(part) == 2 for part in batch)
        for i, single in enumerate(singles):
            atol = BATCH_ATOL_BY_ID.get(family.model_id, BATCH_ATOL)
            assert max_difference(tuple(part[i:i + 1] for part in batch), single) <= atol, (count, i)
        assert max_difference(tuple(part[1:2] for part in batch), singles[0]) > CHANGED


def test_control_image_count_is_bounded(family):
    """One image fewer than the minimum and one more than the maximum raise an error that names the bound."""
    low, high = family.spec.control_images
    too_many = "takes no control image" if high == 0 else f"takes at most {high} control image"
    for count, message in ([(low - 1, f"needs {low} control image")] if low > 0 else []) + [(high + 1, too_many)]:
        with pytest.raises(ValueError, match=f"{re.escape(family.model_id)}.*{message}"):
            family.pipeline.generate(**{**family.inputs, "control_images": [_control_image()] * count})


def test_negative_prompt_matters_exactly_when_the_registry_says(family):
    """At the model's default guidance: the registry's ``uses_negative`` is the truth about the pipeline."""
    with family.lora_free():
        without = family.run()
        with_negative = family.run(negative="blurry, low quality")
    if family.spec.uses_negative:
        assert max_difference(with_negative, without) > CHANGED
    else:
        assert identical(with_negative, without)
