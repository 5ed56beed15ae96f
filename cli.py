"""``python -m aitk_inference``: models, generate, reproduce, demo, make-tiny, serve.

Each subcommand maps onto one library function and its flags use the library's parameter names. Heavy imports
happen after argument parsing, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def _lora_arg(text: str):
    """``FILE`` or ``FILE:STRENGTH`` (a Windows drive letter's colon is not a separator)."""
    path, sep, strength = text.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def _option_arg(text: str):
    """``NAME=VALUE`` of ``--option``; VALUE is read as JSON (numbers, true/false, null), else kept as text."""
    name, separator, value = text.partition("=")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. schedule_mu=0.8 or kv_cache=false), got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = None

    def update(step: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)
        bar.n = step
        bar.refresh()
        if step >= total:
            bar.close()

    return update


def save_videos(result, out: str) -> list[str]:
    """One video per batch item: ``.webp`` writes animated WEBP, anything else H.264 MP4 (with the audio track when
    the result has one)."""
    from .pipelines.media import write_video

    if not out.lower().endswith((".mp4", ".webp")):
        out = os.path.splitext(out)[0] + ".mp4"
    count = len(result.images)
    paths = [_numbered(out, i, count) for i in range(count)]
    for i, path in enumerate(paths):
        audio = None if result.audio is None else result.audio[i]
        write_video(result.images[i], path, result.params.fps, audio=audio, sample_rate=result.sample_rate)
    return paths


def save_audio(result, out: str) -> list[str]:
    """One lossless audio file per batch item: ``.wav`` writes WAV, anything else FLAC."""
    from .pipelines.media import write_audio

    if not out.lower().endswith((".flac", ".wav")):
        out = os.path.splitext(out)[0] + ".flac"
    paths = [_numbered(out, i, len(result.audio)) for i in range(len(result.audio))]
    for audio, path in zip(result.audio, paths):
        write_audio(audio, path, result.sample_rate)
    return paths


def _numbered(path: str, index: int, count: int) -> str:
    if count == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{index}{ext}"


def cmd_models(args) -> int:
    from .pipelines.registry import REGISTRY

    if args.json:
        print(json.dumps([spec.describe() for spec in REGISTRY.values()], indent=2))
        return 0
    print(f"{'id':<28}{'steps':>6}{'guid.':>7}{'div':>5}  {'LoRA':<8}{'negative':<10}base")
    for spec in REGISTRY.values():
        neg = "used" if spec.uses_negative else "ignored"
        print(f"{spec.model_id:<28}{spec.steps:>6}{spec.guidance:>7}{spec.divisor:>5}  {spec.lora_mode:<8}{neg:<10}{spec.base}")
    return 0


def run_generate(pipeline, args, out: str) -> list[str]:
    from .pipelines.lora.stack import LoraRequest
    from .pipelines.media import write_image
    from .pipelines.runtime.parallel import writes_outputs

    pipeline.set_loras([LoraRequest(path=p, strength=s) for p, s in (args.lora or [])])
    result = pipeline.generate(
        prompt=args.prompt, negative=args.neg, width=args.width, height=args.height, steps=args.steps,
        guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, trigger_word=args.trigger,
        control_images=args.ctrl_img or None,
        progress=None if args.quiet or not writes_outputs() else _progress_bar(pipeline.spec.model_id),
        num_frames=getattr(args, "num_frames", None), fps=getattr(args, "fps", None),
        vae_tiling=getattr(args, "vae_tiling", False), **dict(getattr(args, "option", None) or []),
    )
    if pipeline.parallel != "none" and not writes_outputs():
        return []  # every rank computed the same result; rank 0 writes it
    if result.is_audio:
        paths = save_audio(result, out)
    elif result.is_video:
        paths = save_videos(result, out)
    else:
        images = result.to_pil()
        paths = [_numbered(out, i, len(images)) for i in range(len(images))]
        for i, (image, path) in enumerate(zip(images, paths)):
            write_image(image, path, result.metadata(i))
    p = result.params
    size = (f"{result.audio.shape[-1] / result.sample_rate:g} s at {result.sample_rate} Hz" if result.is_audio
            else f"{p.width}x{p.height}")
    print(f"wrote {', '.join(paths)}  size {size}  seed {p.seed}  steps {p.steps}  "
          f"guidance {p.guidance}  total {result.timings['total']:.2f}s")
    for lora in result.loras:
        print(f"  LoRA {lora['name']}: {lora['modules']} modules ({lora['layout']}), strength {lora['strength']}")
    return paths


