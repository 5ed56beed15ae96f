"""Import shims for running ai-toolkit's own sampling code (AITK_DIR, with its pinned diffusers at AITK_DIFFUSERS_SRC)
beside a Python that lacks some of its dependencies; none of the stubbed modules takes part in sampling an image.

* torchaudio: an empty module (with a spec, as transformers probes it).
* torchvision, cv2, albumentations (and PyAV when absent): permissive stubs (imported at module level by ai-toolkit's
  model and data-loader modules; only adapter and data paths use them).
* extensions_built_in and extensions_built_in.diffusion_models: bare namespace packages, so that their __init__ (which
  imports every extension) does not run.
"""
import importlib.machinery
import os
import sys
import types

AITK = os.environ["AITK_DIR"]
PINNED_DIFFUSERS = os.path.join(os.environ["AITK_DIFFUSERS_SRC"], "diffusers", "__init__.py")


#: modules imported at module level by ai-toolkit's base-model/data-loader chain, never used on the paths run here
ANYTHING_STUBS = ["cv2", "albumentations"]
try:  # PyAV: imported by ai-toolkit's data-loader modules, not on the image sample path; absent on the GPU machine
    import av  # noqa: F401
except ImportError:
    ANYTHING_STUBS.append("av")


class _Anything(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


def _module(name, cls=types.ModuleType, path=None):
    m = cls(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
    if path is not None:
        m.__path__ = [path]
    sys.modules[name] = m
    return m


def install():
    # transformers decides once whether torchvision exists: let it see the truth before the stub goes in
    from transformers import AutoTokenizer, Qwen3VLTextModel, CLIPTextModel, T5EncoderModel  # noqa: F401
    import transformers.image_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    _module("torchaudio")
    tv = _module("torchvision", _Anything, path="")
    tv.transforms = _module("torchvision.transforms", _Anything, path="")
    tv.transforms.functional = _module("torchvision.transforms.functional", _Anything)
    tv.transforms.v2 = _module("torchvision.transforms.v2", _Anything)  # hidream_o1's pipeline module (import only)
    # the one torchvision function a sample path here really calls (Wan 2.2 A14B I2V's control image): to_tensor on an
    # RGB uint8 PIL image = float32 CHW in 0..1 (as golden_wan22i2v/make.py)
    import numpy as np
    import torch

    tv.transforms.functional.to_tensor = lambda pic: torch.from_numpy(
        np.array(pic, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
    for name in ANYTHING_STUBS:
        _module(name, _Anything)
    _module("extensions_built_in", path=os.path.join(AITK, "extensions_built_in"))
    _module("extensions_built_in.diffusion_models", path=os.path.join(AITK, "extensions_built_in", "diffusion_models"))
    # transformers 5 flattened CLIPTextModel (no `.text_model`); ai-toolkit's StableDiffusion.save_device_state reads
    # `text_encoder.text_model.final_layer_norm.weight.requires_grad` (SD1 path): point it at the model itself
    from transformers import CLIPTextModel as _Clip
    if not hasattr(_Clip, "text_model"):
        _Clip.text_model = property(lambda self: self)
    import diffusers

    assert os.path.realpath(diffusers.__file__) == os.path.realpath(PINNED_DIFFUSERS), diffusers.__file__
