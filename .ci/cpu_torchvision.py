"""Make PyPI's torchvision importable beside a CPU-only torch (test environments only; run with that python).

PyPI's Linux torchvision wheel is a CUDA build: with the CPU torch its compiled ops do not load, and the module that
registers fake kernels for ``torchvision::nms``/``qnms`` then fails at import ("operator torchvision::nms does not
exist"), which stops ComfyUI from starting. This skips those two registrations when the ops are absent. Idempotent.
"""

import importlib.util
import os
import re

spec = importlib.util.find_spec("torchvision")
path = os.path.join(os.path.dirname(spec.origin), "_meta_registrations.py")
with open(path, encoding="utf-8") as f:
    source = f.read()
patched = re.sub(
    r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)',
    r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))',
    source, flags=re.M,
)
if patched != source:
    with open(path, "w", encoding="utf-8") as f:
        f.write(patched)
