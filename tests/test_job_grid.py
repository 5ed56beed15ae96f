"""The training-job grid (``pipelines.jobs.grid``, ``reproduce --grid``, AITK Training Job / AITK Job Previews) on a
copy of the tiny FLUX end-to-end job (goldens/e2e/flux: ai-toolkit's own step-10 LoRA and samples), given a second,
earlier checkpoint that has no samples."""

import contextlib
import io
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import GOLDENS_DIR
from test_nodes import import_pack

pytestmark = pytest.mark.usefixtures("one_thread")

E2E_FLUX = os.path.join(GOLDENS_DIR, "e2e", "flux")
STRENGTHS = "1.0, 0.5"


def copy_job_with_two_checkpoints(folder) -> str:
    """The e2e FLUX job copied to ``folder`` plus ``flux_000000005.safetensors`` (its LoRA at half the weights)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(E2E_FLUX, folder)
    state = load_file(str(folder / "flux_000000010.safetensors"))
    save_file({key: value * 0.5 for key, value in state.items()}, str(folder / "flux_000000005.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The e2e FLUX job with two checkpoints."""
    return copy_job_with_two_checkpoints(tmp_path_factory.mktemp("output") / "flux")


@pytest.fixture(scope="module")
def grid(job, tiny_dir):
    from aitk_inference.pipelines.jobs.grid import reproduce_grid

    return reproduce_grid(job, base=tiny_dir("flux"), strengths=STRENGTHS, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def single(tiny_dir):
    """A second pipeline for the one-by-one renders."""
    from aitk_inference.pipelines import load_pipeline

    return load_pipeline("flux", base=tiny_dir("flux"), device="cpu", dtype="fp32", lora_mode="dynamic")


def _crop(image, box):
    return np.asarray(image.crop(box).convert("RGB"))


def test_checkpoints_are_listed_by_step(job):
    from aitk_inference.pipelines.jobs.config import job_checkpoints, read_job

    training = read_job(job)
    listed = job_checkpoints(training.folder, training.name, training.process)
    assert [(c.step, c.name) for c in listed] == [(5, "flux_000000005.safetensors"), (10, "flux_000000010.safetensors")]


def test_grid_size_and_cell_layout(grid, job):
    from aitk_inference.pipelines.jobs.config import find_previews

    assert grid.rows == [(5, 1.0), (5, 0.5), (10, 1.0), (10, 0.5)] and grid.columns == [0, 1, 2]
    assert len(grid.cells) == 12
    sizes = {0: (64, 64), 1: (64, 96), 2: (80, 64)}  # (height, width) of each sample, from the job's sample section
    previews = find_previews(job)
    for r, (step, strength) in enumerate(grid.rows):
        row = grid.cells[3 * r:3 * r + 3]
        assert [(c.step, c.strength, c.index) for c in row] == [(step, strength, i) for i in range(3)]
        assert len({c.ours_box[1] for c in row}) == 1  # one row, one top edge
        for cell in row:
            assert cell.ours.shape == (*sizes[cell.index], 3)
            assert np.array_equal(_crop(grid.image, cell.ours_box), cell.ours)
            if step == 10:  # ai-toolkit's sample of that step, beside ours, as saved
                with Image.open(previews[(10, cell.index)]) as saved:
                    assert np.array_equal(_crop(grid.image, cell.theirs_box), np.asarray(saved.convert("RGB")))
                assert cell.theirs_box[0] > cell.ours_box[2] and cell.theirs_box[1] == cell.ours_box[1]
            else:
                assert cell.theirs is None and cell.theirs_box is None
    for j in range(3):  # one column, one left edge, rows top to bottom
        column = grid.cells[j::3]
        assert len({c.ours_box[0] for c in column}) == 1
        assert all(a.ours_box[3] < b.ours_box[1] for a, b in zip(column, column[1:]))
    right = max(c.theirs_box[2] if c.theirs_box else c.ours_box[2] for c in grid.cells)
    bottom = max(c.ours_box[3] for c in grid.cells)
    assert right < grid.image.width <= right + 200 and bottom < grid.image.height


def test_each_cell_equals_a_one_by_one_render(grid, job, single):
    from aitk_inference.pipelines.jobs.config import read_job
    from aitk_inference.pipelines.jobs.reproduce import checkpoint_loras, render_sample

    training = read_job(job)
    samples = training.samples()
    for cell in grid.cells:
        single.set_loras(checkpoint_loras([os.path.join(job, f"flux_{cell.step:09d}.safetensors")], cell.strength))
        alone = np.asarray(render_sample(single, training, samples[cell.index]).to_pil()[0].convert("RGB"))
        assert np.array_equal(cell.ours, alone), (cell.step, cell.strength, cell.index)
    by_key = {(c.step, c.strength, c.index): c.ours for c in grid.cells}
    assert not np.array_equal(by_key[(10, 1.0, 0)], by_key[(10, 0.5, 0)])  # strengths really differ
    assert not np.array_equal(by_key[(10, 1.0, 0)], by_key[(5, 1.0, 0)])  # checkpoints really differ


def test_distances_equal_reproduce_and_the_cli_prints_them(grid, job, tiny_dir, tmp_path):
    from aitk_inference.cli import main as cli_main
    from aitk_inference.pipelines.jobs.grid import difference_lines
    from aitk_inference.pipelines.jobs.reproduce import reproduce_job

    report = reproduce_job(job, base=tiny_dir("flux"), out_dir=str(tmp_path / "one"), device="cpu", dtype="fp32",
                           lora_mode="dynamic")
    assert report.step == 10
    compared = {c.index: c for c in grid.cells if c.step == 10 and c.strength == 1.0}
    for row in report.samples:
        with Image.open(row.file) as im:
            assert np.array_equal(compared[row.index].ours, np.asarray(im.convert("RGB")))
        assert compared[row.index].compare == row.compare and row.compare.max_abs <= 1
    # a strength other than the one ai-toolkit sampled at is shown beside, not compared
    assert all(c.compare is None for c in grid.cells if c.strength == 0.5 or c.step == 5)

    out = tmp_path / "grid.png"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(["reproduce", job, "--grid", "--base", tiny_dir("flux"), "--device", "cpu", "--dtype", "fp32",
                         "--steps", "last 1", "--prompts", "0, 2", "--out", str(out)]) == 0
    lines = printed.getvalue().splitlines()
    rows = {row.index: row for row in report.samples}
    assert lines[:2] == [f"step 10 strength 1 sample {i}: vs preview: " + ", ".join(difference_lines(rows[i].compare))
                         for i in (0, 2)]
    with Image.open(out) as written:
        cells = [c for c in grid.cells if c.step == 10 and c.strength == 1.0 and c.index in (0, 2)]
        assert written.height < grid.image.height and written.width < grid.image.width
        assert all(c.ours.shape[0] < written.height for c in cells)


def test_bad_folders_and_selections_say_what_to_fix(job, tmp_path, tiny_dir):
    from aitk_inference.cli import main as cli_main
    from aitk_inference.pipelines.jobs.grid import reproduce_grid

    base = tiny_dir("flux")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reproduce_grid(str(tmp_path / "missing"), base=base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        reproduce_grid(str(tmp_path / "empty"), base=base)
    no_loras = tmp_path / "no_loras"
    no_loras.mkdir()
    shutil.copy(os.path.join(job, "config.yaml"), no_loras)
    with pytest.raises(FileNotFoundError, match="No LoRA .* in job folder"):
        reproduce_grid(str(no_loras), base=base)
    for kwargs, message in ((dict(checkpoints="7, 10"), "step\\(s\\) 7 are not checkpoints of this job; it has steps 5, 10"),
                            (dict(checkpoints="last 0"), "N must be at least 1"),
                            (dict(checkpoints="newest"), "checkpoints 'newest' is not a list of numbers"),
                            (dict(strengths="strong"), "strengths 'strong' is not a list of numbers"),
                            (dict(strengths="3"), "outside -2.0..2.0"),
                            (dict(prompts="1, 5"), "prompt index\\(es\\) 5 are not samples of this job; it has 3")):
        with pytest.raises(ValueError, match=message):
            reproduce_grid(job, base=base, **kwargs)
    with pytest.raises(ValueError, match="wan21_1b makes videos: the previews grid is for image models"):
        reproduce_grid(os.path.join(GOLDENS_DIR, "e2e", "wan21_1b"), base=base)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert cli_main(["reproduce", job, "--steps", "last 1"]) == 2
        assert cli_main(["reproduce", job, "--grid"]) == 2
    assert "add --grid" in errors.getvalue() and "give --out FILE.png" in errors.getvalue()


# ------------------------------------------------------------------------------------------------ the nodes
@pytest.fixture(scope="module")
def core():
    pack = import_pack("aitk.job-grid-pack")
    pack.NODE_CLASS_MAPPINGS
    return sys.modules[pack.__name__ + ".nodes.core"]


def test_nodes_schema(core):
    mappings = sys.modules[core.__name__.rsplit(".", 1)[0] + ".classic"].NODE_CLASS_MAPPINGS
    job_node, previews_node = mappings["AITKTrainingJob"], mappings["AITKJobPreviews"]
    inputs = job_node.INPUT_TYPES()
    assert list(inputs["required"]) == ["job_folder", "base", "dtype", "device"]
    assert job_node.RETURN_TYPES == ("AITK_JOB", "STRING") and job_node.RETURN_NAMES == ("job", "checkpoints")
    inputs = previews_node.INPUT_TYPES()
    assert list(inputs["required"]) == ["job", "checkpoints", "strengths"] and list(inputs["optional"]) == ["prompts"]
    assert inputs["required"]["job"][0] == "AITK_JOB" and inputs["required"]["checkpoints"][1]["default"] == "all"
    assert previews_node.RETURN_TYPES == ("IMAGE",)


def test_node_path_renders_the_library_grid(core, job, tiny_dir, tmp_path):
    import importlib

    import torch

    root = core.__name__.rsplit(".", 2)[0]  # the pack's own module tree, as ComfyUI imports it
    cache = importlib.import_module(root + ".pipelines.runtime.cache")
    read_job = importlib.import_module(root + ".pipelines.jobs.config").read_job
    job_grid = importlib.import_module(root + ".pipelines.jobs.grid").job_grid

    handle, listing = core.training_job(job, base=tiny_dir("flux"), dtype="fp32", device="cpu")
    assert listing == "step 5: flux_000000005.safetensors\nstep 10: flux_000000010.safetensors"
    ticks = []
    image = core.job_previews(handle, "last 1", "", "0, 2", progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(1, 2), (2, 2)]
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    loads = cache.stats["loads"]
    again = core.job_previews(handle, "10", "", "0, 2", progress=None)
    assert cache.stats["loads"] == loads and torch.equal(image, again)  # the cached pipeline: no reload
    library = job_grid(handle.get_pipeline(), read_job(job), list(handle.checkpoints), "last 1", "", "0, 2")
    assert np.array_equal((image[0].numpy() * 255).round().astype(np.uint8), np.asarray(library.image))

    with pytest.raises(ValueError, match="job_folder is empty"):
        core.training_job("", base=tiny_dir("flux"))
    moved = tmp_path / "moved"
    shutil.copytree(job, moved)
    config = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(config.replace("name_or_path: tiny/flux", "name_or_path: /trainer/flux-base"))
    with pytest.raises(ValueError, match="'/trainer/flux-base' is neither a path on this machine nor a Hugging Face"):
        core.training_job(str(moved))  # the job names a folder of the machine that trained it
    with pytest.raises(ValueError, match="job must come from AITK Training Job"):
        core.job_previews("not a handle")
    before = core.job_fingerprint(job)
    assert before and core.job_fingerprint(str(tmp_path / "missing")) == ""
    shutil.copy(os.path.join(job, "flux_000000005.safetensors"), os.path.join(job, "flux_000000007.safetensors"))
    try:
        assert core.job_fingerprint(job) != before  # a new checkpoint re-runs the Training Job node
    finally:
        os.remove(os.path.join(job, "flux_000000007.safetensors"))
