"""The ComfyUI pack as it is installed and published: dependencies, install.py, pyproject.toml, published files, and
the Load node's base-source line (no ComfyUI needed)."""

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
import types

import pytest

from aitk_inference.nodes import core

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# install.py is a script at the pack's root, run by ComfyUI-Manager; load it as a module
_spec = importlib.util.spec_from_file_location("aitk_install", os.path.join(ROOT, "install.py"))
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_requirements_txt_is_written_from_pyproject_and_never_names_torch(pyproject):
    with open(install.REQUIREMENTS, encoding="utf-8") as f:
        assert f.read() == install.requirements_text(), "regenerate: python install.py --write-requirements"
    names = [line.split(">")[0].split("=")[0].split("<")[0] for line in pyproject["project"]["dependencies"]]
    assert names and not {"torch", "torchvision", "torchaudio"} & set(names)


def test_install_py_is_quiet_and_installs_nothing_when_everything_is_there():
    assert install.missing_requirements(install.REQUIREMENTS) == []
    result = subprocess.run([sys.executable, "install.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert "torch==" in install.torch_constraints()  # what would pin the user's torch if something were missing


def test_install_py_reports_what_is_missing(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# a comment\npillow>=1\nno-such-package-aitk>=1\npillow<1 ; python_version < '3'\n")
    assert install.missing_requirements(str(requirements)) == ["no-such-package-aitk>=1"]
    assert install.main(["--bogus"]) == 2


def test_pyproject_is_ready_for_the_registry(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert project["license"] == {"file": "LICENSE"}
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        assert f.readline().strip() == "MIT License"
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith(".png")
    assert comfy["PublisherId"] and comfy["DisplayName"] == "AITK Inference"
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert os.path.isfile(os.path.join(ROOT, "icon.png"))
    assert os.path.isfile(os.path.join(ROOT, ".github", "workflows", "publish.yml"))


def test_templates_category_is_titled_by_the_display_name():
    """ComfyUI's Browse Templates lists a pack's examples under its folder name unless the pack's locales translate
    ``templateWorkflows.category.<folder>``: the registry's folder (the project name) and the package's name, both
    titled with the pack's DisplayName."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    with open(os.path.join(ROOT, "locales", "en", "main.json"), encoding="utf-8") as f:
        categories = json.load(f)["templateWorkflows"]["category"]
    folders = {pyproject["project"]["name"], "aitk_inference"}
    assert categories == dict.fromkeys(folders, pyproject["tool"]["comfy"]["DisplayName"])


def test_published_pack_leaves_out_tests_benchmarks_and_ci():
    with open(os.path.join(ROOT, ".comfyignore"), encoding="utf-8") as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {"tests/", "benchmarks/", ".ci/", ".github/"} <= ignored


# ------------------------------------------------------------------------------------------------ Load node's base line
def test_base_source_local_folder(tiny_dir):
    info = core.base_source("flux", tiny_dir("flux"))
    assert info["kind"] == "local" and info["cached"] and info["bytes"] > 0


def test_base_source_stops_counting_a_folder_that_is_no_model(monkeypatch, tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}.bin").write_bytes(b"x" * 10)
    assert core.base_source("flux", str(tmp_path))["bytes"] == 40
    monkeypatch.setattr(core, "MAX_COUNTED_FILES", 3)
    info = core.base_source("flux", str(tmp_path))
    assert info["kind"] == "local" and info["bytes"] is None


def test_base_source_hub_repo_not_downloaded_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    info = core.base_source("flux", "")
    assert info == {"kind": "hub", "source": "black-forest-labs/FLUX.1-dev", "bytes": None, "cached": False,
                    "gated": None, "offline": True}


def test_base_source_hub_repo_in_the_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--owner--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "blobs" / "123").write_bytes(b"x" * 1000)
    os.symlink(repo / "blobs" / "123", repo / "snapshots" / "abc" / "model.safetensors")
    info = core.base_source("flux", "owner/name")
    assert (info["kind"], info["source"], info["cached"], info["bytes"]) == ("hub", "owner/name", True, 1000)


def test_base_source_bad_base_is_an_error():
    info = core.base_source("flux", "not a path or repo")
    assert info["kind"] == "error" and "Hugging Face repo id" in info["source"]
    assert core.base_source("no_such_model")["kind"] == "error"


def test_base_source_asks_the_hub_once_for_the_download_size(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    asked = []

    def model_info(self, repo_id, **kwargs):
        asked.append((repo_id, kwargs["files_metadata"]))
        files = {"model_index.json": 1_000, "transformer/diffusion.safetensors": 20_000_000_000,
                 "vae/diffusion.safetensors": 300_000_000, "flux1-dev.safetensors": 23_000_000_000}
        return types.SimpleNamespace(gated="manual", siblings=[types.SimpleNamespace(rfilename=name, size=size)
                                                               for name, size in files.items()])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(core, "_HUB_SIZES", {})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for _ in range(2):
        info = core.base_source("flux", "")
        # the root single-file checkpoint is not part of a diffusers load
        assert (info["bytes"], info["gated"], info["cached"]) == (20_300_001_000, True, False)
    assert asked == [("black-forest-labs/FLUX.1-dev", True)]
