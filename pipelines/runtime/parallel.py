"""Context parallelism: one generation shared by the processes ``torchrun`` starts, each holding the whole pipeline,
the denoiser's attention sharded along the sequence by diffusers (``ModelMixin.enable_parallelism`` with a
``ContextParallelConfig``; Ulysses and/or ring).

Every process runs the same call with the same inputs: rank 0's resolved parameters are sent to the others
(:func:`same_on_every_rank`), so a drawn seed is drawn once; LoRAs are applied identically on every rank. Only rank 0
writes files (:func:`writes_outputs`).
"""

from __future__ import annotations

import contextlib
import os

from .options import LoadOptionError, parallel_world_size, parse_parallel


def launch() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` of this process: torch.distributed's once it is initialised, else what
    ``torchrun`` put in the environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); ``(0, 0, 1)`` for a plain process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_world_size()
    rank = int(os.environ.get("RANK", 0))
    return rank, int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("WORLD_SIZE", 1))


def process_device(parallel: str, device: str, model_id: str, kinds: tuple[str, ...]) -> str:
    """The device of this process for ``parallel`` (a normalised ``LoadOptions.parallel``), after checking that the
    model's denoiser can be sharded so (``kinds``: ``ModelSpec.context_parallel``) and that the world size is the
    product of the degrees. ``device`` is the resolved device option: ``cuda`` becomes ``cuda:LOCAL_RANK``; an
    explicit ``cuda:N`` must be that one."""
    degrees = parse_parallel(parallel)
    if not kinds:
        raise LoadOptionError(f"{model_id} cannot be sharded over processes (its denoiser has no diffusers "
                              "context-parallel plan that runs here); leave parallel 'none' (README lists the models "
                              "that take it).", {"parallel": parallel})
    missing = [kind for kind in degrees if kind not in kinds]
    if missing:
        raise LoadOptionError(f"{model_id} shards with {' and '.join(kinds)} only, not {' and '.join(missing)}; use "
                              f"parallel='{kinds[0]}=N'.", {"parallel": parallel})
    _, local_rank, world_size = launch()
    if parallel_world_size(degrees) != world_size:
        raise LoadOptionError(
            f"parallel={parallel!r} shards over {parallel_world_size(degrees)} processes but this run has "
            f"{world_size}; start it with torchrun --nproc-per-node {parallel_world_size(degrees)} (or make the "
            "degrees' product the world size).", {"parallel": parallel})
    if device == "cuda":
        return f"cuda:{local_rank}"
    if device.startswith("cuda:") and device != f"cuda:{local_rank}":
        raise LoadOptionError(f"parallel={parallel!r}: device {device!r} is not this process's GPU (LOCAL_RANK "
                              f"{local_rank}); leave the device unset or 'cuda'.", {"parallel": parallel, "device": device})
    return device


def init_process_group(device: str) -> None:
    """Join the process group ``torchrun`` set up in the environment (NCCL on CUDA, gloo elsewhere), unless the
    caller already did, and make ``device`` this process's current GPU."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                device_id=torch.device(device) if device.startswith("cuda") else None)


@contextlib.contextmanager
def _cpu_counts_as_one_device(device: str):
    """diffusers 0.42.1 derives a device index as ``rank % torch.accelerator.device_count()``, a division by zero
    where torch has no accelerator; the device it derives is only recorded. On the CPU, count one device meanwhile."""
    import torch

    if device.startswith("cuda"):
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def enable_context_parallel(denoisers: list, parallel: str, device: str) -> None:
    """Shard the attention of each of ``denoisers`` (MoE families: every expert) as ``parallel`` says, with the
    model's own context-parallel plan (``_cp_plan``), one ``ContextParallelConfig`` (and device mesh) each."""
    from diffusers import ContextParallelConfig

    degrees = parse_parallel(parallel)
    for denoiser in denoisers:
        if not getattr(denoiser, "_cp_plan", None):
            raise ValueError(f"{type(denoiser).__name__} has no context-parallel plan; leave parallel 'none'.")
        # Ulysses alone shards unevenly ("anything"), so that any token count runs (odd latent sizes, Qwen-Image's
        # prompt-length text tokens); ring, alone or with Ulysses, needs token counts that divide by its degree
        config = ContextParallelConfig(ulysses_degree=degrees.get("ulysses", 1), ring_degree=degrees.get("ring", 1),
                                       ulysses_anything="ring" not in degrees)
        with _cpu_counts_as_one_device(device):
            denoiser.enable_parallelism(config=config)


@contextlib.contextmanager
def context_parallel_reapplied(denoisers: list):
    """Take the context-parallel hooks off ``denoisers`` and put them back afterwards, by name: PEFT replaces a
    Linear the plan hooks (``proj_out``, whose output is gathered) with a wrapper whose LoRA branch would then see
    the sharded input beside the gathered output; re-applied, the hook sits on the wrapper."""
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    for denoiser in denoisers:
        remove_context_parallel(denoiser, denoiser._cp_plan)
    try:
        yield
    finally:
        for denoiser in denoisers:
            apply_context_parallel(denoiser, denoiser._parallel_config.context_parallel_config, denoiser._cp_plan)


def same_on_every_rank(value):
    """Rank 0's ``value`` on every rank (pickled), e.g. resolved parameters with a drawn seed."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def writes_outputs() -> bool:
    """Whether this process writes files: rank 0, or a process outside any process group."""
    return launch()[0] == 0
