"""Timing, recording and the two benchmark procedures: the whole FLUX.1-dev pipeline through ``load_pipeline``, and
one denoiser forward per model.

Every ratio compares with the reference path measured in the same process: our ``dynamic`` LoRA mode, i.e. diffusers
plus a rank-16 PEFT LoRA injected as a live adapter on every Linear of the transformer blocks (BENCHMARKS.md).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RECORD_KEYS = ("model", "metric", "variant", "value", "unit", "reference_value", "ratio", "notes")
REFERENCE = "dynamic"
VARIANTS = ("plain", "dynamic", "fused", "fused+compile", "fused+compile+fp8")
PROMPT = "a photo of a cat holding a sign that says hello world, studio lighting, 35mm film, highly detailed"


@dataclass
class Record:
    """One measured number; ``ratio`` is ``value / reference_value`` when the reference was measured."""

    model: str
    metric: str
    variant: str
    value: float
    unit: str
    reference_value: float | None = None
    ratio: float | None = None
    notes: str = ""


@dataclass
class Recorder:
    """Collects records and rewrites the JSON file after each one, so a run cut short still leaves its results."""

    path: str
    meta: dict
    records: list = field(default_factory=list)

    def add(self, model: str, metric: str, variant: str, value: float, unit: str,
            reference_value: float | None = None, notes: str = "") -> Record:
        ratio = value / reference_value if reference_value else None
        record = Record(model, metric, variant, round(float(value), 6), unit,
                        None if reference_value is None else round(float(reference_value), 6),
                        None if ratio is None else round(ratio, 4), notes)
        self.records.append(record)
        ref = f" (ref {record.reference_value}, ratio {record.ratio})" if ratio is not None else ""
        print(f"[bench] {model:13s} {metric:28s} {variant:22s} {record.value:12.4f} {unit}{ref} {notes}", flush=True)
        self.write()
        return record

    def reference(self, model: str, metric: str) -> float | None:
        for r in self.records:
            if r.model == model and r.metric == metric and r.variant == REFERENCE:
                return r.value
        return None

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        payload = {**self.meta, "records": [asdict(r) for r in self.records]}
        with open(self.path + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


def environment(device: str) -> dict:
    """Device name and package versions, for the results file."""
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("diffusers", "transformers", "peft", "torchao", "safetensors"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else (platform.processor() or platform.machine())
    return {"device": name, "versions": versions}


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def new_recorder(out_dir: str, device: str, command: str, size: str) -> Recorder:
    env = environment(device)
    today = datetime.date.today().isoformat()
    path = os.path.join(out_dir, f"{today}-{device_slug(env['device'])}{'' if size == 'full' else '-' + size}.json")
    meta = {"schema": SCHEMA_VERSION, "date": today, "size": size, "command": command, "reference_path":
            "dynamic: diffusers + rank-16 PEFT LoRA as a live adapter on every block Linear", **env}
    return Recorder(path, meta)


# ---------------------------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_memory_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def relative_error(value, reference) -> float:
    value, reference = value.float(), reference.float()
    return float((value - reference).norm() / reference.norm())


def drop_page_cache() -> bool:
    """Drop the OS page cache (root on Linux only); returns whether it was dropped."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_bytes(paths) -> float:
    """Seconds to read ``paths`` once, in 64 MiB chunks (what any loader must at least spend)."""
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - started


def quantize_fp8(transformer) -> None:
    """torchao float8 dynamic activation x float8 weight (per-row scales) on every block Linear, in place."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from ..tiny.loras import BLOCK_PATTERN

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and BLOCK_PATTERN.search(name) is not None)


def fp8_unavailable(device: str) -> str | None:
    """Why the FP8 variant cannot run here, or None."""
    import importlib.util

    import torch

    if not device.startswith("cuda") or torch.cuda.get_device_capability() < (8, 9):
        return "needs a CUDA GPU with FP8 tensor cores (sm_89+)"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    return None


def lora_state_dict(transformer, rank: int, seed: int, std: float):
    """A rank-``rank`` LoRA on every block Linear (ai-toolkit's transformer_only targets), PEFT layout, bf16."""
    import torch

    from ..tiny.loras import lora_targets, make_state_dict

    sd = make_state_dict("peft", lora_targets(transformer), rank=rank, seed=seed, std=std)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


@dataclass
class Options:
    """What to run. ``size`` is ``full`` (real architectures) or ``tiny`` (the CI smoke run)."""

    size: str = "full"
    device: str = "cuda"
    dtype: str = "bf16"
    variants: tuple = VARIANTS
    rank: int = 16
    steps: int = 25
    step_timing_steps: int = 10
    image_size: int = 1024
    warmup: int = 2
    reps: int = 5
    e2e_reps: int = 2
    compile_backend: str = "inductor"
    workdir: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "aitk_bench"))
    drop_page_cache: bool = False
    deadline: float = float("inf")

    def time_left(self) -> float:
        return self.deadline - time.time()