def cmd_generate(args) -> int:
    from .pipelines import load_pipeline
    from .pipelines.component_files import FILE_COMPONENTS

    started = time.perf_counter()
    pipeline = load_pipeline(args.model, base=args.base, device=args.device, dtype=args.dtype, offload=args.offload,
                             lora_mode=args.lora_mode, compile=args.compile, attention=args.attention,
                             quantize=args.quantize, parallel=args.parallel, components=args.components,
                             **{f"{c}_file": getattr(args, f"{c}_file") for c in FILE_COMPONENTS})
    print(f"loaded {args.model} from {pipeline.source} in {time.perf_counter() - started:.2f}s")
    run_generate(pipeline, args, args.out)
    if pipeline.parallel != "none":
        import torch.distributed

        torch.distributed.destroy_process_group()
    return 0


def cmd_demo(args) -> int:
    from .pipelines import load_pipeline
    from .pipelines.registry import get_spec
    from .tiny import tiny_model_dir
    from .tiny.loras import lora_targets, write_lora

    spec = get_spec(args.model)
    started = time.perf_counter()
    folder = tiny_model_dir(args.model)
    pipeline = load_pipeline(args.model, base=folder, device="cpu", dtype="fp32")
    denoiser = getattr(pipeline.pipe, pipeline.denoiser)
    # Two-expert models take a high-noise and a low-noise file, as ai-toolkit saves them.
    names = [spec.experts.file_stem("demo_lora", side) for side in spec.experts.SIDES] if spec.experts else ["demo_lora"]
    loras = [write_lora(os.path.join(folder, "loras", f"{name}.safetensors"), "peft", lora_targets(denoiser), seed=i)
             for i, name in enumerate(names)]
    print(f"tiny {args.model} pipeline (random weights) at {folder}; demo LoRA {', '.join(loras)}")
    args.lora = [(lora, 1.0) for lora in loras]
    args.base = folder
    for name in ("neg", "seed", "trigger", "guidance"):
        setattr(args, name, None)
    args.width = args.height = 64  # the smallest size every tiny model takes (ai-toolkit floors to 64 anyway)
    args.steps = 4
    args.batch_size = 1
    args.prompt = "a tiny photo of [trigger]"
    args.trigger = "sks"
    args.ctrl_img = [_demo_control_image()] * spec.control_images[0]
    if spec.video is not None:
        args.num_frames, args.fps = spec.video.frames(2), None
        if args.out.lower().endswith(".png"):
            args.out = args.out[:-4] + ".mp4"
    run_generate(pipeline, args, args.out)
    print(f"demo done in {time.perf_counter() - started:.2f}s")
    return 0


def _demo_control_image():
    import numpy as np

    ramp = np.linspace(0.0, 1.0, 128, dtype=np.float32)
    return np.stack([np.tile(ramp, (128, 1)), np.tile(ramp[:, None], (1, 128)), np.full((128, 128), 0.5, np.float32)], -1)


def cmd_make_tiny(args) -> int:
    from .tiny import native_lora_writer, save_tiny_pipeline
    from .tiny.loras import write_family_loras
    from .pipelines import load_pipeline

    folder = save_tiny_pipeline(args.model, args.out)
    pipeline = load_pipeline(args.model, base=folder, device="cpu", dtype="fp32")
    paths = write_family_loras(pipeline.pipe, os.path.join(folder, "loras"))
    native = native_lora_writer(args.model)
    if native is not None:
        paths.update(native(pipeline.pipe, os.path.join(folder, "loras")))
    print(f"tiny {args.model} pipeline written to {folder}")
    for layout, path in paths.items():
        print(f"  LoRA ({layout}): {path}")
    return 0


def cmd_reproduce(args) -> int:
    from .pipelines.jobs.grid import difference_lines
    from .pipelines.jobs.reproduce import reproduce_job

    if args.grid:
        if (args.compile, args.quantize, args.attention) != ("none", "none", "sdpa"):
            raise ValueError("--compile, --quantize and --attention apply to a plain reproduce, not to --grid.")
        return reproduce_grid(args)
    if args.steps or args.strengths or args.prompts:
        raise ValueError("--steps, --strengths and --prompts choose the cells of --grid; add --grid.")
    report = reproduce_job(args.job, base=args.base, lora=args.lora, out_dir=args.out, device=args.device,
                           dtype=args.dtype, model=args.model, lora_mode=args.lora_mode, compile=args.compile,
                           quantize=args.quantize, attention=args.attention,
                           **({} if args.max_batch is None else {"max_batch": args.max_batch}))
    print(f"{report.model} from {report.base}; LoRA {report.lora} (step {report.step}, {report.lora_mode})")
    for row in report.samples:
        line = f"{row.file}: {row.width}x{row.height} seed {row.seed} steps {row.steps} guidance {row.guidance}"
        if row.compare:
            line += "  vs preview: " + ", ".join(difference_lines(row.compare))
        print(line)
    if report.sheet:
        print(f"side-by-side sheet: {report.sheet}")
    print(f"{len(report.samples)} previews in {report.calls} call(s) (at most {report.max_batch} per call): "
          f"{report.render_seconds:.2f}s, {report.images_per_minute:.1f} images/min")
    return 0


