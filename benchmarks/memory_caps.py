"""A model through ``load_pipeline(offload="auto")`` on a card whose memory this process may use is capped
(``torch.cuda.set_per_process_memory_fraction``), against the uncapped run in the same process: which placement auto
chose (and how much of the transformer's blocks it kept on the GPU), the time of a 1024x1024 image with a fused
rank-16 LoRA, its peak memory. Full-size random weights (the benchmark's folder of ``--model``, written once:
FLUX.1-dev whole; Qwen-Image with its 20B transformer and VAE whole and a two-layer text encoder, see
``models.build_qwen_image_pipeline``). ``--fp8-caps``
adds runs with ``quantize="fp8"`` (FP8 block weights, quantized on the host when the bf16 weights do not fit, as many
blocks kept as fit and the rest streamed when the FP8 weights do not fit either), timed against the first bf16 run
and against the uncapped FP8 run; ``--compile regional`` compiles every run (with ``library`` streaming every
block, resident or streamed; with the diffusers ones the resident blocks, the streamed ones running eager).
``--streaming`` times each capped run with each way of streaming the blocks that do not fit, for the ratio in one
run: ``library`` (``streaming.BlockStreamer``, kept blocks spread between the streamed ones by
``accelerate.blocks_to_keep``), ``diffusers-spread`` (diffusers' group offloading with the same kept blocks; what the
library did before) and ``diffusers-first`` (the first blocks kept, before that); the diffusers ones stream bf16
weights only. GPU only:

    python3 -m aitk_inference.benchmarks.memory_caps --caps 0 24 12 --fp8-caps 0 24 12 --steps 4 --out DIR
    python3 -m aitk_inference.benchmarks.memory_caps --model qwen_image --caps 0 24 12 --fp8-caps 0 24 12 --out DIR
"""

import argparse
import gc
import time
import traceback


def keep_first_blocks(sizes: list[int], resident_bytes: int) -> list[bool]:
    """The first blocks that fit ``resident_bytes``, the rest streamed: the layout ``blocks_to_keep`` replaced."""
    keep = []
    for size in sizes:
        keep.append(all(keep) and size <= resident_bytes)
        resident_bytes -= size if keep[-1] else 0
    return keep


def diffusers_streaming(layout):
    """``accelerate.offload_blocks_keeping_resident`` as it was before ``streaming``: diffusers' block-level group
    offloading with a CUDA stream, the blocks ``layout`` keeps taken out of its hooks and its prefetch chain."""
    import torch
    from diffusers.hooks import HookRegistry, apply_group_offloading
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAYER_EXECUTION_TRACKER,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
    )

    from ..pipelines.runtime import accelerate

    def offload(denoiser, device, resident_bytes):
        registry = HookRegistry.check_if_exists_or_initialize(denoiser)
        for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
            registry.remove_hook(name, recurse=True)
        blocks = accelerate.blocks_in_order(denoiser)
        if any(type(p) is not torch.nn.Parameter for _, block in blocks for p in block.parameters()):
            raise ValueError("diffusers' group offloading streams bf16 weights only here")
        keep = layout([accelerate.module_bytes(block) for _, block in blocks], resident_bytes)
        apply_group_offloading(denoiser, onload_device=torch.device(device), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True)
        tracer = denoiser._diffusers_hook.get_hook(_LAZY_PREFETCH_GROUP_OFFLOADING)
        for (name, block), kept in zip(blocks, keep):
            if kept:
                block._diffusers_hook.remove_hook(_GROUP_OFFLOADING, recurse=False)
                block._diffusers_hook.remove_hook(_LAYER_EXECUTION_TRACKER, recurse=False)
                tracer._layer_execution_tracker_module_names.discard(name)
                block.to(device)
        return sum(keep)

    return offload


#: model id -> the harness function that writes (once) and returns its full-size random-weight folder
MODELS = {"flux": "materialize_flux", "qwen_image": "materialize_qwen_image"}


def what_is_left(most: int = 4, device_type: str = "cuda") -> dict:
    """After a dropped run left GPU memory allocated: how much of it Python's objects still reach (CUDA tensors the
    garbage collector tracks) and, for the ``most`` module classes whose largest surviving instance holds the most GPU
    bytes (its own and its children's), how many survive and what keeps the largest (``harness.referrer_path``): a
    whole component, or blocks outliving their model. ``device_type`` names the memory looked at ("cpu" to try it
    without a GPU)."""
    import warnings
    import weakref

    import torch

    from ..pipelines.runtime import accelerate
    from .harness import referrer_path

    storages, largest = {}, {}
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
        warnings.simplefilter("ignore", FutureWarning)
        for obj in gc.get_objects():
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == device_type:  # not wrappers
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            elif isinstance(obj, torch.nn.Module):
                size = sum(accelerate.tensor_bytes(tensor) for tensor in [*obj.parameters(), *obj.buffers()]
                           if tensor.device.type == device_type)
                if size:
                    name = type(obj).__name__
                    count, biggest, module = largest.get(name, (0, 0, None))
                    largest[name] = (count + 1, size, obj) if size > biggest else (count + 1, biggest, module)
    # weak references from here on: a container of ours holding a module would be the first holder found
    classes = [(name, count, size, weakref.ref(module))
               for name, (count, size, module) in sorted(largest.items(), key=lambda item: -item[1][1])[:most]]
    largest = None
    modules = {}
    for name, count, size, module in classes:
        modules[name] = {"count": count, "largest_gib": round(size / 2**30, 2),
                         "largest_kept_by": referrer_path(module())}
    return {"left_reachable_tensor_gib": round(sum(storages.values()) / 2**30, 2), "left_modules": modules}


