"""Host memory the GPU copies weights from: page-locked (pinned) where the system allows it, so that the copies run
at the link's rate beside the compute; plain memory where the system refuses to pin more (Windows and WSL cap
page-locked memory), whose copies are slower but correct. Imported only where weights go to the host (it imports
torch)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def host_tensor(shape, dtype, pin: bool, what: str) -> torch.Tensor:
    """An empty host tensor, pinned when ``pin`` and the system allows it; where it refuses, plain memory and one
    warning that names ``what`` (the weights that go there and what the fallback costs them)."""
    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError as error:
            logger.warning("The system refused more page-locked (pinned) host memory (%s): %s; quantize='fp8' halves "
                           "the bytes to pin.", str(error).splitlines()[0], what)
    return torch.empty(shape, dtype=dtype)
