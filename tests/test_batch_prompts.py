"""Previews in bulk: one ``generate`` call for images with their own prompts, negatives and seeds, and ``reproduce``
batching a job's previews that share their settings.

A family declares ``batches_distinct_prompts`` when each image of such a batch is its one-by-one render up to the
rounding of batched kernels (measured for every id by ``python -m aitk_inference.benchmarks.batch_parity``; the
table is in BENCHMARKS.md, "Previews in bulk"); the others render distinct previews one by one.
"""

import os
import shutil

import numpy as np
import pytest
import yaml

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

#: image i of a distinct-prompt batch vs its one-by-one render (fp32 tiny models; the largest measured is 2.7e-6)
BATCH_ATOL = 1e-5
#: 8-bit levels a batched preview may differ from its one-by-one render once written
LEVELS = 1
#: an output "changes" when some pixel moves by more than this (images are in 0..1)
CHANGED = 1e-3
#: prompts of different token lengths (padding), negatives that differ, two images sharing a seed
PROMPTS = ["a red fox", "a small blue bird sitting on a wooden fence at dawn, watercolor, soft light", "cat"]
NEGATIVES = ["", "blurry, low quality", "ugly"]
SEEDS = [3, 3, 7]
BATCHED_IDS = ("flux", "sdxl", "qwen_image", "zimage", "wan21_1b")


def _inputs(pipeline) -> dict:
    inputs = dict(width=64, height=64, steps=2, guidance=4.0)
    if pipeline.spec.video is not None:
        inputs["num_frames"] = pipeline.spec.video.frames(1)
    return inputs


@pytest.mark.parametrize("model_id", BATCHED_IDS)
def test_each_image_of_a_prompt_batch_is_its_one_by_one_render(model_id, pipes):
    pipeline = pipes(model_id)
    assert pipeline.batches_distinct_prompts
    inputs = _inputs(pipeline)
    batch = pipeline.generate(prompt=PROMPTS, negative=NEGATIVES, seed=SEEDS, **inputs)
    assert len(batch.images) == 3 and batch.params.batch_size == 3
    for i in range(3):
        single = pipeline.generate(prompt=PROMPTS[i], negative=NEGATIVES[i], seed=SEEDS[i], **inputs)
        assert float(np.abs(batch.images[i] - single.images[0]).max()) <= BATCH_ATOL, i
        meta = batch.metadata(i)
        assert (meta["prompt"], meta["negative"], meta["seed"]) == (PROMPTS[i], NEGATIVES[i], SEEDS[i])
    # images 0 and 1 share their seed: only the prompt (and negative) differ, and it shows
    assert float(np.abs(batch.images[0] - batch.images[1]).max()) > CHANGED


def test_per_image_lists_are_validated(pipes):
    pipeline = pipes("flux")
    resolve = pipeline.resolve_params
    params = resolve(["a [trigger]", "b"], seed=[5, -1], trigger_word="tok")
    assert params.prompts == ["a tok", "b"] and params.batch_size == 2 and params.seeds[0] == 5
    assert 0 <= params.seeds[1] <= 2**32 - 1  # -1 in the list draws that image's seed
    assert resolve("x", batch_size=2).seeds == [42, 43] and not resolve("x", batch_size=2).item_prompts
    for kwargs, message in (
            (dict(prompt=["a", "b"], batch_size=3), "disagrees with the 2 prompts"),
            (dict(prompt=["a", "b"], negative=["n"]), r"`negative` has 1 items for a batch of 2"),
            (dict(prompt="a", seed=[1, 2]), r"`seed` has 2 items for a batch of 1"),
            (dict(prompt=[]), "empty list"),
            (dict(prompt=["a", 3]), "Every item of `prompt` must be a string"),
            (dict(prompt=["a", "b"], seed=[1, True]), "Every item of `seed` must be an integer"),
            (dict(prompt=["a", "b"], seed=[1, -2]), r"`seed` must be an integer in -1\.\."),
    ):
        with pytest.raises(ValueError, match=message):
            resolve(**kwargs)


def test_a_family_that_does_not_batch_prompts_says_so(pipes):
    """CogView4 pads the prompts of a batch to the longest without a mask: a shorter prompt's image would change."""
    pipeline = pipes("cogview4")
    assert not pipeline.batches_distinct_prompts
    with pytest.raises(ValueError, match="renders one prompt .* per call; call generate once per prompt"):
        pipeline.resolve_params(["a", "b"])
    assert pipeline.resolve_params(["a", "a"], seed=[1, 9]).seeds == [1, 9]  # one prompt, own seeds: fine


