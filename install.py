"""ComfyUI-Manager's post-install step: install requirements.txt into the running interpreter, never touching torch.

Idempotent and quiet: when every requirement is already satisfied nothing is installed and nothing is printed
(``python install.py`` imports nothing heavy and asks no package index then).
The installed torch (and torchvision/torchaudio, when present) are pinned with a pip constraint so that no
dependency can replace the user's build (for example a CUDA torch by a CPU one). Nothing is cloned or downloaded
except the listed packages from the configured package index.
"""

import os
import subprocess
import sys
import tempfile
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
PYPROJECT = os.path.join(HERE, "pyproject.toml")
PINNED = ("torch", "torchvision", "torchaudio")
REQUIREMENTS_HEADER = (
    "# Written by `python install.py --write-requirements` from pyproject.toml's [project].dependencies\n"
    "# (the one list: edit it there). torch is NOT listed on purpose: ComfyUI (or you) own the torch build.\n"
)


def declared_dependencies(path: str = PYPROJECT) -> list[str]:
    """``[project].dependencies`` of pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip always ships a copy of tomli
        from pip._vendor import tomli as tomllib

    with open(path, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def requirements_text() -> str:
    """What requirements.txt holds: the header and one dependency per line."""
    return REQUIREMENTS_HEADER + "".join(f"{line}\n" for line in declared_dependencies())


def missing_requirements(path: str) -> list[str]:
    """Requirement lines whose package is absent or outside the requested version range."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always ships a copy
        from pip._vendor.packaging.requirements import Requirement

    missing = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            try:
                version = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                missing.append(line)
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                missing.append(line)
    return missing


def torch_constraints() -> str:
    """``name==version`` lines for the torch packages that are installed."""
    lines = []
    for name in PINNED:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--write-requirements"]:
        with open(REQUIREMENTS, "w", encoding="utf-8") as f:
            f.write(requirements_text())
        return 0
    if argv:
        sys.stderr.write("usage: python install.py [--write-requirements]\n")
        return 2
    missing = missing_requirements(REQUIREMENTS)
    if not missing:
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(torch_constraints())
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", REQUIREMENTS,
             "-c", constraints.name],
            capture_output=True, text=True,
        )
    finally:
        os.unlink(constraints.name)
    if result.returncode != 0:
        sys.stderr.write(f"AITK Inference: installing {', '.join(missing)} failed:\n{result.stdout}{result.stderr}")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
