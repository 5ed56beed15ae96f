"""Re-render an ai-toolkit job's sample previews and measure how close they come to the job's own ``samples/``.

An ai-toolkit job folder (``<training_folder>/<name>/``) holds the job's ``config.yaml``, its LoRA files
``<name>_<step:09d>.safetensors`` / ``<name>.safetensors`` (final) and, usually, ``samples/[time]__<step:09d>_<i>.<ext>``.
:func:`reproduce_job` reads the config's ``model`` and ``sample`` sections, rebuilds the list of sample images with
ai-toolkit's rules (``BaseSDTrainProcess.sample`` and ``GenerateImageConfig``, see ``ai-toolkit.md`` §2.1 and §3):

* sample ``i`` uses ``seed + i`` when ``walk_seed`` is set; a per-sample ``seed:`` overrides, and without
  ``walk_seed`` it also stays in force for the samples after it (ai-toolkit keeps one running seed);
* per-sample ``width``/``height``/``neg``/``guidance_scale``/``sample_steps``/``network_multiplier``/``num_frames``/
  ``fps``/``ctrl_img`` override the section's values; then ``[trigger]`` is replaced by ``trigger_word`` and the
  prompt's ``--flags`` override again; width/height are floored to 8 (minimum 64);
* the LoRA is merged when every sample shares one multiplier (ai-toolkit's ``merge_in``), live otherwise.

It renders them with :func:`~aitk_inference.pipelines.load_pipeline`, ``set_loras`` and ``generate``, saves PNGs
named like ai-toolkit's (``<job name>__<step:09d>_<i>.png``) and, where the job has its own previews for the same
(step, index), reports the difference in 8-bit levels and PSNR and writes a side-by-side sheet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

from ..prompts import inject_trigger, parse_prompt_flags
from ..registry import Experts, model_id_for_arch

logger = logging.getLogger(__name__)

_STEP_SUFFIX = re.compile(r"_(\d{9})$")
# ai-toolkit's preview names: "[time]_" + "_%09d" + "_[count]" -> "<ms>__<step>_<index>.<ext>"
_PREVIEW_NAME = re.compile(r"^(\d+)__(\d{9})_(\d+)\.(jpg|jpeg|png|webp)$", re.IGNORECASE)


@dataclass(frozen=True)
class SampleSpec:
    """One preview image of the job, with every value resolved the way ai-toolkit resolves it.

    Args:
        index (int): position in the job's ``samples`` list (the ``[count]`` of the file name).
        prompt (str): text to encode (trigger replaced, flags removed).
        negative (str): negative prompt (the section's ``neg``, a per-sample ``neg`` or ``--n``).
        width, height (int): floored to 8 with a minimum of 64 (the family floors further when rendering).
        seed (int): the seed after ``walk_seed``, per-sample seeds and ``--seed``.
        steps (int), guidance (float): sampling steps and ai-toolkit's ``guidance_scale``.
        network_multiplier (float): the LoRA strength for this image.
        num_frames, fps (int): video settings (``num_frames`` 1 for images).
        ctrl_img (str, *optional*): the single control image (``ctrl_img`` or ``--ctrl_img``).
        ctrl_imgs (tuple[str, ...]): ``ctrl_img_1..3`` for multi-reference families.
        unused_flags (dict): prompt flags that have no effect here (``--p2``, ``--gr``...).
    """

    index: int
    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    network_multiplier: float
    num_frames: int = 1
    fps: int = 16
    ctrl_img: str | None = None
    ctrl_imgs: tuple = ()
    unused_flags: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------- job
def find_job_config(job: str) -> str:
    """The ``config.yaml`` of a job folder (or ``job`` itself when it is a config file)."""
    job = os.path.expanduser(os.fspath(job))
    if os.path.isdir(job):
        for name in ("config.yaml", "config.yml", "config.json"):
            path = os.path.join(job, name)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"{job!r} has no config.yaml. Give an ai-toolkit job folder (<training_folder>/<name>/, where ai-toolkit "
            "copies the job's config.yaml) or the path of the config file itself."
        )
    if os.path.isfile(job):
        return job
    raise FileNotFoundError(f"Job folder or config file {job!r} does not exist.")


def read_job_config(path: str) -> dict:
    """Parse an ai-toolkit job config (YAML or JSON) and return it, checking the keys reproduce needs."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("process"), list) or not config["process"]:
        raise ValueError(
            f"{path!r} is not an ai-toolkit job config: it needs `config: {{name: ..., process: [{{model: ..., "
            "sample: ...}]}}` as written by ai-toolkit."
        )
    return data


def training_process(data: dict, path: str) -> dict:
    """The process entry that has a ``sample`` section (the trainer)."""
    for process in data["config"]["process"]:
        if isinstance(process, dict) and isinstance(process.get("sample"), dict):
            if not isinstance(process.get("model"), dict):
                raise ValueError(f"{path!r}: the process with the `sample` section has no `model` section.")
            return process
    raise ValueError(f"{path!r}: no process has a `sample` section, so the job made no previews to reproduce.")


def model_id_for_job(model_cfg: dict) -> str:
    """Map a job's ``model`` section (``arch``, legacy ``is_flux``/``is_xl`` flags, ``name_or_path``) to a model id."""
    arch = model_cfg.get("arch")
    if arch:
        arch = str(arch).split(":")[0]
    elif model_cfg.get("is_flux"):
        arch = "flux"
    elif model_cfg.get("is_xl"):
        arch = "sdxl"
    elif model_cfg.get("is_v2") or model_cfg.get("is_v3") or model_cfg.get("is_pixart") or model_cfg.get("is_auraflow"):
        raise ValueError("This job's model (SD2/SD3/PixArt/AuraFlow) is not a family aitk-inference runs.")
    else:
        arch = "sd1"
    return model_id_for_arch(arch, str(model_cfg.get("name_or_path") or ""))


def resolve_job_path(path: str, job_dir: str) -> str:
    """A path from the job config: relative paths that exist under the job folder resolve against it."""
    path = os.path.expanduser(str(path))
    if not os.path.isabs(path) and os.path.exists(os.path.join(job_dir, path)):
        return os.path.normpath(os.path.join(job_dir, path))
    return path


def lora_step_from_name(path: str) -> int | None:
    """The ``_%09d`` step suffix of a LoRA file name, None for a final (suffix-less) file."""
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"_(high|low)_noise$", "", stem)
    match = _STEP_SUFFIX.search(stem)
    return int(match.group(1)) if match else None


