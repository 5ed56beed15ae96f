"""Our reproduce of a full-size job made by make_fullsize_job.py, in each speed mode, against ai-toolkit's own previews
(PSNR, max and mean difference in 8-bit levels), plus each mode against our dynamic mode. Video previews are compared
as written (both WEBP files decoded) and before the codec (our frames against frames_before_webp.npz).

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

from aitk_inference.pipelines import media
from aitk_inference.pipelines.jobs.reproduce import compare_images, reproduce_job

MODES = {
    "dynamic": dict(lora_mode="dynamic"),
    "fused": dict(lora_mode="fused"),
    "fused+compile": dict(lora_mode="fused", compile="regional"),
    "fp8 (fused, eager)": dict(lora_mode="fused", quantize="fp8"),
}


DEVICE, DTYPE = os.environ.get("PARITY_DEVICE", "cuda"), os.environ.get("PARITY_DTYPE", "bf16")


def keep_video_frames(frames_by_file):
    """Make ``media.write_webp`` (which reproduce calls at run time) also keep the frames it encodes."""
    write_webp = media.write_webp

    def write_and_keep(frames, path, fps, *args, **kwargs):
        frames_by_file[os.path.basename(path)] = media._frames_uint8(frames)  # the bytes the encoder gets
        return write_webp(frames, path, fps, *args, **kwargs)

    media.write_webp = write_and_keep


def before_codec(row, ours_frames, theirs_frames):
    index = os.path.splitext(row.file)[0].rsplit("_", 1)[1]
    ours, theirs = ours_frames.get(os.path.basename(row.file)), theirs_frames.get(index)
    if ours is None or theirs is None:
        return None
    if ours.shape != theirs.shape:
        return {"error": f"ours {ours.shape}, ai-toolkit's {theirs.shape}"}
    d = compare_images(ours, theirs)
    return {"max_abs": d.max_abs, "mean_abs": round(d.mean_abs, 3), "psnr_db": round(d.psnr, 2)}


def main(job, base, out):
    raw_path = os.path.join(job, "frames_before_webp.npz")
    theirs_frames = dict(np.load(raw_path)) if os.path.isfile(raw_path) else {}
    ours_frames = {}
    keep_video_frames(ours_frames)
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
                         {"max_abs": c.max_abs, "mean_abs": round(c.mean_abs, 3), "psnr_db": round(c.psnr, 2)},
                         "vs_ai_toolkit_before_codec": before_codec(row, ours_frames, theirs_frames)})
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