# ---------------------------------------------------------------------------------------------------------------- transformer only
def bench_transformer(model_id: str, opts: Options, rec: Recorder) -> None:
    """One denoiser forward per variant (median), with the LoRA applied by our ``LoraStack``."""
    import torch

    from ..pipelines.base import resolve_dtype
    from ..pipelines.lora import LoraRequest, LoraStack
    from .models import WORKLOADS, build_transformer, forward_inputs

    dtype = resolve_dtype(opts.dtype, opts.device)
    workload = WORKLOADS[opts.size][model_id]
    started = time.perf_counter()
    model = build_transformer(model_id, opts.size, opts.device, dtype)
    inputs = forward_inputs(model_id, model, workload)
    params = sum(p.numel() for p in model.parameters())
    note = f"{workload.label}; {params / 1e9:.2f}B params; {workload.forwards_per_step} forward(s) per step"
    print(f"[bench] {model_id}: built in {time.perf_counter() - started:.1f}s; {note}", flush=True)
    lora = LoraRequest(state_dict=lora_state_dict(model, opts.rank, 0, 0.01 if opts.size == "full" else 0.3),
                       name=f"r{opts.rank}")
    metric = "forward_ms"

    def forward():
        with torch.inference_mode():
            return model(**inputs)[0]

    def measure(variant: str, extra: str = "") -> None:
        reset_peak(opts.device)
        seconds = timed(forward, opts.device, opts.warmup, opts.reps)
        rec.add(model_id, metric, variant, seconds * 1000, "ms", rec.reference(model_id, metric), f"{note}{extra}")
        peak = peak_memory_gib(opts.device)
        if peak is not None:
            rec.add(model_id, "peak_memory", variant, peak, "GiB", rec.reference(model_id, "peak_memory"))

    # the reference first, so every later ratio has its denominator
    stack = LoraStack({"transformer": model}, "dynamic", "transformer", model_id)
    stack.set([lora])
    measure("dynamic")
    stack.set([])
    if "plain" in opts.variants:
        measure("plain")
    stack = LoraStack({"transformer": model}, "fused", "transformer", model_id)
    stack.set([lora])
    if "fused" in opts.variants:
        measure("fused")
    reference_out = None
    if "fused+compile" in opts.variants and opts.time_left() > 120:
        graphs = compiled_graphs()
        model.compile_repeated_blocks(fullgraph=True, backend=opts.compile_backend)
        sync(opts.device)
        t0 = time.perf_counter()
        reference_out = forward()
        sync(opts.device)
        rec.add(model_id, "compile_first_call", "fused+compile", time.perf_counter() - t0, "s",
                notes="regional compile (compile_repeated_blocks, fullgraph) + first forward")
        measure("fused+compile")
        before = compiled_graphs()
        stack.set([LoraRequest(state_dict=lora.state_dict, name=lora.name, strength=0.5)])
        forward()
        rec.add(model_id, "recompiles_after_strength_change", "fused+compile", compiled_graphs() - before, "graphs",
                notes=f"{before - graphs} graphs compiled before")
    if "fused+compile+fp8" in opts.variants and opts.time_left() > 150:
        why = fp8_unavailable(opts.device)
        if why:
            print(f"[bench] {model_id}: FP8 skipped: {why}", flush=True)
        else:
            if reference_out is None:
                reference_out = forward()
            quantize_fp8(model)
            if "fused+compile" not in opts.variants:
                model.compile_repeated_blocks(fullgraph=True, backend=opts.compile_backend)
            out = forward()
            rec.add(model_id, "fp8_relative_error", "fused+compile+fp8", relative_error(out, reference_out), "rel L2",
                    notes="one forward vs the bf16 fused model, same inputs")
            measure("fused+compile+fp8")
    del model, inputs, stack
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------- FLUX pipeline
def materialize_flux(opts: Options) -> str:
    """A local diffusers folder of FLUX.1-dev at ``opts.size`` (written once with ``save_pretrained``)."""
    if opts.size == "tiny":
        from ..tiny import tiny_model_dir

        return tiny_model_dir("flux")
    import torch

    from ..pipelines.base import resolve_dtype
    from .models import build_flux_pipeline

    folder = os.path.join(opts.workdir, "flux1-dev-random")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    started = time.perf_counter()
    pipe = build_flux_pipeline(opts.device, resolve_dtype(opts.dtype, opts.device))
    built = time.perf_counter() - started
    pipe.save_pretrained(folder)
    print(f"[bench] flux: built in {built:.1f}s, saved to {folder} in {time.perf_counter() - started - built:.1f}s",
          flush=True)
    del pipe
    torch.cuda.empty_cache()
    return folder