def newest_lora(job_dir: str, name: str | None) -> str:
    """The job's newest LoRA, decided by NAME: the suffix-less final file, else the highest ``_%09d`` step.

    File times are not used (copies and downloads lose them). Files named after the job are preferred; a job folder
    whose files were renamed falls back to every ``.safetensors`` in it.
    """
    files = sorted(f for f in os.listdir(job_dir) if f.endswith(".safetensors"))
    if name:
        pattern = re.compile(rf"^{re.escape(name)}(_\d{{9}})?(_(high|low)_noise)?\.safetensors$")
        named = [f for f in files if pattern.match(f)]
        files = named or files
    if not files:
        raise FileNotFoundError(
            f"No LoRA (.safetensors) in job folder {job_dir!r}. Pass --lora FILE to choose one."
        )

    def rank(filename: str):
        step = lora_step_from_name(filename)
        return (1, 0) if step is None else (0, step)

    return os.path.join(job_dir, max(files, key=rank))


def with_expert_sibling(path: str) -> list[str]:
    """A two-expert split save comes as ``*_high_noise`` + ``*_low_noise``: return both files (ai-toolkit loads the
    sibling too); any other LoRA is returned alone."""
    sibling = Experts.sibling(path)
    return sorted([path, sibling]) if sibling and os.path.isfile(sibling) else [path]


