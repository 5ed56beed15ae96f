"""Our reproduce of the full-size FLUX.1-dev job made by make_fullsize_job.py, in each speed mode, against ai-toolkit's
own previews (PSNR, max and mean difference in 8-bit levels), plus each mode against our dynamic mode.

    PYTHONPATH=<site>:<pkg> python ours_vs_aitk.py JOB_DIR BASE_FOLDER OUT_DIR
"""
import gc
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from aitk_inference.pipelines.jobs.reproduce import compare_images, reproduce_job

MODES = {
    "dynamic": dict(lora_mode="dynamic"),
    "fused": dict(lora_mode="fused"),
    "fused+compile": dict(lora_mode="fused", compile="regional"),
    "fp8 (fused, eager)": dict(lora_mode="fused", quantize="fp8"),
}


DEVICE, DTYPE = os.environ.get("PARITY_DEVICE", "cuda"), os.environ.get("PARITY_DTYPE", "bf16")


def main(job, base, out):
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__, "modes": {}}
    ours = {}
    for name, options in MODES.items():
        started = time.perf_counter()
        try:
            report = reproduce_job(job, base=base, device=DEVICE, dtype=DTYPE, out_dir=os.path.join(out, name.split()[0]),
                                   **options)
        except Exception as error:  # record and go on to the next mode
            result["modes"][name] = {"error": repr(error)[:400]}
            print(name, result["modes"][name], flush=True)
            continue
        rows = []
        for row in report.samples:
            ours.setdefault(name, []).append(np.asarray(Image.open(row.file).convert("RGB")))
            c = row.compare
            rows.append({"file": os.path.basename(row.file), "size": f"{row.width}x{row.height}",
                         "vs_ai_toolkit": None if c is None else
                         {"max_abs": c.max_abs, "mean_abs": round(c.mean_abs, 3), "psnr_db": round(c.psnr, 2)}})
        result["modes"][name] = {"samples": rows, "seconds": round(time.perf_counter() - started, 1),
                                 "render_seconds": round(report.render_seconds, 2)}
        print(name, result["modes"][name], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if "dynamic" in ours:
        for name, images in ours.items():
            if name != "dynamic":
                diffs = [compare_images(a, b) for a, b in zip(images, ours["dynamic"])]
                result["modes"][name]["vs_our_dynamic"] = [
                    {"max_abs": d.max_abs, "mean_abs": round(d.mean_abs, 3), "psnr_db": round(d.psnr, 2)} for d in diffs]
    with open(os.path.join(out, "fullsize_parity.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
