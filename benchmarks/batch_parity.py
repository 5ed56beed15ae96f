"""How far an image of a distinct-prompt batch is from its one-by-one render, per registry id, on the tiny models.

    python -m aitk_inference.benchmarks.batch_parity                 # every id (CPU, fp32; a few minutes)
    python -m aitk_inference.benchmarks.batch_parity flux cogview4   # some ids

One call renders three images with their own prompt (of different token lengths), negative and seed; each is compared
with the same image rendered alone (largest absolute difference, images in 0..1). Families that do not declare
``batches_distinct_prompts`` are measured too, with the declaration switched on for the measurement: their number
says why they render one by one. Prints one JSON line per id and writes ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json

PROMPTS = ("a red fox", "a small blue bird sitting on a wooden fence at dawn, watercolor, soft light", "cat")
NEGATIVES = ("", "blurry, low quality", "ugly")
SEEDS = (3, 11, 7)


def control_image(size: int = 80):
    """A gradient RGB image in 0..1 (the control image of the families that need one)."""
    import numpy as np

    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    planes = [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 0.3, np.float32)]
    return np.stack(planes, -1)


def measure(model_id: str) -> dict:
    """The largest difference of each batched image from its one-by-one render, for ``model_id``'s tiny model."""
    import numpy as np

    from ..pipelines import load_pipeline
    from ..pipelines.registry import get_spec
    from ..tiny import tiny_model_dir

    spec = get_spec(model_id)
    pipeline = load_pipeline(model_id, base=tiny_model_dir(model_id), device="cpu", dtype="fp32")
    declared = pipeline.batches_distinct_prompts
    pipeline.batches_distinct_prompts = True  # this instance only: measure the families that do not batch too
    inputs = dict(width=64, height=64, steps=2, guidance=4.0, control_images=[control_image()] * spec.control_images[0])
    if spec.video is not None:
        inputs["num_frames"] = spec.video.frames(1)

    def outputs(result):
        return [field for field in (result.images, result.audio) if field is not None]

    batch = outputs(pipeline.generate(prompt=list(PROMPTS), negative=list(NEGATIVES), seed=list(SEEDS), **inputs))
    per_image = []
    for i in range(len(PROMPTS)):
        single = outputs(pipeline.generate(prompt=PROMPTS[i], negative=NEGATIVES[i], seed=SEEDS[i], **inputs))
        per_image.append(max(float(np.abs(b[i:i + 1] - s).max()) for b, s in zip(batch, single, strict=True)))
    return {"model": model_id, "batches_distinct_prompts": declared, "max_abs": max(per_image),
            "per_image": per_image}


def main(argv=None) -> list[dict]:
    import torch

    from ..pipelines.registry import REGISTRY

    parser = argparse.ArgumentParser(prog="python -m aitk_inference.benchmarks.batch_parity",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="registry ids (default: all)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(REGISTRY))
    if unknown:
        parser.error(f"unknown ids {unknown}")
    torch.set_num_threads(1)
    rows = []
    for model_id in args.models or list(REGISTRY):
        rows.append(measure(model_id))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