def lora_step(path: str, process: dict) -> int:
    """The training step a LoRA file belongs to: its name's suffix, else its ``training_info`` metadata, else
    ``train.steps`` (a final save happens at the last step, where ai-toolkit also samples)."""
    step = lora_step_from_name(path)
    if step is not None:
        return step
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            info = json.loads((f.metadata() or {}).get("training_info", "{}"))
        if isinstance(info, dict) and isinstance(info.get("step"), int):
            return info["step"]
    except (SafetensorError, OSError, ValueError) as e:
        logger.warning("Could not read training_info from %s (%s); using train.steps.", path, e)
    return int((process.get("train") or {}).get("steps", 1000))


def _multiplier(value, index: int) -> float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            logger.warning("Sample %d: network_multiplier %r is not a number; ai-toolkit uses 1.0, so do we.", index, value)
            return 1.0
    return float(value)


def build_samples(sample_cfg: dict, trigger_word: str | None) -> list[SampleSpec]:
    """The job's preview list with ai-toolkit's seed, override, trigger and prompt-flag rules.

    Args:
        sample_cfg (dict): the job's ``sample`` section (``samples`` list or legacy ``prompts`` strings).
        trigger_word (str, *optional*): the process's ``trigger_word``.

    Returns:
        list[SampleSpec]: one entry per preview, in order.
    """
    items = sample_cfg.get("samples")
    if items is None:
        items = [{"prompt": p} for p in sample_cfg.get("prompts") or []]
    if not isinstance(items, list) or not items:
        raise ValueError("The job's `sample` section has no `samples` (or legacy `prompts`): nothing to reproduce.")
    section = {
        "width": sample_cfg.get("width", 512),
        "height": sample_cfg.get("height", 512),
        "neg": sample_cfg.get("neg", False),
        "guidance_scale": sample_cfg.get("guidance_scale", 7),
        "sample_steps": sample_cfg.get("sample_steps", 20),
        "network_multiplier": sample_cfg.get("network_multiplier", 1),
        "num_frames": sample_cfg.get("num_frames", 1),
        "fps": sample_cfg.get("fps", 16),
    }
    start_seed = int(sample_cfg.get("seed", 0))
    walk_seed = bool(sample_cfg.get("walk_seed", False))
    current_seed = start_seed
    samples = []
    for i, raw in enumerate(items):
        item = {"prompt": raw} if isinstance(raw, str) else dict(raw)
        if not isinstance(item.get("prompt"), str):
            raise ValueError(f"Sample {i} of the job has no `prompt` string ({raw!r}).")
        if walk_seed:
            current_seed = start_seed + i
        if item.get("seed") is not None:
            current_seed = int(item["seed"])  # stays for later samples unless walk_seed resets it
        values = {key: item.get(key, default) for key, default in section.items()}
        ctrl_img = item.get("ctrl_img")
        ctrl_imgs = tuple(p for p in (item.get("ctrl_img_1", ctrl_img), item.get("ctrl_img_2"), item.get("ctrl_img_3"))
                          if p)

        options = parse_prompt_flags(inject_trigger(item["prompt"], trigger_word))
        negative = values["neg"] if options.negative is None else options.negative
        width = int(values["width"] if options.width is None else options.width)
        height = int(values["height"] if options.height is None else options.height)
        samples.append(SampleSpec(
            index=i,
            prompt=options.prompt,
            negative=negative if isinstance(negative, str) else "",  # SampleConfig's default neg is False
            width=max(64, width - width % 8),
            height=max(64, height - height % 8),
            seed=current_seed if options.seed is None else options.seed,
            steps=int(values["sample_steps"] if options.steps is None else options.steps),
            guidance=float(values["guidance_scale"] if options.guidance is None else options.guidance),
            network_multiplier=(_multiplier(values["network_multiplier"], i) if options.network_multiplier is None
                                else options.network_multiplier),
            num_frames=int(values["num_frames"] if options.num_frames is None else options.num_frames),
            fps=int(values["fps"] if options.fps is None else options.fps),
            ctrl_img=options.ctrl_img or ctrl_img,
            ctrl_imgs=ctrl_imgs,
            unused_flags=options.unused,
        ))
    return samples