def reproduce_grid(args) -> int:
    from .pipelines.jobs.grid import difference_lines, reproduce_grid as render_grid

    if args.lora or args.lora_mode:
        raise ValueError("--grid takes its checkpoints from --steps (all, 'last N' or steps) and runs LoRAs live; "
                         "leave out --lora and --lora-mode.")
    if not args.out or not args.out.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
        raise ValueError("--grid writes one image: give --out FILE.png.")
    grid = render_grid(args.job, base=args.base, checkpoints=args.steps or "all", strengths=args.strengths or "",
                       prompts=args.prompts or "", device=args.device, dtype=args.dtype, model=args.model)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    grid.image.save(args.out)
    for cell in grid.cells:
        line = f"step {cell.step} strength {cell.strength:g} sample {cell.index}: "
        if cell.compare:
            line += "vs preview: " + ", ".join(difference_lines(cell.compare))
        else:
            line += "no comparable ai-toolkit sample"
        print(line)
    print(f"wrote {args.out} ({grid.image.width}x{grid.image.height}: {len(grid.rows)} rows x {len(grid.columns)} "
          "prompts)")
    return 0


def cmd_serve(args) -> int:
    from .server.main import serve

    return serve(host=args.host, port=args.port, bases=args.base, ray=args.ray, replicas=args.replicas,
                 ray_address=args.ray_address)


