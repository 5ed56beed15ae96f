"""An ai-toolkit job folder, read: its ``config.yaml``, its LoRA saves, its sample list and its own previews.

A job folder (``<training_folder>/<name>/``) holds the job's ``config.yaml``, its LoRA files
``<name>_<step:09d>.safetensors`` / ``<name>.safetensors`` (final; two-expert models save a ``_high_noise`` and a
``_low_noise`` file each time) and, usually, ``samples/[time]__<step:09d>_<i>.<ext>``. :func:`build_samples` rebuilds
the preview list with ai-toolkit's rules (``BaseSDTrainProcess.sample`` and ``GenerateImageConfig``):

* sample ``i`` uses ``seed + i`` when ``walk_seed`` is set; a per-sample ``seed:`` overrides, and without
  ``walk_seed`` it also stays in force for the samples after it (ai-toolkit keeps one running seed);
* per-sample ``width``/``height``/``neg``/``guidance_scale``/``sample_steps``/``network_multiplier``/``num_frames``/
  ``fps``/``ctrl_img`` override the section's values; then ``[trigger]`` is replaced by ``trigger_word`` and the
  prompt's ``--flags`` override again; width/height are floored to 8 (minimum 64);
* ``--n`` replaces the negative of the first text encoder only: SDXL's second encoder keeps the job's ``neg``
  (``negative_2``), and ``--p2``/``--n2`` are overwritten by ``GenerateImageConfig``'s own defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

from ..base import floor_sample_size
from ..prompts import inject_trigger, parse_prompt_flags
from ..registry import Experts, aitk_arch_names, model_id_for_arch

logger = logging.getLogger(__name__)

_STEP_SUFFIX = re.compile(r"_(\d{9})$")
# ai-toolkit's preview names: "[time]_" + "_%09d" + "_[count]" -> "<ms>__<step>_<index>.<ext>"
# (audio models' previews: wav, mp3, flac or ogg, written by ``GenerateImageConfig.save_image`` through torchaudio)
_PREVIEW_NAME = re.compile(r"^(\d+)__(\d{9})_(\d+)\.(jpg|jpeg|png|webp|mp4|wav|mp3|flac|ogg)$", re.IGNORECASE)


@dataclass(frozen=True)
class TrainingJob:
    """A job folder's config, read and checked.

    Args:
        config_path (str): the ``config.yaml``.
        folder (str): the job folder (the config's folder).
        name (str, *optional*): ``config.name``, the stem of the job's LoRA and preview files.
        process (dict): the process entry with the ``model`` and ``sample`` sections.
    """

    config_path: str
    folder: str
    name: str | None
    process: dict

    @property
    def model_id(self) -> str:
        return model_id_for_job(self.process["model"])

    @property
    def base(self) -> str | None:
        """``model.name_or_path``, a relative path resolved against the job folder."""
        source = self.process["model"].get("name_or_path")
        return resolve_job_path(source, self.folder) if source else None

    def samples(self) -> list[SampleSpec]:
        return build_samples(self.process["sample"], self.process.get("trigger_word"))

    @property
    def unconditional_lora(self) -> str | None:
        """``model.unconditional_lora_path`` (Ideogram 4: a LoRA ai-toolkit switches on in the unconditional CFG pass
        only), a relative path resolved against the job folder; None when the job has none."""
        path = self.process["model"].get("unconditional_lora_path")
        return resolve_job_path(path, self.folder) if path else None


def read_job(job: str) -> TrainingJob:
    """Read the job folder (or config file) ``job``."""
    config_path = find_job_config(job)
    data = read_job_config(config_path)
    return TrainingJob(config_path=config_path, folder=os.path.dirname(os.path.abspath(config_path)),
                       name=data["config"].get("name"), process=training_process(data, config_path))


@dataclass(frozen=True)
class SampleSpec:
    """One preview image of the job, with every value resolved the way ai-toolkit resolves it.

    Args:
        index (int): position in the job's ``samples`` list (the ``[count]`` of the file name).
        prompt (str): text to encode (trigger replaced, flags removed).
        negative (str): negative prompt (the section's ``neg``, a per-sample ``neg`` or ``--n``).
        negative_2 (str): the negative SDXL's second text encoder gets: always the job's ``neg``, never ``--n``.
        width, height (int): floored to 8 with a minimum of 64 (the family floors further when rendering).
        seed (int): the seed after ``walk_seed``, per-sample seeds and ``--seed``.
        steps (int), guidance (float): sampling steps and ai-toolkit's ``guidance_scale``.
        network_multiplier (float): the LoRA strength for this image.
        num_frames, fps (int): video settings (``num_frames`` 1 for images).
        ctrl_img (str, *optional*): the single control image (``ctrl_img`` or ``--ctrl_img``).
        ctrl_imgs (tuple[str, ...]): ``ctrl_img_1..3`` for multi-reference families.
        guidance_rescale (float): the section's ``guidance_rescale`` or ``--gr`` (used by SDXL's previews only).
        unused_flags (dict): prompt flags that have no effect on ai-toolkit's previews (``--p2``, ``--n2``...).
    """

    index: int
    prompt: str
    negative: str
    negative_2: str
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
    guidance_rescale: float = 0.0
    unused_flags: dict = field(default_factory=dict)


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


# ai-toolkit's ModelConfig: the arch a job without `arch` gets from its legacy flags, the first set flag in this order.
_LEGACY_ARCH_FLAGS = (("is_v2", "sd2"), ("is_v3", "sd3"), ("is_xl", "sdxl"), ("is_pixart", "pixart"),
                      ("is_pixart_sigma", "pixart_sigma"), ("is_auraflow", "auraflow"), ("is_lumina2", "lumina2"),
                      ("is_vega", "vega"), ("is_ssd", "ssd"))


def model_id_for_job(model_cfg: dict) -> str:
    """Map a job's ``model`` section (``arch``, legacy ``is_flux``/``is_xl`` flags, ``name_or_path``) to a model id."""
    arch = model_cfg.get("arch")
    if arch:
        # A tagged UI arch that some id answers for (krea2:o_edit) stays whole; other tags are presets of the arch
        arch = str(arch)
        if arch not in aitk_arch_names():
            arch = arch.split(":")[0]
    elif model_cfg.get("is_flux"):
        arch = "flux"
    else:
        arch = next((arch for flag, arch in _LEGACY_ARCH_FLAGS if model_cfg.get(flag)), "sd1")
    if arch == "pixart" and model_cfg.get("is_pixart_sigma"):
        # ai-toolkit samples PixArt-Sigma only as arch pixart with is_pixart_sigma (arch pixart_sigma fails to load)
        return "pixart_sigma"
    return model_id_for_arch(arch, str(model_cfg.get("name_or_path") or ""))


def resolve_job_path(path: str, job_dir: str) -> str:
    """A path from the job config: relative paths that exist under the job folder resolve against it."""
    path = os.path.expanduser(str(path))
    if not os.path.isabs(path) and os.path.exists(os.path.join(job_dir, path)):
        return os.path.normpath(os.path.join(job_dir, path))
    return path


def lora_step_from_name(path: str) -> int | None:
    """The ``_%09d`` step suffix of a LoRA file name, None for a final (suffix-less) file."""
    stem = Experts.without_side(os.path.splitext(os.path.basename(path))[0])
    match = _STEP_SUFFIX.search(stem)
    return int(match.group(1)) if match else None


def newest_lora(job_dir: str, name: str | None) -> str:
    """The job's newest LoRA, decided by NAME: the suffix-less final file, else the highest ``_%09d`` step.

    File times are not used (copies and downloads lose them). Files named after the job are preferred; a job folder
    whose files were renamed falls back to every ``.safetensors`` in it.
    """
    files = sorted(f for f in os.listdir(job_dir) if f.endswith(".safetensors"))
    if name:
        pattern = re.compile(rf"^{re.escape(name)}(_\d{{9}})?$")
        named = [f for f in files if pattern.match(Experts.without_side(os.path.splitext(f)[0]))]
        files = named or files
    if not files:
        raise FileNotFoundError(
            f"No LoRA (.safetensors) in job folder {job_dir!r}. Pass --lora FILE to choose one."
        )

    def rank(filename: str):
        step = lora_step_from_name(filename)
        return (1, 0) if step is None else (0, step)

    return os.path.join(job_dir, max(files, key=rank))


@dataclass(frozen=True)
class JobCheckpoint:
    """One LoRA save of a job: its training step and its file(s) (a two-expert save has a high- and a low-noise file)."""

    step: int
    files: tuple[str, ...]

    @property
    def name(self) -> str:
        return ", ".join(os.path.basename(path) for path in self.files)


def job_checkpoints(job_dir: str, name: str | None, process: dict) -> list[JobCheckpoint]:
    """Every LoRA save of a job folder, by step (oldest first); the files chosen as :func:`newest_lora` chooses them.

    A save's step is its name's ``_%09d`` suffix, else (the final, suffix-less file) :func:`lora_step`. When the final
    file and a step save fall on the same step, the final file is kept (ai-toolkit writes both at the last step).
    """
    files = sorted(f for f in os.listdir(job_dir) if f.endswith(".safetensors"))
    if name:
        pattern = re.compile(rf"^{re.escape(name)}(_\d{{9}})?$")
        files = [f for f in files if pattern.match(Experts.without_side(os.path.splitext(f)[0]))] or files
    if not files:
        raise FileNotFoundError(f"No LoRA (.safetensors) in job folder {job_dir!r}: ai-toolkit saves the job's "
                                "checkpoints there as <name>_<step>.safetensors.")
    by_step: dict[int, JobCheckpoint] = {}
    for filename in files:
        path = os.path.join(job_dir, filename)
        group = tuple(with_expert_sibling(path))
        if group[0] != path:
            continue  # the high-noise file of a pair stands for both
        final = lora_step_from_name(path) is None
        step = lora_step(path, process)
        if step not in by_step or final:
            by_step[step] = JobCheckpoint(step=step, files=group)
    return [by_step[step] for step in sorted(by_step)]


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
    guidance_rescale = float(sample_cfg.get("guidance_rescale", 0.0))  # a section value: ai-toolkit has no per-sample one
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
        job_negative = values["neg"] if isinstance(values["neg"], str) else ""  # SampleConfig's default neg is False
        width = int(values["width"] if options.width is None else options.width)
        height = int(values["height"] if options.height is None else options.height)
        samples.append(SampleSpec(
            index=i,
            prompt=options.prompt,
            negative=job_negative if options.negative is None else options.negative,
            negative_2=job_negative,
            width=floor_sample_size(width),
            height=floor_sample_size(height),
            seed=current_seed if options.seed is None else options.seed,
            steps=int(values["sample_steps"] if options.steps is None else options.steps),
            guidance=float(values["guidance_scale"] if options.guidance is None else options.guidance),
            network_multiplier=(_multiplier(values["network_multiplier"], i) if options.network_multiplier is None
                                else options.network_multiplier),
            num_frames=int(values["num_frames"] if options.num_frames is None else options.num_frames),
            fps=int(values["fps"] if options.fps is None else options.fps),
            ctrl_img=options.ctrl_img or ctrl_img,
            ctrl_imgs=ctrl_imgs,
            guidance_rescale=guidance_rescale if options.guidance_rescale is None else options.guidance_rescale,
            unused_flags=options.unused,
        ))
    return samples


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
