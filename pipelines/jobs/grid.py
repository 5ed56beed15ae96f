"""A training job's previews for several checkpoints as one labelled grid: the picture a trainer picks a checkpoint by.

Rows are the job's checkpoints (times the strengths asked for), columns its sample prompts. Each cell is our render of
that preview (:func:`~.reproduce.render_sample`, the one ``reproduce`` uses) with ai-toolkit's own saved sample for the
same step and index beside it when the job folder has it, and under them the distance ``reproduce`` reports
(:func:`~.reproduce.compare_images`) when the two were made at the same strength. One pipeline renders the whole grid:
the checkpoints are switched with ``set_loras``, the base is never reloaded. It runs its LoRAs live (``dynamic``), so
that every switch leaves the base weights untouched and each cell equals a render of its checkpoint alone; merged
(``fused``) switching would round the weights once per change and drift over many checkpoints. ``reproduce`` merges
when a job's samples share one multiplier (ai-toolkit's choice): its images can then differ from the grid's by a level.

The selections are text, the same for the ComfyUI node and the CLI: checkpoints ``all``, ``last N`` or steps
``500, 1000``; strengths ``0.8, 1.0`` (empty: each sample's own ``network_multiplier``); prompts ``0, 2`` (indices of
the job's samples; empty: all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..lora import check_strength
from .config import JobCheckpoint, SampleSpec, TrainingJob, find_previews, job_checkpoints, read_job
from .reproduce import (Difference, checkpoint_loras, compare_images, job_base, job_side_loras,
                        read_frames, render_sample)

#: the LoRA mode the grid loads its pipeline with (see the module docstring)
GRID_LORA_MODE = "dynamic"
_LAST_N = re.compile(r"^last\s+(\d+)$", re.IGNORECASE)
#: white space between cells, and between our image and ai-toolkit's
CELL_PADDING, PAIR_GAP = 8, 4
#: space between a cell's images and its label
LABEL_GAP = 2


def _numbers(text: str, what: str, convert: Callable[[str], Any], example: str) -> list:
    items = [item for item in re.split(r"[,\s]+", text.strip()) if item]
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a list of numbers; write e.g. {example!r}.") from None


def check_image_model(spec) -> None:
    """The grid shows images: a video or audio model's job is refused, naming what to use instead."""
    if spec.is_video or spec.audio_only:
        raise ValueError(f"{spec.model_id} makes {'videos' if spec.is_video else 'audio'}: the previews grid is for "
                         "image models. Use `reproduce` (without --grid) to re-render and compare its previews.")


def select_checkpoints(checkpoints: list[JobCheckpoint], which: str = "all") -> list[JobCheckpoint]:
    """``all``, ``last N`` or a list of steps (``"500, 1000"``), out of the job's checkpoints (oldest first)."""
    which = (which or "all").strip()
    steps = ", ".join(str(c.step) for c in checkpoints)
    if which.lower() == "all":
        return list(checkpoints)
    last = _LAST_N.match(which)
    if last:
        count = int(last.group(1))
        if count < 1:
            raise ValueError(f"checkpoints {which!r}: N must be at least 1.")
        return list(checkpoints[-count:])
    by_step = {c.step: c for c in checkpoints}
    wanted = _numbers(which, "checkpoints", int, "all, last 3 or 500, 1000")
    missing = [step for step in wanted if step not in by_step]
    if missing:
        raise ValueError(f"step(s) {', '.join(map(str, missing))} are not checkpoints of this job; it has steps {steps}.")
    return [by_step[step] for step in dict.fromkeys(wanted)]


def parse_strengths(text: str) -> list[float]:
    """LoRA strengths (``"0.8, 1.0"``); empty: none given (each sample then uses the job's ``network_multiplier``)."""
    values = _numbers(text or "", "strengths", float, "0.8, 1.0")
    return [check_strength(value, "strength") for value in dict.fromkeys(values)]


def select_samples(samples: list[SampleSpec], text: str = "") -> list[SampleSpec]:
    """The job's samples by index (``"0, 2"``); empty: all of them."""
    wanted = _numbers(text or "", "prompts", int, "0, 2")
    if not wanted:
        return list(samples)
    missing = [index for index in wanted if not 0 <= index < len(samples)]
    if missing:
        raise ValueError(f"prompt index(es) {', '.join(map(str, missing))} are not samples of this job; it has "
                         f"{len(samples)} (indices 0..{len(samples) - 1}).")
    return [samples[index] for index in dict.fromkeys(wanted)]


def difference_lines(compare: Difference) -> list[str]:
    """The distance as ``reproduce`` prints it, in two lines (a grid cell is narrow)."""
    return [f"max {compare.max_abs} mean {compare.mean_abs:.3f} {compare.unit}", f"PSNR {compare.psnr:.2f} dB"]