def _quiet_libraries() -> None:
    """Hide the libraries' loading bars and advisory warnings; our own progress bar stays."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # transformers imports torchao whenever it is installed (its quantizer registry), even when nothing is quantized;
    # torchao's import logs its missing optional kernels, and torch logs deprecation notes about torchao's enums.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    from .pipelines.component_files import FILE_COMPONENTS
    from .pipelines.runtime.options import (ATTENTION_KERNELS, COMPILE_MODES, LORA_MODES, OFFLOAD_MODES,  # no torch
                                            QUANTIZE_MODES)

    parser = argparse.ArgumentParser(prog="python -m aitk_inference", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list model ids with their defaults")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    def add_load_flags(p, base_help):
        p.add_argument("--base", help=base_help)
        p.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: cuda when available)")
        p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16")

    p = sub.add_parser("generate", help="generate images with LoRAs")
    p.add_argument("--model", required=True, help="model id (see `models`)")
    add_load_flags(p, "HF repo id, diffusers folder, or single .safetensors file(s) as ComfyUI keeps them (a "
                      "transformer/UNet file, an all-in-one checkpoint, Wan 2.2 A14B's high|low expert files) "
                      "(default: the model's base)")
    p.add_argument("--components", help="with a single-file --base: the diffusers folder or HF repo id the other "
                                        "components come from (default: the model's base repo, from the hub cache)")
    for component, (folders, examples) in FILE_COMPONENTS.items():
        p.add_argument(f"--{component.replace('_', '-')}-file", metavar="FILE",
                       help=f"the {component} from a .safetensors file of ComfyUI's models/{folders[0]} ({examples}); "
                            "the rest from --base")
    p.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                   help="CPU offload: model (whole components), sequential or group (layer by layer; least memory)")
    p.add_argument("--lora-mode", choices=LORA_MODES, help="default: the model's")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles: far less memory for large videos/images")
    p.add_argument("--compile", choices=COMPILE_MODES, default="none",
                   help="torch.compile the denoiser (regional: its repeated blocks); pays off over many steps/images")
    p.add_argument("--attention", choices=list(ATTENTION_KERNELS), default="sdpa",
                   help="attention kernel of the denoiser: sdpa lets torch pick (diffusers' default); the others force "
                        "one (sdpa_math also runs on CPU; flash_attn, flash_attn_3, sage, xformers need their package; "
                        "flash_attn_3_fp8: FlashAttention-3 in FP8, lossy, for the fast mode)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                   help="fp8: FP8 denoiser weights (torchao; CUDA GPU with compute capability 8.9+), less exact; "
                        "with --lora-mode fused the fast mode (LoRAs merged before quantizing, bf16 copy kept in "
                        "host RAM), with dynamic LoRAs run as adapters (least GPU memory); use --compile regional")
    p.add_argument("--parallel", default="none", metavar="KIND=N",
                   help="context parallelism of one generation over the processes torchrun starts: ulysses=N, ring=N "
                        "or ulysses=N,ring=M (product = --nproc-per-node), e.g. torchrun --nproc-per-node 2 -m "
                        "aitk_inference generate ... --parallel ulysses=2; ring needs --attention sdpa_cudnn, "
                        "sdpa_flash, flash_attn or sage; rank 0 writes the output")
    p.add_argument("--lora", action="append", type=_lora_arg, metavar="FILE[:STRENGTH]", help="repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--neg", help="negative prompt (only used by families with real CFG)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, help="-1 draws a random seed (default: 42)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--trigger", help="replaces [trigger] in the prompt")
    p.add_argument("--ctrl-img", action="append", metavar="FILE", help="control image (repeatable)")
    p.add_argument("--num-frames", type=int, help="video models: frame count (snapped to the model's k*n+1)")
    p.add_argument("--fps", type=int, help="video models: frames per second of the written video")
    p.add_argument("--option", action="append", type=_option_arg, metavar="NAME=VALUE",
                   help="a model-specific generation option (repeatable; its docs page lists them), e.g. "
                   "--option kv_cache=false")
    p.add_argument("--out", required=True, help="output file (.png carries the parameters; videos: .mp4 or .webp)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("reproduce", help="re-render an ai-toolkit job's sample previews")
    p.add_argument("job", help="job folder or its config.yaml")
    add_load_flags(p, "override model.name_or_path")
    p.add_argument("--lora", help="LoRA file (default: the job's newest by name)")
    p.add_argument("--model", help="model id (default: derived from the job's model.arch)")
    p.add_argument("--lora-mode", choices=LORA_MODES, help="default: fused when every sample has the same "
                   "network_multiplier, else dynamic (ai-toolkit's choice)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="none", help="the speed modes, as for generate: "
                   "their images against ai-toolkit's are what the comparison then measures")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none")
    p.add_argument("--attention", choices=list(ATTENTION_KERNELS), default="sdpa")
    p.add_argument("--out", help="output folder (default: <job>/aitk_inference_samples); with --grid, the grid image")
    p.add_argument("--grid", action="store_true", help="one labelled grid image instead: rows = checkpoints (x "
                   "strengths), columns = sample prompts, ai-toolkit's sample beside ours with the distance")
    p.add_argument("--steps", help="--grid: checkpoints: all (default), 'last N' or steps such as 500,1000")
    p.add_argument("--strengths", help="--grid: LoRA strengths such as 0.8,1.0 (default: each sample's "
                   "network_multiplier)")
    p.add_argument("--prompts", help="--grid: sample indices such as 0,2 (default: all)")
    p.add_argument("--max-batch", type=int, help="previews that share their size and settings are rendered together, "
                   "at most this many per call (default 1: one by one; batching helps small sizes and fast models, "
                   "needs more memory, and in bf16 moves images by a few levels)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("demo", help="tiny random-weight pipeline + tiny LoRA, one image, no download")
    p.add_argument("--model", default="flux")
    p.add_argument("--out", default="demo.png")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-tiny", help="write a tiny pipeline folder plus one LoRA per layout")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("serve", help="HTTP server compatible with the reference /v1 API")
    p.add_argument("--host", default=None, help="default: $HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: $PORT or 8000")
    p.add_argument("--base", action="append", metavar="ID=PATH", help="override a model's base checkpoint (repeatable)")
    p.add_argument("--ray", action="store_true",
                   help="scale out on Ray Serve: one generator replica per GPU (needs the 'ray' extra; SERVER.md)")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: how many replicas (default: one per GPU)")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: the cluster to join (default: Ray's: $RAY_ADDRESS, else one started with "
                        "'ray start' on this machine, else a new local one)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command != "models":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not args.verbose:
            _quiet_libraries()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        torch = sys.modules.get("torch")  # imported by whatever ran out of memory; never imported here for a check
        if torch is None or not isinstance(e, torch.OutOfMemoryError):
            raise
        print(f"error: out of GPU memory ({str(e).splitlines()[0]}). Ask for less: --offload auto (keeps on the GPU "
              "what fits and streams the rest), --quantize fp8, --vae-tiling, a smaller --width/--height, fewer "
              "--num-frames or a smaller --batch-size.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