def streaming_layout(transformer) -> dict:
    """Which of ``transformer``'s blocks stream, and their bytes a forward (two a step with true CFG). Its own
    function so that no list of the blocks outlives it: one left in the run loop's scope kept the resident blocks (and
    the streamer's slots, through the streamed blocks' hooks) on the GPU after the pipeline was dropped."""
    from ..pipelines.runtime import accelerate

    streamed = [(index, accelerate.module_bytes(block))
                for index, (_, block) in enumerate(accelerate.blocks_in_order(transformer))
                if accelerate.carries_offload_hook(block)]
    return {"streamed_blocks": [index for index, _ in streamed],
            "streamed_gib_per_forward": round(sum(size for _, size in streamed) / 2**30, 2)}


def host_to_gpu_gbps(gib: int = 2) -> float:
    """The card's copy rate from pinned host memory (GB/s, one ``gib`` copy after a warm-up): the floor of a step
    whose streamed bytes are known."""
    import torch

    host = torch.empty(gib * 2**30, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty_like(host, device="cuda")
    gpu.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    gpu.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return round(host.numel() / (time.perf_counter() - started) / 1e9, 1)


def main(argv=None) -> int:
    import torch

    from ..pipelines import load_pipeline
    from ..pipelines.lora.stack import LoraRequest
    from ..pipelines.runtime import accelerate
    from . import harness

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="flux")
    parser.add_argument("--caps", nargs="*", type=float, default=[0, 24, 12], help="GiB; 0 = the whole card")
    parser.add_argument("--fp8-caps", nargs="*", type=float, default=[], help="the same with quantize='fp8'")
    parser.add_argument("--compile", default="none", choices=["none", "regional"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=2, help="timed images per cap, after one warm-up")
    parser.add_argument("--streaming", nargs="+", default=["library"],
                        choices=["library", "diffusers-spread", "diffusers-first"],
                        help="how a capped run streams the blocks that do not fit (see the module docstring)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    library = accelerate.offload_blocks_keeping_resident
    streamings = {"library": library, "diffusers-spread": diffusers_streaming(accelerate.blocks_to_keep),
                  "diffusers-first": diffusers_streaming(keep_first_blocks)}
    folder = getattr(harness, MODELS[args.model])(harness.Options())
    total = torch.cuda.get_device_properties(0).total_memory
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "steps": args.steps, "size": 1024, "compile": args.compile, "host_to_gpu_gbps": host_to_gpu_gbps(),
              "runs": []}
    runs = [(quantize, cap, streaming) for quantize, caps in (("none", args.caps), ("fp8", args.fp8_caps))
            for cap in caps for streaming in (args.streaming[:1] if cap == 0 else args.streaming)
            if quantize == "none" or streaming == "library"]
    for quantize, cap, streaming in runs:
        torch.cuda.set_per_process_memory_fraction(1.0 if cap == 0 else cap * 2**30 / total)
        torch.cuda.reset_peak_memory_stats()
        accelerate.offload_blocks_keeping_resident = streamings[streaming]
        run = {"quantize": quantize, "cap_gib": cap or round(total / 2**30, 1), "uncapped": cap == 0}
        if cap:
            run["streaming"] = streaming
        pipeline = None
        try:
            started = time.perf_counter()
            pipeline = load_pipeline(args.model, base=folder, device="cuda", dtype="bf16", offload="auto",
                                     lora_mode="fused", quantize=quantize, compile=args.compile)
            run["load_s"] = round(time.perf_counter() - started, 1)
            run["offload_chosen"] = pipeline.offload
            if pipeline.resident:
                run["resident_gib"] = {k: round(v / 2**30, 2) for k, v in pipeline.resident.items()}
                run.update(streaming_layout(pipeline.pipe.transformer))
            lora = harness.lora_state_dict(pipeline.pipe.transformer, rank=16, seed=0, std=0.01)  # host tensors
            pipeline.set_loras([LoraRequest(state_dict=lora, strength=1.0, name="r16")])
            gen = dict(prompt="a photo of a cat", width=1024, height=1024, steps=args.steps, seed=1)
            started = time.perf_counter()
            pipeline.generate(**gen)  # warm-up (and the compile, with --compile)
            run["first_image_s"] = round(time.perf_counter() - started, 2)
            times = []
            for _ in range(args.images):
                torch.cuda.synchronize()
                started = time.perf_counter()
                pipeline.generate(**gen)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            run["image_s"] = round(sorted(times)[len(times) // 2], 2)
            run["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.OutOfMemoryError as error:
            run["error"] = f"out of memory: {str(error)[:200]}"
        except Exception as error:  # a combination that fails is a result too
            run["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            run["error_at"] = [f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.name}"
                               for frame in traceback.extract_tb(error.__traceback__)[-8:]]
        result["runs"].append(run)
        pipeline = None
        gc.collect()
        torch.cuda.empty_cache()
        run["left_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)  # what the dropped run kept
        if run["left_allocated_gib"] > 0.5:
            run.update(what_is_left())
        print(run, flush=True)
    accelerate.offload_blocks_keeping_resident = library
    base = result["runs"][0].get("image_s")
    fp8_base = next((r.get("image_s") for r in result["runs"] if r["quantize"] == "fp8" and r["uncapped"]), None)
    for run in result["runs"]:
        if base and run.get("image_s"):
            run["ratio_vs_first"] = round(run["image_s"] / base, 3)
        if fp8_base and run["quantize"] == "fp8" and run.get("image_s"):
            run["ratio_vs_uncapped_fp8"] = round(run["image_s"] / fp8_base, 3)
    harness.write_result(args.out, "memory_caps" if args.model == "flux" else f"memory_caps_{args.model}", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
