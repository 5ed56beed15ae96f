"""Timing, recording and the two benchmark procedures: the whole FLUX.1-dev pipeline through ``load_pipeline``, and
one denoiser forward per model.

Every ratio compares with the reference path measured in the same process: our ``dynamic`` LoRA mode, i.e. diffusers
plus a rank-16 PEFT LoRA injected as a live adapter on every Linear of the transformer blocks (BENCHMARKS.md).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace

from ..pipelines.atomic import atomic_path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
RECORD_KEYS = ("model", "metric", "variant", "value", "unit", "reference_value", "ratio", "notes", "card")
#: what tells two cards of one name apart (nvidia-smi's field names; its units: W, MHz)
CARD_IDENTITY = ("uuid", "pci.bus_id", "driver_version", "power.limit", "power.max_limit", "clocks.max.sm",
                 "clocks.max.memory")
#: the card's state during a timing: whether it ran at its clocks or was held back (power, heat)
CARD_LOAD = ("clocks.sm", "clocks.memory", "power.draw", "temperature.gpu", "clocks_event_reasons.active")
REFERENCE = "dynamic"
VARIANTS = ("plain", "dynamic", "fused", "fused+rope", "attention", "fused+compile", "fused+compile+fp8",
            "fused+fp8+compile", "fp8+compile", "resize")
#: the library's FP8 modes in the pipeline run -> their LoRA mode (fused: merged before quantizing; dynamic: adapters)
FP8_VARIANTS = {"fused+fp8+compile": "fused", "fp8+compile": "dynamic"}
#: the kernels the FLUX pipeline run compares (``attention`` variant); the fastest one is used for the compiled runs
ATTENTION_SWEEP = ("sdpa", "sdpa_cudnn", "sdpa_flash")
PROMPT = "a photo of a cat holding a sign that says hello world, studio lighting, 35mm film, highly detailed"


@dataclass
class Record:
    """One measured number; ``ratio`` is ``value / reference_value`` when the reference was measured; ``card``, for
    a time measured on a GPU that nvidia-smi sees, is its ``CARD_LOAD`` while it was busy since the record before
    (``CardMonitor.busy_since``: medians, the lowest SM clock, the highest power and temperature, every clock-event
    reason seen), or, where no busy sample was taken, one reading just after the measurement."""

    model: str
    metric: str
    variant: str
    value: float
    unit: str
    reference_value: float | None = None
    ratio: float | None = None
    notes: str = ""
    card: dict | None = None


@dataclass
class Recorder:
    """Collects records and rewrites the JSON file after each one, so a run cut short still leaves its results."""

    path: str
    meta: dict
    records: list = field(default_factory=list)
    monitor: CardMonitor | None = None
    since: float = field(default_factory=time.monotonic)

    def add(self, model: str, metric: str, variant: str, value: float, unit: str,
            reference_value: float | None = None, notes: str = "") -> Record:
        ratio = value / reference_value if reference_value else None
        card = (self.meta.get("card") or {}).get("uuid")
        load = None
        if card and unit in ("ms", "s"):
            load = (self.monitor and self.monitor.busy_since(self.since)) or card_state(card, CARD_LOAD)
        self.since = time.monotonic()
        record = Record(model, metric, variant, round(float(value), 6), unit,
                        None if reference_value is None else round(float(reference_value), 6),
                        None if ratio is None else round(ratio, 4), notes, load)
        self.records.append(record)
        ref = f" (ref {record.reference_value}, ratio {record.ratio})" if ratio is not None else ""
        card_text = f" [card: {', '.join(f'{k} {v}' for k, v in record.card.items())}]" if record.card else ""
        print(f"[bench] {model:13s} {metric:28s} {variant:22s} {record.value:12.4f} {unit}{ref} {notes}{card_text}",
              flush=True)
        self.write()
        return record

    def reference(self, model: str, metric: str) -> float | None:
        return self.records_value(model, metric, REFERENCE)

    def records_value(self, model: str, metric: str, variant: str) -> float | None:
        for r in self.records:
            if r.model == model and r.metric == metric and r.variant == variant:
                return r.value
        return None

    def write(self) -> None:
        payload = {**self.meta, "records": [asdict(r) for r in self.records]}
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            json.dump(payload, f, indent=1)


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
    if not device.startswith("cuda"):
        return {"device": platform.processor() or platform.machine(), "versions": versions}
    index = torch.device(device).index or 0
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    card = ((uuid and card_state(f"GPU-{uuid}", CARD_IDENTITY))
            or card_state(str(index), CARD_IDENTITY))  # the index is nvidia-smi's only where no GPU is hidden
    return {"device": torch.cuda.get_device_name(index), "versions": versions, "card": card}


def card_state(card: str, fields: tuple) -> dict | None:
    """nvidia-smi's values of ``fields`` for the GPU it knows as ``card`` (a UUID or an index; numbers as numbers),
    or None without nvidia-smi; a field this driver does not know is left out."""

    def query(names):
        try:
            done = subprocess.run(["nvidia-smi", f"--id={card}", "--query-gpu=" + ",".join(names),
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        values = [v.strip() for v in done.stdout.strip().split(",")]
        if done.returncode != 0 or len(values) != len(names):
            return None
        return dict(zip(names, map(_number_or_text, values)))

    state = query(fields)
    if state is None:  # one unknown field fails the whole query: ask for each alone
        state = {}
        for name in fields:
            state.update(query((name,)) or {})
    return state or None


class CardMonitor:
    """nvidia-smi reading the card's ``CARD_LOAD`` every ``interval_ms`` in a background process, so that a timing
    can say which clocks and power the card held while it was busy (one reading after the timing may find the card
    idle again, its clocks back up)."""

    BUSY = "utilization.gpu"

    def __init__(self, card: str, fields: tuple, interval_ms: int):
        self.fields = (self.BUSY, *fields)
        self.samples: list[tuple[float, dict]] = []
        self._process = subprocess.Popen(
            ["nvidia-smi", f"--id={card}", "--query-gpu=" + ",".join(self.fields), "--format=csv,noheader,nounits",
             "-lms", str(interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        atexit.register(self.close)

    @classmethod
    def start(cls, card: str, interval_ms: int = 100) -> CardMonitor | None:
        """A monitor of the fields this driver knows, or None without nvidia-smi or its utilization reading."""
        known = card_state(card, (cls.BUSY, *CARD_LOAD)) or {}
        if cls.BUSY not in known:
            return None
        try:
            return cls(card, tuple(f for f in CARD_LOAD if f in known), interval_ms)
        except OSError:
            return None

    def _read(self) -> None:
        for line in self._process.stdout:
            values = [v.strip() for v in line.split(",")]
            if len(values) == len(self.fields):
                self.samples.append((time.monotonic(), dict(zip(self.fields, map(_number_or_text, values)))))

    def busy_since(self, since: float, min_utilization: float = 50.0) -> dict | None:
        """The samples after ``since`` (``time.monotonic``) with the card at least ``min_utilization`` % busy."""
        busy = [s for t, s in list(self.samples) if t >= since and _at_least(s[self.BUSY], min_utilization)]
        if not busy:
            return None
        summary = {"busy_samples": len(busy)}
        numbers = {name: [s[name] for s in busy if isinstance(s[name], float)] for name in self.fields[1:]}
        for name, values in numbers.items():
            if values:
                summary[name] = statistics.median(values)
            elif name == "clocks_event_reasons.active":
                summary[name] = sorted({s[name] for s in busy})
        for name, extreme in (("clocks.sm", min), ("power.draw", max), ("temperature.gpu", max)):
            if numbers.get(name):
                summary[f"{name}.{extreme.__name__}"] = extreme(numbers[name])
        return summary

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)


def _at_least(value, bound: float) -> bool:
    return isinstance(value, float) and value >= bound


def _number_or_text(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def command_line(module: str, argv: list | None) -> str:
    """How ``python -m aitk_inference.benchmarks.<module>`` was called (``argv``, else this process's arguments), for
    a results file."""
    return f"python -m aitk_inference.benchmarks.{module} " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def new_recorder(out_dir: str, device: str, command: str, size: str) -> Recorder:
    env = environment(device)
    today = datetime.date.today().isoformat()
    path = os.path.join(out_dir, f"{today}-{device_slug(env['device'])}{'' if size == 'full' else '-' + size}.json")
    meta = {"schema": SCHEMA_VERSION, "date": today, "size": size, "command": command, "reference_path":
            "dynamic: diffusers + rank-16 PEFT LoRA as a live adapter on every block Linear", **env}
    card = (env.get("card") or {}).get("uuid")
    return Recorder(path, meta, monitor=CardMonitor.start(card) if card else None)


# ---------------------------------------------------------------------------------------------------------------- timing
def write_result(folder: str, name: str, result) -> str:
    """Write ``result`` as ``folder/name.json`` and print it (the GPU call's output shows it); returns the path."""
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return path


def referrer_path(obj, depth: int = 14, seconds: float = 60.0) -> str:
    """What keeps ``obj`` alive: the chain of referrers from a module's globals, a class or a suspended frame (a
    traceback's, a generator's) down to it (breadth first, at most ``depth`` links and ``seconds`` of search: each
    step scans the whole heap), for a report. Where no such root is found, the first chain whose top has no referrer
    the garbage collector tracks: a local variable of a running function (their frames are invisible to it) or a C
    extension's reference holds that top; else the kinds of its direct referrers."""
    import gc
    import inspect
    import types
    from collections import deque

    searching = {id(frame_info.frame) for frame_info in inspect.stack(0)[:2]}  # this function's and its caller's
    queue, seen, deadline = deque([(obj, [])]), {id(obj)}, time.perf_counter() + seconds
    untracked_holder = None
    while queue and time.perf_counter() < deadline:
        held, path = queue.popleft()
        referrers = [r for r in gc.get_referrers(held) if id(r) not in searching and r is not path]
        if not referrers and path and untracked_holder is None:
            untracked_holder = " -> ".join(reversed(path))
        for referrer in referrers:
            if id(referrer) in seen:
                continue
            seen.add(id(referrer))
            described = type(referrer).__name__ + " " + (str(list(referrer)[:6]) if isinstance(referrer, dict)
                                                         else repr(referrer)[:100].replace("\n", " "))
            if isinstance(referrer, (type, types.FrameType)) or (isinstance(referrer, dict)
                                                                  and "__builtins__" in referrer):
                return " -> ".join([described, *reversed(path)])
            if len(path) < depth:
                queue.append((referrer, [*path, described]))
        referrers = None  # else this list would be a referrer of what the next step looks at
    if untracked_holder:
        return f"held by an untracked holder (a running function's local variable?): {untracked_holder}"
    return "no chain to a root found; direct referrers: " + ", ".join(
        type(r).__name__ for r in gc.get_referrers(obj) if id(r) not in searching)


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


def fresh_compile_cache(opts: "Options") -> str:
    """Point torch.compile's on-disk cache at an empty folder, so that this run's first compile is a cold one."""
    import shutil

    folder = os.path.join(opts.workdir, "compile_cache")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


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
    attention: str = "sdpa"

    def time_left(self) -> float:
        return self.deadline - time.time()


# ---------------------------------------------------------------------------------------------------------------- transformer only
def bench_transformer(model_id: str, opts: Options, rec: Recorder) -> None:
    """One denoiser forward per variant (median), with the LoRA applied by our ``LoraStack``."""
    import torch

    from ..pipelines.runtime.accelerate import resolve_dtype
    from ..pipelines.lora.stack import LoraRequest, LoraStack
    from ..pipelines.runtime.quantize import fp8_unavailable, quantize_denoiser_fp8
    from .models import WORKLOADS, build_transformer, forward_inputs

    dtype = resolve_dtype(opts.dtype, opts.device)
    workload = WORKLOADS[opts.size][model_id]
    architecture = workload.config_key(model_id)
    started = time.perf_counter()
    model = build_transformer(architecture, opts.size, opts.device, dtype)
    inputs = forward_inputs(architecture, model, workload)
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

    def compile_and_first_forward(variant: str, notes: str):
        """Regional compile, then the first forward (which compiles); records its time and returns its output."""
        model.compile_repeated_blocks(fullgraph=True, backend=opts.compile_backend)
        sync(opts.device)
        t0 = time.perf_counter()
        out = forward()
        sync(opts.device)
        rec.add(model_id, "compile_first_call", variant, time.perf_counter() - t0, "s", notes=notes)
        return out

    # the reference first, so every later ratio has its denominator
    stack = LoraStack({"transformer": model}, "dynamic", "transformer", model_id)
    stack.set([lora])
    measure("dynamic")
    stack.set([])
    if "plain" in opts.variants:
        measure("plain")
    stack = LoraStack({"transformer": model}, "fused", "transformer", model_id)
    stack.set([lora])
    if opts.attention != "sdpa":
        from ..pipelines.runtime.accelerate import set_attention_kernel

        expected = forward()
        set_attention_kernel([model], opts.attention, opts.device, model_id)
        note += f"; attention={opts.attention}"
        rec.add(model_id, "attention_relative_error", opts.attention, relative_error(forward(), expected), "rel L2",
                notes="one forward with this kernel vs diffusers' default (sdpa), the LoRA fused, same inputs")
    if "fused" in opts.variants:
        measure("fused")
    if "fused+rope" in opts.variants:
        from ..pipelines.runtime.rope import use_fused_rope

        expected = forward()
        if use_fused_rope([model]):  # stays for the compiled variants, which trace diffusers' rotation as before
            sync(opts.device)
            t0 = time.perf_counter()
            forward()  # each input shape's first call compiles and checks the fused rotation against diffusers'
            sync(opts.device)
            rec.add(model_id, "compile_first_call", "fused+rope", time.perf_counter() - t0, "s",
                    notes="the first eager forward with the fused rotary embedding: compile (or load from the "
                    "on-disk cache) and the check")
            measure("fused+rope", "; rotary embedding fused (runtime.rope), eager")
            rec.add(model_id, "fused_rope_bitwise_equal", "fused+rope", float(torch.equal(forward(), expected)),
                    "1 = equal", notes="the eager forward with the fused rotary embedding vs diffusers' (same LoRA)")
    reference_out = None
    if "fused+compile" in opts.variants and opts.time_left() > 120:
        graphs = compiled_graphs()
        reference_out = compile_and_first_forward(
            "fused+compile", "regional compile (compile_repeated_blocks, fullgraph) + first forward")
        measure("fused+compile")
        before = compiled_graphs()
        stack.set([LoraRequest(state_dict=lora.state_dict, name=lora.name, strength=0.5)])
        forward()
        rec.add(model_id, "recompiles_after_strength_change", "fused+compile", compiled_graphs() - before, "graphs",
                notes=f"{before - graphs} graphs compiled before")
        stack.set([lora])  # back to full strength: the FP8 variant's error is measured against reference_out
    if "fused+compile+fp8" in opts.variants and opts.time_left() > 150:
        why = fp8_unavailable(opts.device)
        if why:
            print(f"[bench] {model_id}: FP8 skipped: {why}", flush=True)
        else:
            if reference_out is None:
                reference_out = forward()
            quantize_denoiser_fp8(model)
            if "fused+compile" not in opts.variants:
                model.compile_repeated_blocks(fullgraph=True, backend=opts.compile_backend)
            out = forward()
            rec.add(model_id, "fp8_relative_error", "fused+compile+fp8", relative_error(out, reference_out), "rel L2",
                    notes="one forward vs the bf16 fused model, same inputs")
            measure("fused+compile+fp8")
    if "fp8+compile" in opts.variants and opts.time_left() > 150:
        compiled_before = any(v in opts.variants for v in ("fused+compile", "fused+compile+fp8"))
        why = fp8_unavailable(opts.device) or (
            "it needs the uncompiled bf16 model: run it without fused+compile and fused+compile+fp8"
            if compiled_before else None)
        if why:
            print(f"[bench] {model_id}: fp8+compile skipped: {why}", flush=True)
        else:
            # the library's quantize="fp8": FP8 block weights, the LoRA as a live adapter next to them
            reference_out = forward()  # bf16 with the LoRA fused
            stack.set([])
            quantize_denoiser_fp8(model)
            stack = LoraStack({"transformer": model}, "dynamic", "transformer", model_id)
            stack.set([lora])
            measure("fp8")
            out = compile_and_first_forward("fp8+compile",
                                            "regional compile + first forward, FP8 weights and a LoRA adapter")
            rec.add(model_id, "fp8_relative_error", "fp8+compile", relative_error(out, reference_out), "rel L2",
                    notes="one forward vs bf16 with the LoRA fused, same inputs")
            measure("fp8+compile")
            before = compiled_graphs()
            stack.set([LoraRequest(state_dict=lora.state_dict, name=lora.name, strength=0.5)])
            sync(opts.device)
            t0 = time.perf_counter()
            forward()
            sync(opts.device)
            rec.add(model_id, "recompiles_after_strength_change", "fp8+compile", compiled_graphs() - before, "graphs",
                    notes=f"the forward after the change took {time.perf_counter() - t0:.2f} s")
    # the compiled variant measured last (they run in this order), which "resize" measures again
    last_compiled = next((v for v in ("fp8+compile", "fused+compile+fp8", "fused+compile")
                          if rec.records_value(model_id, metric, v) is not None), None)
    if "resize" in opts.variants and last_compiled and opts.time_left() > 90:
        # a user's next image at another size: torch recompiles the blocks once with dynamic shapes, which every
        # later size, this one included, then runs
        smaller = replace(workload, height=_three_quarters(workload.height), width=_three_quarters(workload.width))
        before = compiled_graphs()
        with torch.inference_mode():
            model(**forward_inputs(architecture, model, smaller))
        rec.add(model_id, "recompiles_after_size_change", last_compiled, compiled_graphs() - before, "graphs",
                notes=f"one forward at {smaller.height}x{smaller.width} latents instead of "
                f"{workload.height}x{workload.width}")
        measure(f"{last_compiled}+resize", f"; {last_compiled} measured again after that forward at another size")
    del model, inputs, stack
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()


def _three_quarters(latent_pixels: int) -> int:
    """Three quarters of a latent side, rounded down to an even number (the transformers' 2x2 patches)."""
    return max(2, latent_pixels * 3 // 4 // 2 * 2)


# ---------------------------------------------------------------------------------------------------------------- FLUX pipeline
def materialize_flux(opts: Options) -> str:
    """A local diffusers folder of FLUX.1-dev at ``opts.size`` (written once with ``save_pretrained``)."""
    if opts.size == "tiny":
        from ..tiny import tiny_model_dir

        return tiny_model_dir("flux")
    from .models import build_flux_pipeline

    return _materialize("flux1-dev-random", build_flux_pipeline, opts)


def materialize_qwen_image(opts: Options) -> str:
    """A local diffusers folder of Qwen-Image (full transformer and VAE, a two-layer text encoder of full width)."""
    from .models import build_qwen_image_pipeline

    return _materialize("qwen-image-random", build_qwen_image_pipeline, opts)


def materialize_wan22_14b(opts: Options) -> str:
    """A local diffusers folder of Wan 2.2 A14B T2V whose ``transformer_2`` folder is a link to ``transformer``
    (both experts hold the same random weights; the LoRA still differs per expert), so it takes one expert's disk."""
    from .models import build_wan22_14b_pipeline

    def finish(folder):
        os.symlink("transformer", os.path.join(folder, "transformer_2"))
        index_path = os.path.join(folder, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["transformer_2"] = index["transformer"]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)

    return _materialize("wan22-a14b-t2v-random", build_wan22_14b_pipeline, opts, finish)


def _materialize(name: str, build, opts: Options, finish=None) -> str:
    import torch

    from ..pipelines.runtime.accelerate import resolve_dtype

    folder = os.path.join(opts.workdir, name)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    started = time.perf_counter()
    pipe = build(opts.device, resolve_dtype(opts.dtype, opts.device))
    built = time.perf_counter() - started
    pipe.save_pretrained(folder)
    if finish is not None:
        finish(folder)
    print(f"[bench] {name}: built in {built:.1f}s, saved to {folder} in {time.perf_counter() - started - built:.1f}s",
          flush=True)
    del pipe
    torch.cuda.empty_cache()
    return folder


def bench_flux_pipeline(opts: Options, rec: Recorder) -> None:
    """FLUX.1-dev through ``load_pipeline``: cold load, step, end-to-end image, strength change, LoRA switch, memory,
    attention kernels, compile (cold and from the on-disk cache of another process) and FP8 weights."""
    import glob

    import torch
    from safetensors.torch import save_file

    from ..pipelines.base import AITKPipeline, load_pipeline
    from ..pipelines.runtime.accelerate import resolve_dtype
    from ..pipelines.lora.stack import LoraRequest
    from ..pipelines.runtime.quantize import fp8_unavailable
    from ..pipelines.registry import get_spec
    from .models import WORKLOADS, forward_inputs

    model = "flux"
    folder = materialize_flux(opts)
    files = sorted(glob.glob(os.path.join(folder, "*", "*.safetensors")))
    size_gib = sum(os.path.getsize(f) for f in files) / 2**30
    dropped = opts.drop_page_cache and drop_page_cache()
    raw = read_bytes(files)
    cache_note = "page cache dropped before each" if dropped else "page cache NOT dropped (warm read)"
    rec.add(model, "raw_read", "read()", raw, "s", notes=f"{size_gib:.1f} GiB of safetensors; {cache_note}")
    # the loading path before this version: every component read to the CPU, then moved
    if opts.device != "cpu":
        dropped = dropped and drop_page_cache()
        family = get_spec(model).family_class()
        started = time.perf_counter()
        pipe = family.load_diffusers_pipeline(get_spec(model), folder, resolve_dtype(opts.dtype, opts.device))
        pipe.to(opts.device)
        sync(opts.device)
        rec.add(model, "cold_load", "cpu_then_to", time.perf_counter() - started, "s", raw,
                notes=f"from_pretrained to the CPU, then .to(device); reference_value = raw read; {cache_note}")
        del pipe
        torch.cuda.empty_cache()
    dropped = dropped and drop_page_cache()
    started = time.perf_counter()
    pipeline = load_pipeline(model, base=folder, device=opts.device, dtype=opts.dtype, lora_mode="dynamic")
    sync(opts.device)
    rec.add(model, "cold_load", "load_pipeline", time.perf_counter() - started, "s", raw,
            notes=f"weights read straight onto the device (device_map); reference_value = raw read; {cache_note}")

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

    def lora_ops(p: AITKPipeline, variant: str, switch_path: str) -> None:
        """Strength change of the active LoRA, then a switch to a LoRA file never loaded before."""
        p.set_loras([LoraRequest(path=paths[0], strength=1.0)])
        graphs = compiled_graphs()
        sync(opts.device)
        t0 = time.perf_counter()
        p.set_loras([LoraRequest(path=paths[0], strength=0.6)])
        sync(opts.device)
        change = time.perf_counter() - t0
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

    def timings(p: AITKPipeline, variant: str, note: str = "") -> None:
        reset_peak(opts.device)
        e2e(p)  # warm-up (and compilation)
        seconds = statistics.median(e2e(p) for _ in range(opts.e2e_reps))
        rec.add(model, "image_e2e", variant, seconds, "s", rec.reference(model, "image_e2e"),
                notes=f"{side}x{side}, {opts.steps} steps, text encoding + denoising + VAE decode{note}")
        rec.add(model, "step", variant, step_time(p) * 1000, "ms", rec.reference(model, "step"),
                notes=f"median interval between step callbacks (synchronised){note}")
        peak = peak_memory_gib(opts.device)
        if peak is not None:
            rec.add(model, "peak_memory", variant, peak, "GiB", rec.reference(model, "peak_memory"))

    def rewrap(p: AITKPipeline, lora_mode: str) -> AITKPipeline:
        """The same loaded weights under another LoRA mode (no second copy)."""
        p.set_loras([])
        return type(p)(p.spec, p.pipe, p.device, p.dtype, p.offload, lora_mode, p.source)

    # 1. the reference path: live PEFT adapter
    pipeline.set_loras([LoraRequest(path=paths[0], strength=1.0)])
    timings(pipeline, "dynamic")
    lora_ops(pipeline, "dynamic", paths[1])
    # 2. fused: same loaded pipeline, another LoRA mode
    fused = rewrap(pipeline, "fused")
    del pipeline
    fused.set_loras([LoraRequest(path=paths[0], strength=1.0)])
    if "fused" in opts.variants:
        timings(fused, "fused")
        lora_ops(fused, "fused", paths[1])
    # 3. attention kernels, eager: the fastest is used for the compiled variants
    kernel, kernel_steps = "sdpa", {}
    if "attention" in opts.variants and opts.device.startswith("cuda"):
        for name in ATTENTION_SWEEP:
            fused.set_attention_kernel(name)
            step_time(fused)  # warm-up
            kernel_steps[name] = step_time(fused) * 1000
            rec.add(model, "step_by_attention", f"fused+{name}", kernel_steps[name], "ms",
                    kernel_steps["sdpa"], notes="eager; reference_value = the same with sdpa (diffusers' default)")
        kernel = min(kernel_steps, key=kernel_steps.get)
    fused.set_attention_kernel(kernel)
    kernel_note = f"; attention {kernel}"
    # 4. fused + regional compile: strength changes must not recompile. A fresh on-disk cache makes this compile cold.
    reference_image = reference_out = None
    transformer = fused.pipe.transformer
    probe = forward_inputs(model, transformer, WORKLOADS[opts.size][model])

    def probe_forward():
        with torch.inference_mode():
            return transformer(**probe)[0]

    if "fused+compile" in opts.variants and opts.time_left() > 150:
        cache_dir = fresh_compile_cache(opts)
        graphs = compiled_graphs()
        t0 = time.perf_counter()
        fused.compile_denoiser("regional", backend=opts.compile_backend)
        fused.generate(steps=2, **gen)
        rec.add(model, "compile_first_call", "fused+compile", time.perf_counter() - t0, "s",
                notes=f"regional compile + a 2-step generate, empty compile cache; {compiled_graphs() - graphs} "
                      f"graphs{kernel_note}")
        timings(fused, "fused+compile", kernel_note)
        lora_ops(fused, "fused+compile", paths[2])
        reference_image = fused.generate(steps=opts.steps, **gen).images
        reference_out = probe_forward()
        if opts.time_left() > 120:
            warm = compile_in_new_process(opts, folder, kernel, cache_dir)
            if warm is not None:
                rec.add(model, "compile_first_call", "fused+compile, cache from disk", warm, "s",
                        rec.records_value(model, "compile_first_call", "fused+compile"),
                        notes="the same in a new process, with the on-disk compile cache the first compile wrote; "
                              "reference_value = the cold compile above")
    # 5. FP8 weights as the library offers them (quantize="fp8"): LoRAs merged before quantizing (fused, the fast
    # mode) or as adapters next to the FP8 layers (dynamic). Quantizing cannot be undone, so one of them per run.
    fp8_variants = [(v, mode) for v, mode in FP8_VARIANTS.items() if v in opts.variants]
    for variant, _ in fp8_variants[1:]:
        print(f"[bench] flux: {variant} skipped: one FP8 variant per run ({fp8_variants[0][0]} ran)", flush=True)
    if fp8_variants and opts.time_left() > 150:
        variant, lora_mode = fp8_variants[0]
        why = fp8_unavailable(opts.device)
        if why:
            print(f"[bench] flux: FP8 skipped: {why}", flush=True)
        else:
            import numpy as np

            if reference_out is None:
                fused.set_loras([LoraRequest(path=paths[0], strength=1.0)])
                reference_image = fused.generate(steps=opts.steps, **gen).images
                reference_out = probe_forward()
            fp8 = rewrap(fused, lora_mode)
            del fused
            sync(opts.device)
            t0 = time.perf_counter()
            fp8.quantize_fp8()
            fp8.set_loras([LoraRequest(path=paths[0], strength=1.0)])
            sync(opts.device)
            rec.add(model, "fp8_quantize", variant, time.perf_counter() - t0, "s",
                    notes="quantize_fp8() (with the host master copy in fused mode) + applying the LoRA")
            if not fp8.compiled:
                t0 = time.perf_counter()
                fp8.compile_denoiser("regional", backend=opts.compile_backend)
                fp8.generate(steps=2, **gen)
                rec.add(model, "compile_first_call", variant, time.perf_counter() - t0, "s",
                        notes="regional compile of the FP8 blocks + a 2-step generate")
            how = "LoRA merged before quantizing" if lora_mode == "fused" else "LoRA as adapter"
            rec.add(model, "fp8_relative_error", variant, relative_error(probe_forward(), reference_out),
                    "rel L2", notes=f"one transformer forward vs bf16 fused, same inputs, same LoRA ({how})")
            image = fp8.generate(steps=opts.steps, **gen).images
            err = float(np.linalg.norm(image - reference_image) / np.linalg.norm(reference_image))
            rec.add(model, "fp8_image_relative_error", variant, err, "rel L2",
                    notes=f"final {opts.steps}-step image vs bf16 fused, same seed, same LoRA")
            timings(fp8, variant, f"; quantize=fp8, {how}{kernel_note}")
            lora_ops(fp8, variant, paths[1])
            fused = fp8
    del fused, transformer
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()


def compile_in_new_process(opts: Options, folder: str, kernel: str, cache_dir: str) -> float | None:
    """Seconds of regional compile + a 2-step generate in a fresh process reading ``cache_dir``, or None if it failed."""
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    command = [sys.executable, "-m", "aitk_inference.benchmarks.compile_probe", "--base", folder, "--device",
               opts.device, "--dtype", opts.dtype, "--attention", kernel, "--size", str(opts.image_size),
               "--backend", opts.compile_backend, "--lora", os.path.join(opts.workdir, "loras", f"flux_r{opts.rank}_a.safetensors")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=min(900, max(60, opts.time_left() - 30)))
    lines = [line for line in result.stdout.splitlines() if line.startswith("compile_first_call ")]
    if result.returncode != 0 or not lines:
        print(f"[bench] compile probe failed ({result.returncode}): {result.stderr[-2000:]}", flush=True)
        return None
    return float(lines[-1].split()[1])
