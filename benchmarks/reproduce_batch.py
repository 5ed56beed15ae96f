"""``--reproduce-batch``: ``reproduce`` of an ai-toolkit job whose 8 previews (``--reproduce-previews``) share their size and settings (not their
prompts or seeds), one by one and in batches of ``--reproduce-max-batch``, in the same run.

The job is written as ai-toolkit leaves one (``config.yaml`` with ``walk_seed``, a rank-16 PEFT LoRA named after the
job) next to the model folder the suite materialises: FLUX.1-dev at full size (random weights), or any of
:data:`MODELS` at ``--size tiny``. Each pass loads the model anew, as ``reproduce`` does; the figure is previews per
minute over the ``generate`` calls (``ReproduceReport.images_per_minute``), with the peak GPU memory of each pass and
the largest difference between a batched preview and its one-by-one render as written (8-bit levels).
"""

from __future__ import annotations

import gc
import json
import os

#: ids the benchmark can write a job for (diffusers denoisers, so LoRA targets come from the config alone)
MODELS = ("flux", "sdxl", "qwen_image", "zimage", "wan21_1b")
#: prompts of different lengths, as a job's sample list has them
PROMPTS = (
    "[trigger] on a beach",
    "a photo of [trigger] holding a sign that says hello world, studio lighting, 35mm film, highly detailed",
    "[trigger] in snow",
    "portrait of [trigger], oil painting, dramatic light",
    "[trigger] riding a bicycle through a busy market street at noon, wide angle",
    "[trigger] as a knight",
    "close-up of [trigger] reading a book in a cafe, shallow depth of field, warm tones",
    "[trigger] on the moon, earth in the background",
)


def denoiser_targets(folder: str, component: str) -> list:
    """The block Linears a LoRA targets, from the model folder's config alone (a meta-device module: no weights
    are read)."""
    import diffusers
    import torch

    from ..tiny.loras import lora_targets

    with open(os.path.join(folder, "model_index.json")) as f:
        class_name = json.load(f)[component][1]
    model_cls = getattr(diffusers, class_name)
    with torch.device("meta"):
        module = model_cls.from_config(model_cls.load_config(folder, subfolder=component))
    return lora_targets(module)


def write_job(model_id: str, base: str, workdir: str, size: int, steps: int, rank: int, previews: int) -> str:
    """An ai-toolkit job folder of ``model_id`` with the first ``previews`` of :data:`PROMPTS` at ``size``, ``steps``
    and one LoRA."""
    import yaml

    from ..pipelines.registry import get_spec
    from ..tiny.loras import write_lora

    spec = get_spec(model_id)
    job = os.path.join(workdir, f"reproduce_batch_{model_id}")
    os.makedirs(job, exist_ok=True)
    write_lora(os.path.join(job, f"bench_{0:09d}.safetensors"), "peft",
               denoiser_targets(base, spec.family_class().denoiser), rank=rank, seed=1, std=0.01)
    sample = {"width": size, "height": size, "seed": 42, "walk_seed": True, "guidance_scale": 4.0,
              "sample_steps": steps, "neg": "", "samples": [{"prompt": p} for p in PROMPTS[:previews]]}
    if spec.video is not None:
        sample.update(num_frames=spec.video.frames(1), fps=spec.video.fps)
    config = {"job": "extension", "config": {"name": "bench", "process": [{
        "type": "sd_trainer", "training_folder": "output", "trigger_word": "p3r5on",
        "network": {"type": "lora", "linear": rank, "linear_alpha": rank},
        "train": {"steps": 1}, "model": {"arch": model_id, "name_or_path": base}, "sample": sample}]}}
    with open(os.path.join(job, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    return job


def max_levels(one, bulk) -> int:
    """The largest 8-bit difference between the previews two reports wrote (video: every decoded frame)."""
    import numpy as np

    from ..pipelines.jobs.reproduce import read_frames

    worst = 0
    for a, b in zip(one.samples, bulk.samples, strict=True):
        x, y = np.stack(read_frames(a.file)), np.stack(read_frames(b.file))
        worst = max(worst, int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()))
    return worst


def bench_reproduce_batch(model_id: str, opts, rec, max_batch: int, previews: int = len(PROMPTS)) -> None:
    """One-by-one (reference) and batched ``reproduce`` of the same job of ``previews`` previews; a first one-by-one
    pass warms up the process and the device (imports, kernels, allocator) and is not recorded."""
    from ..pipelines.jobs.reproduce import reproduce_job
    from .harness import materialize_flux, peak_memory_gib, reset_peak

    if opts.size == "full" and model_id != "flux":
        raise SystemExit(f"--reproduce-batch {model_id} runs at --size tiny only; at full size the suite materialises "
                         "FLUX.1-dev (flux).")
    if opts.size == "full":
        base = materialize_flux(opts)
    else:
        from ..tiny import tiny_model_dir

        base = tiny_model_dir(model_id)
    if not 1 <= previews <= len(PROMPTS):
        raise SystemExit(f"--reproduce-previews must be in 1..{len(PROMPTS)}, got {previews}.")
    job = write_job(model_id, base, opts.workdir, opts.image_size, opts.steps, opts.rank, previews)
    out = os.path.join(opts.workdir, f"reproduce_batch_{model_id}_out")
    reports, peaks = {}, {}
    for name, batch in (("warm-up", 1), ("one_by_one", 1), ("batched", max_batch)):
        gc.collect()  # the previous pass's pipeline, before this one loads its own
        reset_peak(opts.device)
        reports[name] = reproduce_job(job, base=base, out_dir=os.path.join(out, name), device=opts.device,
                                      dtype=opts.dtype, model=model_id, max_batch=batch)
        peak = peak_memory_gib(opts.device)
        peaks[name] = "n/a (CPU)" if peak is None else f"{peak:.2f} GiB"
    one, bulk = reports["one_by_one"], reports["batched"]
    what = f"{previews} previews {opts.image_size}px, {opts.steps} steps"
    rec.add(model_id, "reproduce_images_per_min", "one_by_one", one.images_per_minute, "img/min",
            notes=f"{what}; {one.calls} call(s); peak {peaks['one_by_one']}")
    rec.add(model_id, "reproduce_images_per_min", f"batch_{max_batch}", bulk.images_per_minute, "img/min",
            one.images_per_minute, notes=f"{what}; {bulk.calls} call(s); peak {peaks['batched']}; ratio = speed-up")
    rec.add(model_id, "reproduce_batch_vs_one_by_one", f"batch_{max_batch}", max_levels(one, bulk), "levels",
            notes="largest 8-bit difference of a batched preview from its one-by-one render, as written")
