"""Re-render an ai-toolkit job's sample previews and measure how close they come to the job's own ``samples/``.

:func:`reproduce_job` reads the job (``jobs.config``), loads the model with the job's LoRA (merged when every sample
shares one multiplier, as ai-toolkit's ``merge_in`` does, live otherwise), renders each preview with
:func:`~aitk_inference.pipelines.load_pipeline`, ``set_loras`` and ``generate``, saves it under ai-toolkit's name
(``<job name>__<step:09d>_<i>.png``) and, where the job has its own preview for the same (step, index), reports the
difference in 8-bit levels and PSNR and writes a side-by-side sheet (an audio preview: its first channel, as
ai-toolkit saves it, compared in 16-bit levels). Previews that share every setting but their
prompt, negative and seed are rendered together (:func:`batch_previews`, at most ``max_batch`` per call).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

from .config import find_previews, lora_step, newest_lora, read_job, resolve_job_path, with_expert_sibling

logger = logging.getLogger(__name__)


def job_side_loras(training, spec) -> list:
    """The LoRAs a job's model section adds beside the trained one: ai-toolkit's unconditional LoRA
    (``model.unconditional_lora_path``), at strength 1 on the unconditional pass only. A ``owner/repo/file`` hub path
    is downloaded as ai-toolkit does."""
    from ..lora.stack import LoraRequest
    from ..registry import UNCONDITIONAL_LORA_SIDE

    path = training.unconditional_lora
    if path is None:
        return []
    if UNCONDITIONAL_LORA_SIDE not in spec.lora_pass_sides:
        raise ValueError(f"{training.config_path!r} sets model.unconditional_lora_path, which {spec.model_id} has no "
                         "unconditional pass for (ai-toolkit reads it for Ideogram 4 only).")
    if not os.path.isfile(path) and len(path.split("/")) == 3:
        from huggingface_hub import hf_hub_download

        owner, repo, filename = path.split("/")
        path = hf_hub_download(f"{owner}/{repo}", filename)
    return [LoraRequest(path=path, strength=1.0, side=UNCONDITIONAL_LORA_SIDE)]


@dataclass(frozen=True)
class Difference:
    """Two images (8-bit levels) or waveforms (16-bit levels, 1/32768 of full scale) compared: max and mean absolute
    difference in ``unit`` and PSNR (dB, full scale)."""

    max_abs: int
    mean_abs: float
    psnr: float
    unit: str = "levels"


@dataclass(frozen=True)
class ReproducedSample:
    """One re-rendered preview: where it went, the effective parameters, and the comparison with ai-toolkit's
    (``compare`` over the whole image or video; ``frame_compare`` one entry per frame)."""

    file: str
    index: int
    prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    network_multiplier: float
    preview: str | None = None
    compare: Difference | None = None
    frame_compare: tuple[Difference, ...] = ()


@dataclass(frozen=True)
class ReproduceReport:
    """What :func:`reproduce_job` did: the model, base, LoRA file and step, the LoRA mode, one row per preview, and
    how the previews were rendered (at most ``max_batch`` per call, ``calls`` calls, ``render_seconds`` in them)."""

    config: str
    model: str
    base: str
    lora: str
    step: int
    lora_mode: str
    out_dir: str
    samples: list[ReproducedSample] = field(default_factory=list)
    sheet: str | None = None
    max_batch: int = 1
    calls: int = 0
    render_seconds: float = 0.0

    @property
    def images_per_minute(self) -> float:
        """Previews rendered per minute (``generate`` calls only: the model load and the file writing excluded)."""
        return 60.0 * len(self.samples) / self.render_seconds if self.render_seconds else 0.0


def _difference(ours, theirs, full_scale: float, unit: str) -> Difference:
    import numpy as np

    diff = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return Difference(max_abs=int(diff.max()), mean_abs=float(diff.mean()),
                      psnr=math.inf if mse == 0.0 else 10.0 * math.log10(full_scale ** 2 / mse), unit=unit)


def compare_images(ours, theirs) -> Difference:
    """Difference of two uint8 RGB arrays in 8-bit levels: max and mean absolute difference and PSNR (dB)."""
    return _difference(ours, theirs, 255.0, "levels")


def read_frames(path: str) -> list:
    """Every frame of an image, animated WEBP or MP4 file as uint8 RGB arrays (one for a still image)."""
    import numpy as np
    from PIL import Image, ImageSequence

    if path.lower().endswith(".mp4"):
        import av

        with av.open(path) as container:
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    with Image.open(path) as im:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(im)]


def read_audio(path: str):
    """An audio file's samples in 16-bit levels, ``[channels, samples]`` int32 (a float stream scaled by 32768)."""
    import av
    import numpy as np

    with av.open(path) as container:
        planar = av.AudioResampler(format="fltp")  # one row per channel, float in -1..1
        chunks = [resampled.to_ndarray() for frame in container.decode(audio=0) for resampled in planar.resample(frame)]
        chunks += [resampled.to_ndarray() for resampled in planar.resample(None)]
    return np.rint(np.concatenate(chunks, axis=-1).astype(np.float64) * 32768.0).astype(np.int32)


