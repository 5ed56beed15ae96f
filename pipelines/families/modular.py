"""What the families that drive diffusers' modular pipelines (Anima, MiniMax-H3) share."""

from __future__ import annotations

import contextlib
import logging

from diffusers.modular_pipelines import ModularPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam


class _BlockErrorEcho(logging.Filter):
    """Drops diffusers' ``Error in block`` records: each level of nested blocks logs the exception again, with its
    traceback, before re-raising it to the caller anyway (and an interrupt from the progress callback is no error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith("Error in block:")


@contextlib.contextmanager
def block_errors_not_echoed():
    block_logger = logging.getLogger("diffusers.modular_pipelines.modular_pipeline")
    echo_filter = _BlockErrorEcho()
    block_logger.addFilter(echo_filter)
    try:
        yield
    finally:
        block_logger.removeFilter(echo_filter)


def disable_progress_bars(blocks) -> None:
    """Every block's tqdm bar off (``ModularPipeline.set_progress_bar_config`` reaches one level only; the denoising
    loop is two levels down)."""
    for block in blocks.sub_blocks.values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        if getattr(block, "sub_blocks", None):
            disable_progress_bars(block)


class StepEndBlock(ModularPipelineBlocks):
    """The last block of each denoising step: call ``callback_on_step_end(pipe, step, timestep, kwargs)``, as diffusers'
    classic pipelines do (progress reports; raising from it interrupts). A family subclasses it with its
    ``model_name`` and, in ``step_outputs``, the loop state it hands out in ``kwargs`` (``latents`` when they are
    image-shaped, for previews)."""

    step_outputs: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return f"Call the step-end callback after each {self.model_name} denoising step."

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("callback_on_step_end")]

    def __call__(self, components, block_state, i, t):
        if block_state.callback_on_step_end is not None:
            block_state.callback_on_step_end(components, i, t,
                                             {name: getattr(block_state, name) for name in self.step_outputs})
        return components, block_state