@dataclass(frozen=True)
class GridCell:
    """One cell: the checkpoint step, the strength it ran at, the sample index, our image and ai-toolkit's (uint8 RGB
    arrays), the distance (None when there is no saved sample of that step, or it was made at another strength),
    and where the two images lie in the grid (``(left, top, right, bottom)``)."""

    step: int
    strength: float
    index: int
    ours: Any
    theirs: Any = None
    compare: Difference | None = None
    ours_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    theirs_box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class JobGrid:
    """The grid image (PIL RGB) and its cells, row by row (checkpoint, then strength), then column by column."""

    image: Any
    rows: list[tuple[int, float | None]]
    columns: list[int]
    cells: list[GridCell]


def render_job_grid(
    pipeline,
    training: TrainingJob,
    checkpoints: list[JobCheckpoint],
    strengths: list[float] = (),
    samples: list[SampleSpec] | None = None,
    extra_loras: list = (),
    progress: Callable[[int, int], None] | None = None,
) -> JobGrid:
    """Render ``samples`` (default: all of the job's) for every checkpoint and strength, and draw the grid.

    Args:
        pipeline (AITKPipeline): the loaded pipeline of the job's model (its LoRAs are replaced).
        training (TrainingJob): the job (:func:`~.config.read_job`).
        checkpoints (list[JobCheckpoint]): the rows, in order (:func:`select_checkpoints`).
        strengths (list[float], defaults to ()): each checkpoint gets one row per strength; empty: one row, each
            sample at its own ``network_multiplier``.
        samples (list[SampleSpec], *optional*): the columns (:func:`select_samples`).
        extra_loras (list, defaults to ()): the job's side LoRAs (:func:`~.reproduce.job_side_loras`).
        progress (callable, *optional*): ``progress(cells_done, cells_total)`` after each cell.
    """
    import numpy as np

    check_image_model(pipeline.spec)
    if not checkpoints:
        raise ValueError("No checkpoint chosen for the previews grid.")
    samples = list(training.samples() if samples is None else samples)
    previews = find_previews(training.folder)
    rows = [(c.step, strength) for c in checkpoints for strength in (strengths or [None])]
    files = {c.step: c.files for c in checkpoints}
    total, rendered = len(rows) * len(samples), []
    for step, strength in rows:
        for sample in samples:
            multiplier = sample.network_multiplier if strength is None else strength
            pipeline.set_loras(checkpoint_loras(files[step], multiplier, extra_loras))
            ours = np.asarray(render_sample(pipeline, training, sample).to_pil()[0].convert("RGB"))
            preview = previews.get((step, sample.index))
            theirs = read_frames(preview)[0] if preview else None
            compare = None
            if theirs is not None and theirs.shape == ours.shape and multiplier == sample.network_multiplier:
                compare = compare_images(ours, theirs)
            rendered.append(GridCell(step=step, strength=multiplier, index=sample.index, ours=ours, theirs=theirs,
                                     compare=compare))
            if progress is not None:
                progress(len(rendered), total)
    image, cells = draw_grid(rows, samples, rendered)
    return JobGrid(image=image, rows=rows, columns=[s.index for s in samples], cells=cells)


def grid_cell_count(training: TrainingJob, available: list[JobCheckpoint], checkpoints: str = "all",
                    strengths: str = "", prompts: str = "") -> int:
    """How many cells the selections give; checking them, so that a bad one fails before any model loads."""
    return (len(select_checkpoints(available, checkpoints)) * max(1, len(parse_strengths(strengths)))
            * len(select_samples(training.samples(), prompts)))


def job_grid(pipeline, training: TrainingJob, available: list[JobCheckpoint], checkpoints: str = "all",
             strengths: str = "", prompts: str = "", progress: Callable[[int, int], None] | None = None) -> JobGrid:
    """:func:`render_job_grid` with the selections given as text (the node's and the CLI's inputs), out of the
    ``available`` checkpoints (:func:`~.config.job_checkpoints`)."""
    chosen = select_checkpoints(available, checkpoints)
    return render_job_grid(pipeline, training, chosen, parse_strengths(strengths),
                           select_samples(training.samples(), prompts), job_side_loras(training, pipeline.spec),
                           progress=progress)