def compare_audio(ours, theirs) -> Difference:
    """Difference of two ``[channels, samples]`` waveforms in 16-bit levels (:func:`read_audio`)."""
    return _difference(ours, theirs, 32768.0, "16-bit levels")


def write_audio_preview(audio, path_stem: str, preview: str | None, sample_rate: int) -> str:
    """Write an audio preview as ai-toolkit saves it: the first channel only (its ``save_image`` hands
    ``torchaudio.save`` the waveform's first row), as WAV when its own preview is a WAV, else as lossless FLAC (our
    writer has no MP3 encoder; ai-toolkit's default audio previews are MP3)."""
    from ..media import AUDIO_CODECS, write_audio

    ext = os.path.splitext(preview)[1].lower() if preview else ""
    return write_audio(audio[:1], path_stem + (ext if ext in AUDIO_CODECS else ".flac"), sample_rate)


def write_sheet(rows: list[tuple[str, object, object]], path: str) -> str:
    """A PNG with one row per compared sample: ai-toolkit's preview, ours, and |difference| x4."""
    import numpy as np
    from PIL import Image, ImageDraw

    label_h, gap = 14, 4
    cells = []
    for label, ours, theirs in rows:
        diff = np.clip(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
        cells.append((label, [theirs, ours, diff]))
    width = max(sum(a.shape[1] for a in arrays) + gap * 2 for _, arrays in cells)
    height = sum(label_h + max(a.shape[0] for a in arrays) + gap for _, arrays in cells) + label_h
    sheet = Image.new("RGB", (max(width, 240), height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), "ai-toolkit | aitk-inference | |diff| x4", fill=(0, 0, 0))
    y = label_h
    for label, arrays in cells:
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        y += label_h
        x = 0
        for array in arrays:
            sheet.paste(Image.fromarray(array), (x, y))
            x += array.shape[1] + gap
        y += max(a.shape[0] for a in arrays) + gap
    sheet.save(path)
    return path


def job_base(training, base: str | None = None) -> str:
    """The base to load: ``base`` when given (a relative path resolves against the job folder), else the job's
    ``model.name_or_path``."""
    source = resolve_job_path(base, training.folder) if base else training.base
    if not source:
        raise ValueError(f"{training.config_path!r} has no model.name_or_path; pass --base PATH_OR_REPO.")
    return source


def job_lora_mode(samples) -> str:
    """ai-toolkit merges the LoRA when every sample shares one multiplier, and runs it live otherwise."""
    return "fused" if len({s.network_multiplier for s in samples}) == 1 else "dynamic"


def checkpoint_loras(files, strength: float, extra_loras=()) -> list:
    """The LoRA set of one job checkpoint (both files of a two-expert save) at ``strength``, plus the job's side LoRAs."""
    from ..lora.stack import LoraRequest

    return [LoraRequest(path=path, strength=strength) for path in files] + list(extra_loras)


def sample_inputs(pipeline, training, sample) -> tuple[dict, tuple]:
    """One preview's ``generate`` keyword arguments besides its prompt, negative, seed and control images (its
    resolved size, steps and guidance, the family's sample fields, the job's model options, frames), and its control
    image paths."""
    spec = pipeline.spec
    paths = []
    if spec.control_images[1] == 1 and sample.ctrl_img:
        paths = [resolve_job_path(sample.ctrl_img, training.folder)]
    elif spec.control_images[1] > 1 and sample.ctrl_imgs:
        paths = [resolve_job_path(p, training.folder) for p in sample.ctrl_imgs]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Sample {sample.index}: control image {path!r} does not exist.")
    kwargs = {name: getattr(sample, name) for name in pipeline.sample_options}
    if sample.guidance_rescale and "guidance_rescale" not in pipeline.sample_options:
        logger.warning("Sample %d: guidance_rescale %s has no effect for %s (ai-toolkit's previews use it for "
                       "SDXL only).", sample.index, sample.guidance_rescale, spec.model_id)
    kwargs.update(pipeline.job_options(training.process["model"]))
    if spec.is_video:
        kwargs.update(num_frames=sample.num_frames, fps=sample.fps)
    kwargs.update(width=sample.width, height=sample.height, steps=sample.steps, guidance=sample.guidance)
    return kwargs, tuple(paths)


def render_sample(pipeline, training, sample):
    """Render one of the job's previews with the pipeline's current LoRAs: its control images, its resolved
    values, the job's model options. Returns the :class:`GenerationResult`."""
    kwargs, paths = sample_inputs(pipeline, training, sample)
    controls = pipeline.control_inputs(list(paths)) if paths else {}
    return pipeline.generate(prompt=sample.prompt, negative=sample.negative, seed=sample.seed, **controls, **kwargs)


#: previews rendered in one pipeline call at most (``--max-batch``): one by one by default, since on a GPU at full
#: size a batch gains little (FLUX.1-dev 1024px on an H100: 1.4% for batches of 4) and its bf16 kernels round each
#: image differently (up to 9 levels off its one-by-one render); batching pays for small sizes and fast models
DEFAULT_MAX_BATCH = 1


@dataclass(frozen=True)
class PreviewBatch:
    """Previews that share every setting but their prompt, negative and seed, rendered in one ``generate`` call."""

    samples: tuple
    network_multiplier: float
    controls: tuple  # the control image paths
    options: dict  # the other shared ``generate`` keyword arguments (size, steps, guidance, family options...)


def _frozen(value):
    """A hashable stand-in for a ``generate`` keyword value (lists, tuples and dicts nested)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    return value


def batch_previews(pipeline, samples, options: list[dict], controls: list[tuple], max_batch: int) -> list[PreviewBatch]:
    """Group the previews that one call can render: the same LoRA multiplier, control images (``controls[i]``: sample
    i's paths) and other ``generate`` options (``options[i]``), in the job's order, at most ``max_batch`` per call. A
    family without ``batches_distinct_prompts`` groups only previews that share their prompt and negative as well
    (in practice: one by one)."""
    groups: dict = {}  # key -> (the shared options, the samples)
    for sample, kwargs, paths in zip(samples, options, controls, strict=True):
        key = (sample.network_multiplier, paths, _frozen(kwargs))
        if not pipeline.batches_distinct_prompts:
            key += (sample.prompt, sample.negative)
        groups.setdefault(key, (kwargs, []))[1].append(sample)
    return [PreviewBatch(samples=tuple(members[start:start + max_batch]), network_multiplier=key[0], controls=key[1],
                         options=kwargs)
            for key, (kwargs, members) in groups.items() for start in range(0, len(members), max_batch)]


def reproduce_job(
    job: str,
    base: str | None = None,
    lora: str | None = None,
    out_dir: str | None = None,
    device: str | None = None,
    dtype=None,
    model: str | None = None,
    lora_mode: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    compile: str | None = None,
    quantize: str | None = None,
    attention: str | None = None,
) -> ReproduceReport:
    """Re-render an ai-toolkit job's sample previews and compare them with the job's own.

    Previews that share their size and every other setting but the prompt, negative and seed are rendered together,
    up to ``max_batch`` per call, each with its own seed and prompt (equal to its one-by-one render within the
    family's batch tolerance, see BENCHMARKS.md "Previews in bulk").

    Args:
        job (str): the job folder or its ``config.yaml``.
        base (str, *optional*): base checkpoint; defaults to the job's ``model.name_or_path`` (a relative path
            resolves against the job folder).
        lora (str, *optional*): LoRA file; defaults to the job's newest by name.
        out_dir (str, *optional*): where our images go; defaults to ``<job>/aitk_inference_samples``.
        device (str, *optional*), dtype (str, *optional*): as for ``load_pipeline``.
        model (str, *optional*): model id; defaults to the one matching ``model.arch``.
        lora_mode (str, *optional*): ``fused`` or ``dynamic``; defaults to ai-toolkit's choice for the job
            (:func:`job_lora_mode`).
        max_batch (int, defaults to 1): previews per pipeline call at most; 1 renders one by one.
        compile (str, *optional*), quantize (str, *optional*), attention (str, *optional*): the speed options of
            ``load_pipeline`` (the defaults are the parity mode's: no compile, no FP8, ``sdpa``).

    Returns:
        ReproduceReport: one :class:`ReproducedSample` per preview (in the job's order), compared with ai-toolkit's
        image for the same step and index where the job has one, and the side-by-side sheet (or None).
    """
    import numpy as np

    from .. import load_pipeline
    from ..base import MAX_BATCH, to_pil_rgb
    from ..media import write_image, write_mp4, write_webp
    from ..registry import get_spec

    # 1. Validate and read the job
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
        raise ValueError(f"`max_batch` must be an integer in 1..{MAX_BATCH}, got {max_batch!r}.")
    training = read_job(job)
    spec = get_spec(model or training.model_id)
    source = job_base(training, base)
    lora_path = os.path.abspath(os.path.expanduser(lora)) if lora else newest_lora(training.folder, training.name)
    if not os.path.isfile(lora_path):
        raise FileNotFoundError(f"LoRA file {lora_path!r} does not exist.")
    step = lora_step(lora_path, training.process)

    # 2. Resolve the samples
    samples = training.samples()
    for sample in samples:
        if sample.unused_flags:
            logger.warning("Sample %d: prompt flags %s have no effect for %s.", sample.index,
                           sorted(sample.unused_flags), spec.model_id)
    lora_mode = lora_mode or job_lora_mode(samples)

    # 3. Load the pipeline
    pipeline = load_pipeline(spec.model_id, base=source, device=device, dtype=dtype, lora_mode=lora_mode,
                             compile=compile, quantize=quantize, attention=attention)
    out_dir = os.path.abspath(out_dir or os.path.join(training.folder, "aitk_inference_samples"))
    os.makedirs(out_dir, exist_ok=True)
    previews = find_previews(training.folder)
    prefix = training.name or "sample"
    extra_loras = job_side_loras(training, spec)

    # 4. Each sample's generate options, then the batches of samples that share them
    options, controls = [], []
    for sample in samples:
        kwargs, paths = sample_inputs(pipeline, training, sample)
        options.append(kwargs)
        controls.append(paths)
    batches = batch_previews(pipeline, samples, options, controls, max_batch)

    rows, sheet_rows, render_seconds = {}, {}, 0.0
    for batch in batches:
        # 5. Apply the LoRA at this batch's multiplier (an in-place change after the first)
        pipeline.set_loras(checkpoint_loras(with_expert_sibling(lora_path), batch.network_multiplier, extra_loras))
        # 6. Run: one image per sample, each with its own prompt, negative and seed
        members = batch.samples
        texts = ({"prompt": members[0].prompt, "negative": members[0].negative, "seed": members[0].seed}
                 if len(members) == 1 else
                 {"prompt": [s.prompt for s in members], "negative": [s.negative for s in members],
                  "seed": [s.seed for s in members]})
        started = time.perf_counter()
        controls = pipeline.control_inputs(list(batch.controls)) if batch.controls else {}
        result = pipeline.generate(**texts, **controls, **batch.options)
        render_seconds += time.perf_counter() - started
        if len(members) > 1:
            logger.info("Samples %s rendered in one call (%.2fs).", [s.index for s in members],
                        result.timings["total"])
        p = result.params
        for i, sample in enumerate(members):
            # 7. Save and compare
            if result.is_audio:
                preview, difference = previews.get((step, sample.index)), None
                stem = os.path.join(out_dir, f"{prefix}__{step:09d}_{sample.index}")
                path = write_audio_preview(result.audio[i], stem, preview, result.sample_rate)
                if preview is not None:
                    ours, theirs = read_audio(path), read_audio(preview)
                    if ours.shape == theirs.shape:
                        difference = compare_audio(ours, theirs)
                    else:  # e.g. an MP3's encoder padding
                        logger.warning("Sample %d: ai-toolkit's preview decodes to %s samples x channels, ours to %s; "
                                       "not compared.", sample.index, theirs.shape[::-1], ours.shape[::-1])
                rows[sample.index] = ReproducedSample(
                    file=path, index=sample.index, prompt=p.prompts[i], width=p.width, height=p.height,
                    seed=p.seeds[i], steps=p.steps, guidance=p.guidance, network_multiplier=sample.network_multiplier,
                    preview=preview, compare=difference)
                continue
            # ai-toolkit's video models return a one-frame sample as a still image, saved as an image preview
            is_video = result.is_video and result.images.shape[1] > 1
            video_format = spec.video.preview_format if is_video else None
            filename = f"{prefix}__{step:09d}_{sample.index}." + (video_format or "png")
            path = os.path.join(out_dir, filename)
            metadata = {**result.metadata(i), "ai_toolkit_step": step, "ai_toolkit_index": sample.index}
            if video_format == "mp4":  # as LTX-2 writes them: the encoder's default quality, with the audio track
                audio = result.audio[i] if result.audio is not None else None
                write_mp4(result.images[i], path, p.fps, audio=audio, sample_rate=result.sample_rate, crf=None)
            elif video_format == "webp":
                write_webp(result.images[i], path, p.fps)  # ai-toolkit's trainer writes animated WEBP
            else:
                write_image(to_pil_rgb(result.images[i][0]) if result.is_video else result.to_pil()[i], path,
                            metadata)
            preview, difference, per_frame = previews.get((step, sample.index)), None, ()
            if preview is not None:
                # a video is compared as written: both files decoded, frame by frame
                ours = np.stack(read_frames(path))
                theirs = np.stack(read_frames(preview))
                if theirs.shape != ours.shape:
                    logger.warning("Sample %d: ai-toolkit's preview is %d frame(s) of %dx%d, ours %d of %dx%d; not "
                                   "compared.", sample.index, theirs.shape[0], theirs.shape[2], theirs.shape[1],
                                   ours.shape[0], ours.shape[2], ours.shape[1])
                else:
                    difference = compare_images(ours, theirs)
                    if is_video:
                        per_frame = tuple(compare_images(a, b) for a, b in zip(ours, theirs))
                    sheet_rows[sample.index] = (f"#{sample.index} step {step} seed {p.seeds[i]}", ours[0], theirs[0])
            rows[sample.index] = ReproducedSample(
                file=path, index=sample.index, prompt=p.prompts[i], width=p.width, height=p.height, seed=p.seeds[i],
                steps=p.steps, guidance=p.guidance, network_multiplier=sample.network_multiplier, preview=preview,
                compare=difference, frame_compare=per_frame)

    order = [sample.index for sample in samples]
    sheet_rows = [sheet_rows[index] for index in order if index in sheet_rows]
    sheet = write_sheet(sheet_rows, os.path.join(out_dir, f"{prefix}__{step:09d}_sheet.png")) if sheet_rows else None
    return ReproduceReport(config=training.config_path, model=spec.model_id, base=source, lora=lora_path, step=step,
                           lora_mode=lora_mode, out_dir=out_dir, samples=[rows[index] for index in order],
                           sheet=sheet, max_batch=max_batch, calls=len(batches), render_seconds=render_seconds)