def bench_flux_pipeline(opts: Options, rec: Recorder) -> None:
    """FLUX.1-dev through ``load_pipeline``: cold load, step, end-to-end image, strength change, LoRA switch, memory."""
    import glob

    import torch
    from safetensors.torch import save_file

    from ..pipelines.base import AITKPipeline, load_pipeline
    from ..pipelines.lora import LoraRequest
    from .models import WORKLOADS, forward_inputs

    model = "flux"
    folder = materialize_flux(opts)
    files = sorted(glob.glob(os.path.join(folder, "*", "*.safetensors")))
    size_gib = sum(os.path.getsize(f) for f in files) / 2**30
    dropped = opts.drop_page_cache and drop_page_cache()
    raw = read_bytes(files)
    dropped = dropped and drop_page_cache()
    started = time.perf_counter()
    pipeline = load_pipeline(model, base=folder, device=opts.device, dtype=opts.dtype, lora_mode="dynamic")
    sync(opts.device)
    load = time.perf_counter() - started
    cache_note = "page cache dropped before each" if dropped else "page cache NOT dropped (warm read)"
    rec.add(model, "raw_read", "read()", raw, "s", notes=f"{size_gib:.1f} GiB of safetensors; {cache_note}")
    rec.add(model, "cold_load", "load_pipeline", load, "s", raw,
            notes=f"reference_value = raw read of the same files; {cache_note}")

    # LoRA files, as ai-toolkit writes them (PEFT layout, bf16), in the page cache
    lora_dir = os.path.join(opts.workdir, "loras")
    os.makedirs(lora_dir, exist_ok=True)
    std = 0.01 if opts.size == "full" else 0.3
    paths = []
    for seed, name in ((1, "a"), (2, "b"), (3, "c")):
        path = os.path.join(lora_dir, f"{model}_r{opts.rank}_{name}.safetensors")
        save_file(lora_state_dict(pipeline.pipe.transformer, opts.rank, seed, std), path)
        paths.append(path)
    read_bytes(paths)
    side = opts.image_size
    gen = dict(prompt=PROMPT, width=side, height=side, guidance=4.0, seed=42)

    def e2e(p: AITKPipeline) -> float:
        return p.generate(steps=opts.steps, **gen).timings["total"]

    def step_time(p: AITKPipeline) -> float:
        marks = []

        def progress(step, total):
            sync(opts.device)
            marks.append(time.perf_counter())

        p.generate(steps=opts.step_timing_steps, progress=progress, **gen)
        return statistics.median(b - a for a, b in zip(marks, marks[1:]))

    def lora_ops(p: AITKPipeline, variant: str) -> None:
        """Strength change of the active LoRA, then a switch to a LoRA file never loaded before."""
        p.set_loras([LoraRequest(path=paths[0], strength=1.0)])
        graphs = compiled_graphs()
        sync(opts.device)
        t0 = time.perf_counter()
        p.set_loras([LoraRequest(path=paths[0], strength=0.6)])
        sync(opts.device)
        change = time.perf_counter() - t0
        switch_path = paths[1] if variant != "fused+compile" else paths[2]
        t0 = time.perf_counter()
        p.set_loras([LoraRequest(path=switch_path, strength=0.8)])
        sync(opts.device)
        switch = time.perf_counter() - t0
        rec.add(model, "strength_change", variant, change, "s", rec.reference(model, "strength_change"))
        rec.add(model, "lora_switch", variant, switch, "s", rec.reference(model, "lora_switch"),
                notes=f"rank {opts.rank}, file in page cache, never loaded before")
        if p.compiled:
            p.generate(steps=2, **gen)
            rec.add(model, "recompiles_after_lora_change", variant, compiled_graphs() - graphs, "graphs",
                    notes="graphs compiled by a generate after the strength change and the switch")
        p.set_loras([LoraRequest(path=paths[0], strength=1.0)])

    def timings(p: AITKPipeline, variant: str) -> None:
        reset_peak(opts.device)
        e2e(p)  # warm-up (and compilation)
        seconds = statistics.median(e2e(p) for _ in range(opts.e2e_reps))
        rec.add(model, "image_e2e", variant, seconds, "s", rec.reference(model, "image_e2e"),
                notes=f"{side}x{side}, {opts.steps} steps, text encoding + denoising + VAE decode")
        rec.add(model, "step", variant, step_time(p) * 1000, "ms", rec.reference(model, "step"),
                notes="median interval between step callbacks (synchronised)")
        peak = peak_memory_gib(opts.device)
        if peak is not None:
            rec.add(model, "peak_memory", variant, peak, "GiB", rec.reference(model, "peak_memory"))

    # 1. the reference path: live PEFT adapter
    pipeline.set_loras([LoraRequest(path=paths[0], strength=1.0)])
    timings(pipeline, "dynamic")
    lora_ops(pipeline, "dynamic")
    pipeline.set_loras([])
    # 2. fused: same loaded pipeline, another LoRA mode (no second copy of the weights)
    fused = type(pipeline)(pipeline.spec, pipeline.pipe, pipeline.device, pipeline.dtype, pipeline.offload, "fused",
                           pipeline.source)
    del pipeline
    fused.set_loras([LoraRequest(path=paths[0], strength=1.0)])
    if "fused" in opts.variants:
        timings(fused, "fused")
        lora_ops(fused, "fused")
    # 3. fused + regional compile: strength changes must not recompile
    reference_image = reference_out = None
    transformer = fused.pipe.transformer
    probe = forward_inputs(model, transformer, WORKLOADS[opts.size][model])

    def probe_forward():
        with torch.inference_mode():
            return transformer(**probe)[0]

    if "fused+compile" in opts.variants and opts.time_left() > 150:
        graphs = compiled_graphs()
        fused.compile_denoiser("regional", backend=opts.compile_backend)
        t0 = time.perf_counter()
        fused.generate(steps=2, **gen)
        rec.add(model, "compile_first_call", "fused+compile", time.perf_counter() - t0, "s",
                notes=f"regional compile + a 2-step generate; {compiled_graphs() - graphs} graphs")
        timings(fused, "fused+compile")
        lora_ops(fused, "fused+compile")
        reference_image = fused.generate(steps=opts.steps, **gen).images
        reference_out = probe_forward()
    # 4. FP8 (torchao) on top: error against the bf16 fused model
    if "fused+compile+fp8" in opts.variants and opts.time_left() > 150:
        why = fp8_unavailable(opts.device)
        if why:
            print(f"[bench] flux: FP8 skipped: {why}", flush=True)
        else:
            import numpy as np

            if reference_out is None:
                reference_image = fused.generate(steps=opts.steps, **gen).images
                reference_out = probe_forward()
            quantize_fp8(transformer)
            if not fused.compiled:
                fused.compile_denoiser("regional", backend=opts.compile_backend)
            rec.add(model, "fp8_relative_error", "fused+compile+fp8", relative_error(probe_forward(), reference_out),
                    "rel L2", notes="one transformer forward vs bf16 fused, same inputs")
            image = fused.generate(steps=opts.steps, **gen).images
            err = float(np.linalg.norm(image - reference_image) / np.linalg.norm(reference_image))
            rec.add(model, "fp8_image_relative_error", "fused+compile+fp8", err, "rel L2",
                    notes=f"final {opts.steps}-step image vs bf16 fused, same seed")
            timings(fused, "fused+compile+fp8")
    del fused, transformer
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
