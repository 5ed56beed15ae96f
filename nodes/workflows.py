"""UI-format ComfyUI workflows: one example per model id, "reproduce the training previews" of an ai-toolkit job, and
the training job's checkpoints x prompts grid.

``python -m aitk_inference.nodes.workflows`` rewrites ``example_workflows/`` (each workflow with its ``.jpg`` card for
ComfyUI's Browse Templates);
``python -m aitk_inference.nodes.workflows --job <job folder or config.yaml> --out previews.json`` writes a workflow
that renders that job's sample previews (one AITK Sample per preview, with its seed, size, steps, guidance and LoRA
multiplier resolved by ai-toolkit's rules in ``reproduce.build_samples``). Widget values follow ``schema.py``.
"""

from __future__ import annotations

import argparse
import json
import os

from ..pipelines.registry import REGISTRY, get_spec
from .schema import APPLY, JOB_PREVIEWS, LOAD, SAMPLE, TRAINING_JOB, NodeSpec

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")
PREVIEWS_NAME = "reproduce_training_previews_flux.json"
JOB_GRID_NAME = "training_job_checkpoint_grid.json"

#: widget counts of the ComfyUI core nodes the workflows use (SaveImage: prefix; LoadImage: file + upload button)
CORE_WIDGET_COUNTS = {"SaveImage": 1, "LoadImage": 2, "Note": 1, "CreateVideo": 1, "SaveVideo": 3, "SaveAudio": 1,
                      "PreviewAny": 0}
#: the example prompt of audio-only models: ai-toolkit's tagged sample prompt (its audio UI preset's tags)
AUDIO_EXAMPLE_PROMPT = ("<CAPTION>[trigger] style song, upbeat synth pop, bright female vocal</CAPTION>\n"
                        "<LYRICS>\n[Verse]\nCity lights are calling\n[Chorus]\nWe keep on dancing\n</LYRICS>\n"
                        "<BPM>112</BPM>\n<DURATION>30</DURATION>\n<LANGUAGE>en</LANGUAGE>")

#: an ai-toolkit FLUX job (the shape of its config.yaml), from which the bundled previews workflow is built
EXAMPLE_JOB = {
    "job": "extension",
    "config": {
        "name": "my_flux_lora",
        "process": [{
            "type": "sd_trainer",
            "trigger_word": "p3r5on",
            "model": {"name_or_path": "black-forest-labs/FLUX.1-dev", "arch": "flux"},
            "sample": {
                "sampler": "flowmatch", "sample_every": 250, "width": 1024, "height": 1024, "neg": "", "seed": 42,
                "walk_seed": True, "guidance_scale": 4, "sample_steps": 25,
                "samples": [
                    {"prompt": "[trigger] holding a sign that says 'I LOVE PROMPTS!'"},
                    {"prompt": "[trigger] as a knight in shining armor, portrait --w 768 --h 1024"},
                    {"prompt": "a photo of [trigger] at the beach, golden hour", "network_multiplier": 0.8},
                ],
            },
        }],
    },
}