# ---------------------------------------------------------------------------------------------------------------- compare
def find_previews(job_dir: str) -> dict[tuple[int, int], str]:
    """ai-toolkit's previews in ``<job>/samples``, keyed by (step, index); the newest file wins on duplicates."""
    folder = os.path.join(job_dir, "samples")
    found: dict[tuple[int, int], tuple[int, str]] = {}
    if not os.path.isdir(folder):
        return {}
    for filename in os.listdir(folder):
        match = _PREVIEW_NAME.match(filename)
        if not match:
            continue
        stamp, step, index = int(match.group(1)), int(match.group(2)), int(match.group(3))
        key = (step, index)
        if key not in found or stamp > found[key][0]:
            found[key] = (stamp, os.path.join(folder, filename))
    return {key: path for key, (_, path) in found.items()}


def compare_images(ours, theirs) -> dict:
    """Difference of two uint8 RGB arrays in 8-bit levels: max and mean absolute difference and PSNR (dB)."""
    import numpy as np

    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {
        "max_abs": int(diff.max()),
        "mean_abs": float(diff.mean()),
        "psnr": math.inf if mse == 0.0 else 10.0 * math.log10(255.0 ** 2 / mse),
    }


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


# ---------------------------------------------------------------------------------------------------------------- run
def reproduce_job(
    job: str,
    base: str | None = None,
    lora: str | None = None,
    out_dir: str | None = None,
    device: str | None = None,
    dtype=None,
    model: str | None = None,
) -> dict:
    """Re-render an ai-toolkit job's sample previews and compare them with the job's own.

    Args:
        job (str): the job folder or its ``config.yaml``.
        base (str, *optional*): base checkpoint; defaults to the job's ``model.name_or_path`` (a relative path
            resolves against the job folder).
        lora (str, *optional*): LoRA file; defaults to the job's newest by name.
        out_dir (str, *optional*): where our images go; defaults to ``<job>/aitk_inference_samples``.
        device (str, *optional*), dtype (str, *optional*): as for ``load_pipeline``.
        model (str, *optional*): model id; defaults to the one matching ``model.arch``.

    Returns:
        dict: ``model``, ``base``, ``lora``, ``step``, ``lora_mode``, ``out_dir``, ``samples`` (one row per image:
        ``file``, ``index``, ``prompt``, ``width``, ``height`` (effective), ``seed``, ``steps``, ``guidance``,
        ``network_multiplier``, ``preview`` and ``compare`` {``max_abs``, ``mean_abs``, ``psnr``} when the job has
        ai-toolkit's image for the same step and index) and ``sheet`` (the side-by-side PNG, or None).
    """
    import numpy as np
    from PIL import Image

    from .. import load_pipeline
    from ..lora.stack import LoraRequest
    from ..registry import get_spec
    from ..media import write_image, write_webp

    # 1. Validate and read the job
    config_path = find_job_config(job)
    job_dir = os.path.dirname(os.path.abspath(config_path))
    data = read_job_config(config_path)
    process = training_process(data, config_path)
    name = data["config"].get("name")
    spec = get_spec(model or model_id_for_job(process["model"]))
    source = base or process["model"].get("name_or_path")
    if not source:
        raise ValueError(f"{config_path!r} has no model.name_or_path; pass --base PATH_OR_REPO.")
    source = resolve_job_path(source, job_dir)
    lora_path = os.path.abspath(os.path.expanduser(lora)) if lora else newest_lora(job_dir, name)
    if not os.path.isfile(lora_path):
        raise FileNotFoundError(f"LoRA file {lora_path!r} does not exist.")
    step = lora_step(lora_path, process)

    # 2. Resolve the samples
    samples = build_samples(process["sample"], process.get("trigger_word"))
    for sample in samples:
        if sample.unused_flags:
            logger.warning("Sample %d: prompt flags %s have no effect for %s.", sample.index,
                           sorted(sample.unused_flags), spec.model_id)
    # ai-toolkit merges the LoRA when every sample shares one multiplier, and runs it live otherwise.
    lora_mode = "fused" if len({s.network_multiplier for s in samples}) == 1 else "dynamic"

    # 3. Load the pipeline
    pipeline = load_pipeline(spec.model_id, base=source, device=device, dtype=dtype, lora_mode=lora_mode)
    out_dir = os.path.abspath(out_dir or os.path.join(job_dir, "aitk_inference_samples"))
    os.makedirs(out_dir, exist_ok=True)
    previews = find_previews(job_dir)
    prefix = name or "sample"

    rows, sheet_rows = [], []
    for sample in samples:
        # 4. Apply the LoRA at this sample's multiplier (an in-place change after the first)
        pipeline.set_loras([LoraRequest(path=path, strength=sample.network_multiplier)
                            for path in with_expert_sibling(lora_path)])
        # 5. Run
        controls = []
        if spec.control_images[1] == 1 and sample.ctrl_img:
            controls = [resolve_job_path(sample.ctrl_img, job_dir)]
        elif spec.control_images[1] > 1 and sample.ctrl_imgs:
            controls = [resolve_job_path(p, job_dir) for p in sample.ctrl_imgs]
        for path in controls:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Sample {sample.index}: control image {path!r} does not exist.")
        kwargs = pipeline.control_inputs(controls) if controls else {}
        if spec.is_video:
            kwargs.update(num_frames=sample.num_frames, fps=sample.fps)
        result = pipeline.generate(prompt=sample.prompt, negative=sample.negative, width=sample.width,
                                   height=sample.height, steps=sample.steps, guidance=sample.guidance,
                                   seed=sample.seed, **kwargs)
        # 6. Save and compare
        frames = result.to_pil()
        filename = f"{prefix}__{step:09d}_{sample.index}" + (".webp" if result.is_video else ".png")
        path = os.path.join(out_dir, filename)
        metadata = {**result.metadata(), "ai_toolkit_step": step, "ai_toolkit_index": sample.index}
        if result.is_video:
            write_webp(result.images[0], path, result.params.fps)  # ai-toolkit's video previews are animated WEBP
        else:
            write_image(frames[0], path, metadata)
        p = result.params
        row = {"file": path, "index": sample.index, "prompt": p.prompt, "width": p.width, "height": p.height,
               "seed": p.seed, "steps": p.steps, "guidance": p.guidance,
               "network_multiplier": sample.network_multiplier, "preview": None, "compare": None}
        preview = previews.get((step, sample.index))
        if preview is not None:
            ours = np.asarray(frames[0].convert("RGB"))
            with Image.open(preview) as im:
                theirs = np.asarray(im.convert("RGB"))
            row["preview"] = preview
            if theirs.shape != ours.shape:
                logger.warning("Sample %d: ai-toolkit's preview is %dx%d, ours %dx%d; not compared.", sample.index,
                               theirs.shape[1], theirs.shape[0], ours.shape[1], ours.shape[0])
            else:
                row["compare"] = compare_images(ours, theirs)
                sheet_rows.append((f"#{sample.index} step {step} seed {p.seed}", ours, theirs))
        rows.append(row)

    sheet = write_sheet(sheet_rows, os.path.join(out_dir, f"{prefix}__{step:09d}_sheet.png")) if sheet_rows else None
    return {"config": config_path, "model": spec.model_id, "base": source, "lora": lora_path, "step": step,
            "lora_mode": lora_mode, "out_dir": out_dir, "samples": rows, "sheet": sheet}


__all__ = ["SampleSpec", "build_samples", "reproduce_job", "model_id_for_job", "newest_lora", "with_expert_sibling",
           "find_previews", "compare_images"]
