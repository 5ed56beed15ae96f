"""The GPU memory an untiled VAE decode takes beyond the VAE's weights, per image VAE class our families use, at
full size (random bf16 weights): the measurement behind ``accelerate.DECODE_GIB_PER_MEGAPIXEL``, which sizes the
room ``offload="auto"`` keeps free for an image model's decode. One latent per size, decoded after a warm-up decode
(cuDNN picks its algorithms and workspaces there), the peak allocated memory above what was allocated before:

    python -m aitk_inference.benchmarks.decode_memory --sizes 1024 1328 --out DIR
"""

import argparse
import time

#: class name -> (its full-size configuration, latent channels, whether its latents carry a frame axis)
VAES = {
    "AutoencoderKL": (dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
                           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
                      16, False),
    "AutoencoderKLFlux2": ({}, 32, False),
    "AutoencoderKLQwenImage": ({}, 16, True),
}


def decode_peak_gib(vae, latent, device: str) -> tuple[float, float]:
    """(GiB the decode of ``latent`` allocated at its peak beyond what was allocated before, seconds it took)."""
    import torch

    from .harness import peak_memory_gib, reset_peak, sync

    sync(device)
    reset_peak(device)
    before = torch.cuda.memory_allocated(device) / 2**30
    started = time.perf_counter()
    with torch.no_grad():
        vae.decode(latent)
    sync(device)
    return peak_memory_gib(device) - before, time.perf_counter() - started


def main(argv=None) -> int:
    import diffusers
    import torch

    from .harness import environment, write_result
    from .models import randomize_

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 1328], help="square image sides")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    rows = []
    for name, (config, channels, frame_axis) in VAES.items():
        with torch.device(args.device):
            vae = getattr(diffusers, name)(**config).to(torch.bfloat16).eval()
        randomize_(vae)
        for side in args.sizes:
            shape = (1, channels, 1, side // 8, side // 8) if frame_axis else (1, channels, side // 8, side // 8)
            latent = torch.randn(shape, device=args.device, dtype=torch.bfloat16)
            decode_peak_gib(vae, latent, args.device)
            gib, seconds = decode_peak_gib(vae, latent, args.device)
            megapixels = side * side / 1e6
            rows.append({"vae": name, "side": side, "decode_gib": round(gib, 3),
                         "gib_per_megapixel": round(gib / megapixels, 3), "seconds": round(seconds, 3)})
            print(rows[-1], flush=True)
        del vae
        torch.cuda.empty_cache()
    write_result(args.out, "decode_memory", {**environment(args.device), "dtype": "bf16", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