def reproduce_grid(job: str, base: str | None = None, checkpoints: str = "all", strengths: str = "",
                   prompts: str = "", device: str | None = None, dtype=None, model: str | None = None) -> JobGrid:
    """Load the job's model once and render its previews grid (``python -m aitk_inference reproduce JOB --grid``).

    Args:
        job (str): the job folder or its ``config.yaml``.
        base (str, *optional*): overrides ``model.name_or_path``.
        checkpoints, strengths, prompts (str): the selections (see the module docstring).
        device, dtype, model: as for :func:`~.reproduce.reproduce_job`.
    """
    from .. import load_pipeline
    from ..registry import get_spec

    training = read_job(job)
    spec = get_spec(model or training.model_id)
    check_image_model(spec)
    available = job_checkpoints(training.folder, training.name, training.process)
    grid_cell_count(training, available, checkpoints, strengths, prompts)
    pipeline = load_pipeline(spec.model_id, base=job_base(training, base), device=device, dtype=dtype,
                             lora_mode=GRID_LORA_MODE)
    return job_grid(pipeline, training, available, checkpoints, strengths, prompts)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _cell_lines(cell: GridCell, sample: SampleSpec) -> list[str]:
    if cell.theirs is None:
        return ["no ai-toolkit sample", "for this step"]
    if cell.compare is None:
        if cell.strength != sample.network_multiplier:
            return [f"ai-toolkit's at {sample.network_multiplier:g}", "not compared"]
        return ["sizes differ", "not compared"]
    return difference_lines(cell.compare)


def draw_grid(rows: list, samples: list[SampleSpec], rendered: list[GridCell]):
    """Lay the rendered cells out (row labels left, prompt headers on top, each cell's distance under its images) and
    return the PIL image and the cells with their boxes."""
    import dataclasses

    from PIL import Image, ImageDraw

    tallest = max(max(c.ours.shape[0], 0 if c.theirs is None else c.theirs.shape[0]) for c in rendered)
    font_size = max(11, min(28, tallest // 20))
    font = _font(font_size)
    line = font_size + 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = len(samples)
    grid_cells = [rendered[r * columns:(r + 1) * columns] for r in range(len(rows))]
    by_index = {s.index: s for s in samples}

    def pair_size(cell):
        width, height = cell.ours.shape[1], cell.ours.shape[0]
        if cell.theirs is not None:
            width += PAIR_GAP + cell.theirs.shape[1]
            height = max(height, cell.theirs.shape[0])
        return width, height

    label_lines = max(len(_cell_lines(cell, by_index[cell.index])) for cell in rendered)
    col_w = [max(max(pair_size(row[j])[0], *(measure.textlength(t, font=font)
                                              for t in _cell_lines(row[j], samples[j]))) for row in grid_cells)
             for j in range(columns)]
    col_w = [int(w) + 1 for w in col_w]
    row_h = [max(pair_size(cell)[1] for cell in row) + LABEL_GAP + label_lines * line for row in grid_cells]

    def row_label(step, strength):
        return [f"step {step}", "job's strength" if strength is None else f"strength {strength:g}"]

    header_w = int(max(measure.textlength(t, font=font) for r in rows for t in row_label(*r))) + 1
    header_h = 2 * line
    width = CELL_PADDING + header_w + sum(w + CELL_PADDING for w in col_w)
    height = CELL_PADDING + header_h + sum(h + CELL_PADDING for h in row_h)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    black, grey = (0, 0, 0), (90, 90, 90)

    x = CELL_PADDING + header_w + CELL_PADDING
    for j, sample in enumerate(samples):
        draw.text((x, CELL_PADDING), _fit(draw, f"#{sample.index} {sample.prompt}", font, col_w[j]), fill=black,
                  font=font)
        draw.text((x, CELL_PADDING + line), _fit(draw, "ours | ai-toolkit", font, col_w[j]), fill=grey, font=font)
        x += col_w[j] + CELL_PADDING

    placed = []
    y = CELL_PADDING + header_h + CELL_PADDING
    for (step, strength), row, h in zip(rows, grid_cells, row_h):
        for k, text in enumerate(row_label(step, strength)):
            draw.text((CELL_PADDING, y + k * line), text, fill=black, font=font)
        x = CELL_PADDING + header_w + CELL_PADDING
        for j, cell in enumerate(row):
            ours_box = (x, y, x + cell.ours.shape[1], y + cell.ours.shape[0])
            image.paste(Image.fromarray(cell.ours), ours_box[:2])
            theirs_box = None
            if cell.theirs is not None:
                left = ours_box[2] + PAIR_GAP
                theirs_box = (left, y, left + cell.theirs.shape[1], y + cell.theirs.shape[0])
                image.paste(Image.fromarray(cell.theirs), theirs_box[:2])
            text_y = y + pair_size(cell)[1] + LABEL_GAP
            for k, text in enumerate(_cell_lines(cell, by_index[cell.index])):
                draw.text((x, text_y + k * line), text, fill=black if cell.compare else grey, font=font)
            placed.append(dataclasses.replace(cell, ours_box=ours_box, theirs_box=theirs_box))
            x += col_w[j] + CELL_PADDING
        y += h + CELL_PADDING
    return image, placed
