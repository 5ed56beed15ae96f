"""Markdown tables of the registry, written into README.md and the family pages in docs/models/.

Each table sits between a start and an end marker; everything outside them is written by hand. A test fails when the
committed files differ from what the registry gives, so a registry change and its documentation land together.

    python -m aitk_inference.pipelines.tables          # rewrite the tables in place
    python -m aitk_inference.pipelines.tables --check  # exit 1 when a table is out of date
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict

from .atomic import atomic_path
from .registry import REGISTRY, ModelSpec

START = "<!-- generated from the registry by `python -m aitk_inference.pipelines.tables`; do not edit -->"
END = "<!-- end of generated table -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join("docs", "models")


def family_module(spec: ModelSpec) -> str:
    return spec.family.partition(":")[0]


def doc_page(module: str) -> str:
    """A family's page, relative to the repository root: ``docs/models/<family module>.md``."""
    return os.path.join(DOCS, f"{module}.md")


def _control(spec: ModelSpec) -> str:
    low, high = spec.control_images
    if high == 0:
        return "—"
    if low == high:
        return f"{low} (required)"
    return f"{low}..{high}"


def _video(spec: ModelSpec) -> str:
    if spec.video is None:
        return "—"
    return f"{spec.video.num_frames} frames @ {spec.video.fps} fps ({spec.video.frame_step}k+{spec.video.frame_offset})"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows) -> str:
    return "\n".join([_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)])


def models_table() -> str:
    """README's table: every id, with a link to its family's page where one exists."""
    header = ["id", "diffusers pipeline", "steps / guidance", "divisor", "LoRA mode", "negative", "control images",
              "video", "docs"]
    rows = []
    for spec in REGISTRY.values():
        page = doc_page(family_module(spec))
        link = f"[{os.path.basename(page)}]({page})" if os.path.isfile(os.path.join(ROOT, page)) else "—"
        rows.append([f"`{spec.model_id}`", spec.pipeline_class, f"{spec.steps} / {spec.guidance} ({spec.guidance_kind})",
                     spec.divisor, spec.lora_mode, "used" if spec.uses_negative else "ignored", _control(spec),
                     _video(spec), link])
    return _table(header, rows)


def family_table(module: str) -> str:
    """A family page's defaults: the ids whose family class lives in ``families/<module>.py``."""
    header = ["id", "base checkpoint", "diffusers pipeline", "size", "steps / guidance", "divisor", "LoRA mode",
              "negative", "control images", "video"]
    rows = [[f"`{s.model_id}`", f"`{s.base}`", s.pipeline_class, f"{s.width} x {s.height}",
             f"{s.steps} / {s.guidance} ({s.guidance_kind})", s.divisor, s.lora_mode,
             "used" if s.uses_negative else "ignored", _control(s), _video(s)]
            for s in REGISTRY.values() if family_module(s) == module]
    return _table(header, rows)


def generated_files() -> "OrderedDict[str, str]":
    """Relative path -> the table that belongs between its markers."""
    files = OrderedDict([("README.md", models_table())])
    for module in OrderedDict.fromkeys(family_module(s) for s in REGISTRY.values()):
        if os.path.isfile(os.path.join(ROOT, doc_page(module))):
            files[doc_page(module)] = family_table(module)
    return files


def render(text: str, table: str, path: str) -> str:
    """``text`` with the block between the markers replaced by ``table``."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"{path} needs exactly one pair of generated-table markers:\n{START}\n{END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def _updates() -> "OrderedDict[str, str]":
    """Relative path -> its new text, for each file whose generated table differs from the registry."""
    updates = OrderedDict()
    for path, table in generated_files().items():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        updated = render(text, table, path)
        if updated != text:
            updates[path] = updated
    return updates


def stale_files() -> list[str]:
    """The files whose generated table differs from the registry."""
    return list(_updates())


def write_all() -> list[str]:
    updates = _updates()
    for path, text in updates.items():
        with atomic_path(os.path.join(ROOT, path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return list(updates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the registry's tables into README.md and docs/models/.")
    parser.add_argument("--check", action="store_true", help="only report out-of-date files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"out of date: {path}")
        return 1 if stale else 0
    for path in write_all():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