# ------------------------------------------------------------------------------------------------ reproduce
def _sample(index, prompt="p", negative="", seed=0, width=64, multiplier=1.0):
    from aitk_inference.pipelines.jobs.config import SampleSpec

    return SampleSpec(index=index, prompt=prompt, negative=negative, negative_2="", width=width, height=64,
                      seed=seed, steps=2, guidance=4.0, network_multiplier=multiplier)


def test_previews_are_grouped_by_their_shared_settings():
    from aitk_inference.pipelines.jobs.reproduce import batch_previews
    from aitk_inference.pipelines.registry import REGISTRY

    samples = [_sample(0, "a", seed=1), _sample(1, "b", seed=2), _sample(2, "c", width=96), _sample(3, "d"),
               _sample(4, "e", multiplier=0.5), _sample(5, "f", seed=6)]
    options = [dict(width=s.width, height=64, steps=2, guidance=4.0) for s in samples]
    controls = [()] * 4 + [()] + [("ctrl.png",)]

    def indices(family, max_batch):
        batches = batch_previews(family, samples, options, controls, max_batch)
        assert sorted(s.index for b in batches for s in b.samples) == list(range(6))
        return [[s.index for s in b.samples] for b in batches]

    flux = REGISTRY["flux"].family_class()
    assert indices(flux, 4) == [[0, 1, 3], [2], [4], [5]]
    assert indices(flux, 2) == [[0, 1], [3], [2], [4], [5]]
    assert indices(flux, 1) == [[i] for i in (0, 1, 3, 2, 4, 5)]
    # a family that does not batch distinct prompts falls back to one by one (data: batches_distinct_prompts)
    assert indices(REGISTRY["cogview4"].family_class(), 4) == [[0], [1], [2], [3], [4], [5]]


def _shared_settings_job(model_id, folder) -> str:
    """The e2e job of ``model_id`` with three previews that share their size and settings (not their prompt,
    negative or seed), without ai-toolkit's previews."""
    source = os.path.join(GOLDENS_DIR, "e2e", model_id)
    job = folder / model_id
    job.mkdir()
    for name in os.listdir(source):
        if name.endswith(".safetensors"):
            shutil.copy(os.path.join(source, name), job / name)
    with open(os.path.join(source, "config.yaml")) as f:
        config = yaml.safe_load(f)
    config["config"]["process"][0]["sample"]["samples"] = [
        {"prompt": "[trigger] on a beach"},
        {"prompt": "a photo of [trigger] on a long wooden pier at dusk, film grain --n low quality"},
        {"prompt": "[trigger] --seed 5"},
    ]
    with open(job / "config.yaml", "w") as f:
        yaml.safe_dump(config, f)
    return str(job)


@pytest.mark.parametrize("model_id", BATCHED_IDS)
def test_batched_reproduce_equals_one_by_one(model_id, tiny_dir, tmp_path, monkeypatch):
    """Each written preview matches its one-by-one render within one 8-bit level (a float difference of ~1e-6 can
    round the other way); video frames are compared as they go into the WEBP encoder."""
    import aitk_inference.pipelines.media as media
    from aitk_inference.pipelines.jobs.reproduce import read_frames, reproduce_job

    encoded = {}
    write_webp = media.write_webp

    def keep_frames(frames, path, fps):
        encoded[path] = media._frames_uint8(frames)
        return write_webp(frames, path, fps)

    monkeypatch.setattr(media, "write_webp", keep_frames)
    job = _shared_settings_job(model_id, tmp_path)
    base = tiny_dir(model_id)
    one = reproduce_job(job, base=base, out_dir=str(tmp_path / "one"), device="cpu", dtype="fp32", max_batch=1)
    bulk = reproduce_job(job, base=base, out_dir=str(tmp_path / "bulk"), device="cpu", dtype="fp32", max_batch=4)
    assert (one.calls, bulk.calls, bulk.max_batch) == (3, 1, 4)
    for a, b in zip(one.samples, bulk.samples, strict=True):
        assert (a.index, a.prompt, a.seed, a.width, a.height) == (b.index, b.prompt, b.seed, b.width, b.height)
        if b.file.endswith(".webp"):
            ours, theirs = encoded[b.file], encoded[a.file]
        else:
            ours, theirs = np.stack(read_frames(b.file)), np.stack(read_frames(a.file))
        assert ours.shape == theirs.shape, (model_id, a.index)
        assert np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max() <= LEVELS, (model_id, a.index)
    assert len({row.seed for row in bulk.samples}) == 3 and bulk.images_per_minute > 0
