"""ComfyUI-Manager's post-install step: install requirements.txt into the running interpreter, never touching torch.

Idempotent and quiet: when every requirement is already satisfied nothing is installed and nothing is printed.
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
PINNED = ("torch", "torchvision", "torchaudio")


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


def main() -> int:
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