class _Graph:
    """Accumulates nodes and links in the frontend's workflow format (version 0.4)."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos, widgets: list, inputs=(), outputs=(), size=(320, 130), title=None) -> dict:
        node = {
            "id": len(self.nodes) + 1,
            "type": node_type,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": [{"name": name, "type": kind, "link": None} for name, kind in inputs],
            "outputs": [{"name": name, "type": kind, "links": [], "slot_index": i} for i, (name, kind) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def add_aitk(self, spec: NodeSpec, pos, values: dict, size=(320, 130), title=None) -> dict:
        missing = [name for name in spec.widget_names() if name not in values]
        if missing:
            raise ValueError(f"{spec.node_id}: no value for widget(s) {missing}.")
        return self.add(spec.node_id, pos, [values[name] for name in spec.widget_names()],
                        inputs=[(f.name, f.type) for f in spec.inputs if not f.is_widget],
                        outputs=[(o.name, o.type) for o in spec.outputs], size=size, title=title)

    def link(self, src: dict, src_slot: int, dst: dict, input_name: str) -> None:
        dst_slot = next(i for i, entry in enumerate(dst["inputs"]) if entry["name"] == input_name)
        link_id = len(self.links) + 1
        kind = src["outputs"][src_slot]["type"]
        src["outputs"][src_slot]["links"].append(link_id)
        dst["inputs"][dst_slot]["link"] = link_id
        self.links.append([link_id, src["id"], src_slot, dst["id"], dst_slot, kind])

    def to_json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _load_values(model_id: str, **overrides) -> dict:
    """The Load node's widget values: the schema's defaults, for ``model_id``."""
    values = {f.name: f.default for f in LOAD.inputs if f.is_widget}
    return {**values, "model": model_id, **overrides}


def _sample_values(spec, prompt: str, negative: str, trigger_word: str = "", **overrides) -> dict:
    video = spec.video
    values = {"prompt": prompt, "negative": negative, "trigger_word": trigger_word, "width": spec.width,
              "height": spec.height, "steps": spec.steps, "guidance": spec.guidance, "seed": spec.seed,
              "control_after_generate": "fixed", "batch_size": 1,
              "num_frames": video.num_frames if video else 0, "fps": video.fps if video else 0,
              "vae_tiling": False, "options": ""}
    values.update(overrides)
    return values


def model_workflow(model_id: str) -> dict:
    """Load -> Apply LoRA (one per expert for MoE models) -> Sample -> Save Image (videos: Create Video -> Save Video;
    audio-only models: Save Audio), with the registry defaults."""
    spec = get_spec(model_id)
    graph = _Graph()
    load = graph.add_aitk(LOAD, (40, 120), _load_values(model_id), size=(320, 270))
    # Two-expert (MoE) models get one Apply per expert: ai-toolkit saves a high-noise and a low-noise file.
    sides = spec.experts.SIDES if spec.experts else ("none",)
    previous = load
    for i, side in enumerate(sides):
        name = f"{model_id}_lora.safetensors" if side == "none" else f"{spec.experts.file_stem(model_id, side)}.safetensors"
        apply = graph.add_aitk(APPLY, (400, 120 + 180 * i), {"lora": name, "strength": 1.0, "transformer": side},
                               size=(320, 130))
        graph.link(previous, 0, apply, "pipeline")
        previous = apply
    prompt = AUDIO_EXAMPLE_PROMPT if spec.audio_only else "a photo of [trigger]"
    sample = graph.add_aitk(SAMPLE, (760, 120), _sample_values(spec, prompt, spec.negative, trigger_word="p3r5on"),
                            size=(400, 520))
    graph.link(previous, 0, sample, "pipeline")
    if spec.audio_only:
        save = graph.add("SaveAudio", (1200, 120), [f"aitk/{model_id}"], inputs=[("audio", "AUDIO")], size=(400, 160))
        graph.link(sample, 5, save, "audio")
    elif spec.video is None:
        save = graph.add("SaveImage", (1200, 120), [f"aitk/{model_id}"], inputs=[("images", "IMAGE")], size=(400, 420))
        graph.link(sample, 0, save, "images")
    else:
        # frames + fps + audio -> ComfyUI's VIDEO -> an MP4 (the fps input replaces Create Video's fps widget)
        create = graph.add("CreateVideo", (1200, 120), [float(spec.video.fps)],
                           inputs=[("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")],
                           outputs=[("VIDEO", "VIDEO")], size=(270, 100))
        create["inputs"][2]["widget"] = {"name": "fps"}
        for slot, name in ((0, "images"), (5, "audio"), (4, "fps")):
            graph.link(sample, slot, create, name)
        save = graph.add("SaveVideo", (1520, 120), [f"aitk/{model_id}", "auto", "auto"], inputs=[("video", "VIDEO")],
                         size=(400, 420))
        graph.link(create, 0, save, "video")
    for slot in range(spec.control_images[0]):
        name = "control_image" if slot == 0 else f"control_image_{slot + 1}"
        image = graph.add("LoadImage", (400, 120 + 180 * len(sides) + 340 * slot), ["example.png", "image"],
                          outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], size=(320, 320))
        graph.link(image, 0, sample, name)
    return graph.to_json()


def previews_workflow(job: dict, lora_name: str | None = None) -> dict:
    """One AITK Sample per sample preview of an ai-toolkit job config (parsed ``config.yaml``).

    Args:
        job (dict): the job config, as ``yaml.safe_load`` returns it.
        lora_name (str, *optional*): the LoRA file name in ComfyUI/models/loras; defaults to ``<config.name>.safetensors``
            (ai-toolkit's final save).
    """
    from ..pipelines.jobs.config import build_samples, model_id_for_job, training_process

    process = training_process(job, "job config")
    model_id = model_id_for_job(process["model"])
    spec = get_spec(model_id)
    source = str(process["model"].get("name_or_path") or "")
    lora_name = lora_name or f"{job['config'].get('name', 'lora')}.safetensors"
    samples = build_samples(process["sample"], process.get("trigger_word"))

    graph = _Graph()
    graph.add("Note", (40, 420), ["Reproduces the training previews of ai-toolkit job "
                                  f"{job['config'].get('name')!r} ({model_id}). Each AITK Sample is one preview, in "
                                  "order; seeds follow the job's seed/walk_seed, and prompts already have the trigger "
                                  "word and --flags applied. Put the job's LoRA into ComfyUI/models/loras."],
              size=(320, 200))
    load = graph.add_aitk(LOAD, (40, 120), _load_values(model_id, base="" if source in ("", spec.base) else source),
                          size=(320, 270))
    applied = {}
    for sample in samples:
        if sample.network_multiplier not in applied:
            apply = graph.add_aitk(APPLY, (400, 120 + 180 * len(applied)),
                                   {"lora": lora_name, "strength": sample.network_multiplier, "transformer": "none"})
            graph.link(load, 0, apply, "pipeline")
            applied[sample.network_multiplier] = apply
        y = 120 + 560 * sample.index
        node = graph.add_aitk(SAMPLE, (760, y), _sample_values(
            spec, sample.prompt, sample.negative, width=sample.width, height=sample.height, steps=sample.steps,
            guidance=sample.guidance, seed=sample.seed,
            num_frames=sample.num_frames if spec.video else 0, fps=sample.fps if spec.video else 0,
        ), size=(400, 520), title=f"AITK Sample (preview {sample.index})")
        save = graph.add("SaveImage", (1200, y), [f"aitk/{job['config'].get('name', 'job')}_{sample.index}"],
                         inputs=[("images", "IMAGE")], size=(400, 420))
        graph.link(applied[sample.network_multiplier], 0, node, "pipeline")
        graph.link(node, 0, save, "images")
    return graph.to_json()


def job_grid_workflow() -> dict:
    """AITK Training Job -> AITK Job Previews -> Save Image, with the checkpoint list shown by Preview Any."""
    graph = _Graph()
    job = graph.add_aitk(TRAINING_JOB, (40, 120), {"job_folder": "output/my_flux_lora", "base": "", "dtype": "auto",
                                                   "device": "auto"}, size=(340, 200))
    listing = graph.add("PreviewAny", (40, 380), [], inputs=[("source", "*")], size=(340, 200))
    graph.link(job, 1, listing, "source")
    grid = graph.add_aitk(JOB_PREVIEWS, (420, 120), {"checkpoints": "last 3", "strengths": "", "prompts": ""},
                          size=(340, 180))
    graph.link(job, 0, grid, "job")
    save = graph.add("SaveImage", (800, 120), ["aitk/job_grid"], inputs=[("images", "IMAGE")], size=(520, 520))
    graph.link(grid, 0, save, "images")
    return graph.to_json()


def all_workflows() -> dict[str, dict]:
    """Every bundled example, by file name."""
    out = {f"{model_id}.json": model_workflow(model_id) for model_id in REGISTRY}
    out[PREVIEWS_NAME] = previews_workflow(EXAMPLE_JOB)
    out[JOB_GRID_NAME] = job_grid_workflow()
    return out


THUMBNAIL_SIZE = 320
_AITK_NODE_IDS = {APPLY.node_id, LOAD.node_id, SAMPLE.node_id, TRAINING_JOB.node_id, JOB_PREVIEWS.node_id}
#: the card lines of the examples that are not one model id's
JOB_CARDS = {PREVIEWS_NAME: ["reproduce training previews", "from an ai-toolkit job config", get_spec("flux").base],
             JOB_GRID_NAME: ["checkpoints x prompts grid", "from an ai-toolkit job folder", "its samples beside ours"]}


def workflow_kind(model_id: str) -> str:
    """What an example makes, in a few words (its thumbnail's subtitle)."""
    spec = get_spec(model_id)
    if spec.audio_only:
        return "text to music"
    if spec.video is not None:
        return "image to video" if spec.requires_control_image else "text to video"
    if spec.requires_control_image:
        return "image edit"
    return "text to image" + (" or edit" if spec.control_images[1] else "")


def thumbnail(workflow: dict, title: str, lines: list[str]):
    """A template card for Browse Templates: the title, a few lines, and the workflow's graph in miniature."""
    from PIL import Image, ImageDraw, ImageFont

    size = THUMBNAIL_SIZE
    image = Image.new("RGB", (size, size), (30, 31, 36))
    draw = ImageDraw.Draw(image)
    for points in (30, 26, 22, 18):
        font = ImageFont.load_default(size=points)
        if draw.textlength(title, font=font) <= size - 36:
            break
    draw.text((18, 18), title, fill=(235, 235, 235), font=font)
    small = ImageFont.load_default(size=15)
    for i, line in enumerate(lines):
        draw.text((18, 62 + 22 * i), line, fill=(150, 200, 150) if i == 0 else (170, 170, 170), font=small)
    # The graph, scaled into the lower part of the card
    nodes = workflow["nodes"]
    left = min(n["pos"][0] for n in nodes)
    top = min(n["pos"][1] for n in nodes)
    right = max(n["pos"][0] + n["size"][0] for n in nodes)
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes)
    box = (18, 62 + 22 * len(lines) + 14, size - 18, size - 18)
    scale = min((box[2] - box[0]) / (right - left), (box[3] - box[1]) / (bottom - top))

    def at(x, y):
        return box[0] + (x - left) * scale, box[1] + (y - top) * scale

    by_id = {n["id"]: n for n in nodes}
    for _, src, _, dst, _, _ in workflow["links"]:
        a, b = by_id[src], by_id[dst]
        draw.line([at(a["pos"][0] + a["size"][0], a["pos"][1] + 20), at(b["pos"][0], b["pos"][1] + 20)],
                  fill=(120, 160, 200), width=2)
    for n in nodes:
        x0, y0 = at(*n["pos"])
        x1, y1 = at(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        aitk = n["type"] in _AITK_NODE_IDS
        draw.rounded_rectangle([x0, y0, x1, y1], radius=4, fill=(53, 53, 58), outline=(90, 90, 96))
        draw.rounded_rectangle([x0, y0, x1, y0 + max(4.0, 30 * scale)], radius=4,
                               fill=(70, 130, 80) if aitk else (80, 80, 88))
    return image


def thumbnails() -> dict[str, object]:
    """The Browse Templates card of every bundled example, by file name (``<example>.jpg``)."""
    out = {}
    for name, workflow in all_workflows().items():
        stem = name[:-len(".json")]
        lines = JOB_CARDS.get(name) or [workflow_kind(stem), get_spec(stem).base]
        out[f"{stem}.jpg"] = thumbnail(workflow, stem, lines)
    return out


def write_json(workflow: dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(workflow, f, indent=1)
        f.write("\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aitk_inference.nodes.workflows", description=__doc__.split("\n")[0])
    parser.add_argument("--job", help="an ai-toolkit job folder or config.yaml: write its previews workflow")
    parser.add_argument("--lora", help="LoRA file name in ComfyUI/models/loras (default: <job name>.safetensors)")
    parser.add_argument("--out", help="output file for --job (default: <job name>_previews.json)")
    args = parser.parse_args(argv)
    if args.job:
        from ..pipelines.jobs.config import find_job_config, read_job_config

        job = read_job_config(find_job_config(args.job))
        out = args.out or f"{job['config'].get('name', 'job')}_previews.json"
        print(write_json(previews_workflow(job, args.lora), out))
        return 0
    os.makedirs(EXAMPLES_DIR, exist_ok=True)
    expected = all_workflows()
    cards = thumbnails()
    for name in os.listdir(EXAMPLES_DIR):
        if (name.endswith(".json") and name not in expected) or (name.endswith(".jpg") and name not in cards):
            os.remove(os.path.join(EXAMPLES_DIR, name))
    for name, workflow in expected.items():
        write_json(workflow, os.path.join(EXAMPLES_DIR, name))
    for name, image in cards.items():
        image.save(os.path.join(EXAMPLES_DIR, name), quality=85)
    print(f"wrote {len(expected)} workflows and their thumbnails to {EXAMPLES_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
