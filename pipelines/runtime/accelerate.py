"""Where a pipeline runs and how fast: device and dtype resolution, placement and CPU offload, torch.compile (with
its on-disk kernel cache), the attention kernel and FP8 weights. ``AITKPipeline.from_spec`` applies them in that
order; each works on the denoiser module(s) it is given (MoE families pass all their experts).
"""

from __future__ import annotations

import importlib.util
import logging
import os

from .options import ATTENTION_KERNELS, TORCH_DTYPE_NAMES, attention_device_problem, unknown_option

#: where torch.compile keeps its compiled kernels between processes (unless TORCHINDUCTOR_CACHE_DIR is set)
COMPILE_CACHE_ENV = "AITK_COMPILE_CACHE"

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------- device and dtype
def resolve_device(device: str | None) -> str:
    """``device`` as a string; unset: CUDA when available, else MPS, else CPU."""
    import torch

    if device:
        return str(device)
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype, device: str):
    """``None``/``"auto"``: float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto", ""):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    name = TORCH_DTYPE_NAMES.get(str(dtype).lower())
    if name is None:
        raise unknown_option("dtype", dtype)
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------------------------- placement
def direct_load_options(device: str, offload: str) -> dict:
    """``from_pretrained`` options that read the weights straight onto ``device`` (no CPU copy on the way), when
    nothing is offloaded and diffusers' loader can place weights on that device; else none (``auto`` too: it loads on
    the CPU and measures the components before it places them)."""
    from diffusers.utils.torch_utils import get_device

    return {"device_map": device} if offload == "none" and device in (get_device(), "cpu") else {}


#: GPU memory ``offload="auto"`` leaves free for activations, the VAE decode and the CUDA context, by kind of output;
#: an image model whose decode needs more at its default size gets that (:func:`activation_reserve`)
AUTO_OFFLOAD_RESERVE_GIB = {"image": 3.0, "video": 12.0}
#: the peak GPU memory of an untiled decode beyond the VAE's weights, in tensors of the image's size at the decoder's
#: full-resolution width (:func:`decoder_full_resolution_width`), by VAE class: measured at full size in bf16 on an
#: H100 (``benchmarks/decode_memory.py``; BENCHMARKS.md, "... and what an image decode needs"). Qwen-Image's VAE
#: needs 1.7 times FLUX's memory per pixel (4.1 GiB at 1024x1024): under a 24 GiB cap its decode ran out of memory
#: with the 3 GiB image reserve and fell back to tiles.
DECODE_PEAK_TENSORS = {"AutoencoderKL": 9.5, "AutoencoderKLFlux2": 9.5, "AutoencoderKLQwenImage": 22.0}
#: caps the GPU memory ``offload="auto"`` plans for (GiB), e.g. to leave room for another program on the card
MAX_GPU_MEMORY_ENV = "AITK_MAX_GPU_MEMORY_GIB"


def gpu_memory_budget(device: str) -> int | None:
    """The bytes this process may still fill on ``device``: the card's free memory, capped by torch's per-process
    fraction and by ``AITK_MAX_GPU_MEMORY_GIB``; None off CUDA."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free, total = torch.cuda.mem_get_info(index)
    held = torch.cuda.memory_reserved(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.8
    caps = [free, int((fraction(index) if fraction else 1.0) * total) - held]
    if os.environ.get(MAX_GPU_MEMORY_ENV):
        try:
            caps.append(int(float(os.environ[MAX_GPU_MEMORY_ENV]) * 2**30) - held)
        except ValueError:
            raise ValueError(f"{MAX_GPU_MEMORY_ENV}={os.environ[MAX_GPU_MEMORY_ENV]!r} is not a number of GiB; "
                             "set it like 12 or 23.5, or unset it.") from None
    return max(min(caps), 0)


def tensor_bytes(tensor) -> int:
    """The bytes ``tensor`` holds: for a tensor subclass that wraps others (torchao's FP8 weights: float8 values and
    float32 scales, under a bfloat16 face), the sum of what it wraps."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return tensor.numel() * tensor.element_size()


def module_bytes(module) -> int:
    """The bytes of ``module``'s parameters and buffers, at their current dtype (FP8 weights as their FP8 bytes)."""
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def component_bytes(pipe) -> dict[str, int]:
    """The bytes of each model component of ``pipe``."""
    import torch

    return {name: module_bytes(module) for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def blocks_in_order(denoiser) -> list[tuple[str, object]]:
    """The repeated blocks of ``denoiser`` (the members of its ModuleLists, which ``offload="auto"`` streams one by
    one), named as in ``named_modules``, in the order they are declared (the order a forward runs them). A denoiser
    with no ModuleList among its children (a transformers model wrapped whole, such as HiDream-O1's, whose decoder
    layers are ``language_model.layers``) gives the members of its deeper ModuleLists that are of the block classes
    it declares (``_repeated_blocks``, or transformers' and diffusers' ``_no_split_modules``)."""
    import torch

    lists = (torch.nn.ModuleList, torch.nn.Sequential)
    blocks = [(f"{name}.{index}", block) for name, child in denoiser.named_children()
              if isinstance(child, lists) for index, block in enumerate(child)]
    if blocks:
        return blocks
    classes = set(getattr(denoiser, "_repeated_blocks", None) or getattr(denoiser, "_no_split_modules", None) or ())
    return [(f"{name}.{index}", block) for name, child in denoiser.named_modules()
            if isinstance(child, lists) for index, block in enumerate(child) if type(block).__name__ in classes]


def resident_block_budget(denoisers: dict[str, object], budget: int, reserve: int) -> dict[str, int]:
    """How many bytes of each denoiser's blocks ``offload="auto"`` keeps on the GPU when it has to stream the rest:
    what the budget leaves after ``reserve``, the denoisers' other weights and two streamed blocks each (the one
    running and the one being fetched), shared equally between the denoisers (the two experts of an MoE model)."""
    left = budget - reserve
    for denoiser in denoisers.values():
        blocks = [module_bytes(block) for _, block in blocks_in_order(denoiser)]
        left -= module_bytes(denoiser) - sum(blocks) + 2 * max(blocks, default=0)
    share = max(left, 0) // max(len(denoisers), 1)
    return dict.fromkeys(denoisers, share)


def blocks_to_keep(sizes: list[int], resident_bytes: int) -> list[bool]:
    """Which blocks (their bytes, in the order a forward runs them) stay on the GPU within ``resident_bytes``, the
    streamed ones spread among them: a block is kept while the bytes kept before it are at most the budget's share
    of all the bytes before it (the first one always), so that each streamed block is fetched while kept blocks run
    instead of waiting on the one fetched before it; then any streamed block that still fits is kept."""
    share = min(resident_bytes / max(sum(sizes), 1), 1.0)
    keep, kept, before = [], 0, 0
    for size in sizes:
        keep.append(kept <= share * before and kept + size <= resident_bytes)
        kept += size if keep[-1] else 0
        before += size
    for index, size in enumerate(sizes):
        if not keep[index] and kept + size <= resident_bytes:
            keep[index] = True
            kept += size
    return keep


def offload_blocks_keeping_resident(denoiser, device: str, resident_bytes: int) -> int:
    """Put ``denoiser`` on ``device`` except the blocks :func:`blocks_to_keep` does not keep within
    ``resident_bytes``, which stream from pinned host memory, each copied while the blocks before it run
    (``streaming.BlockStreamer``). Applied again (after a LoRA change), it first stops the streaming set up before;
    blocks whose weights did not change are not copied again. Returns how many blocks stay."""
    from .streaming import HOST_COPY, BlockStreamer

    remove_block_streaming(denoiser)
    blocks = [block for _, block in blocks_in_order(denoiser)]
    keep = blocks_to_keep([module_bytes(block) for block in blocks], resident_bytes)
    streamed = [block for block, kept in zip(blocks, keep) if not kept]
    inside_streamed = {id(module) for block in streamed for module in block.modules()}
    for module in denoiser.modules():
        if id(module) not in inside_streamed:
            move_own_tensors(module, device)
    for block, kept in zip(blocks, keep):
        if kept:
            block.__dict__.pop(HOST_COPY, None)  # its pinned host copy, from a placement before
    if streamed:
        setattr(denoiser, _STREAMER, BlockStreamer(streamed, device))
    return sum(keep)


#: the attribute of a denoiser whose blocks stream: its ``streaming.BlockStreamer``
_STREAMER = "_aitk_block_streamer"


def remove_block_streaming(denoiser) -> None:
    """Stop the streaming :func:`offload_blocks_keeping_resident` set up (the streamed blocks keep their weights in
    host memory); nothing where none was."""
    streamer = denoiser.__dict__.pop(_STREAMER, None)
    if streamer is not None:
        streamer.remove()


def move_own_tensors(module, device) -> None:
    """Move the parameters and buffers ``module`` itself holds (not its children's) to ``device``; a quantized
    (torchao) weight, which cannot change ``.data`` across devices, becomes a new ``Parameter``."""
    import torch

    device = torch.device(device)
    for name, tensor in module._parameters.items():
        if tensor is None or (tensor.device.type == device.type and device.index in (None, tensor.device.index)):
            continue
        if type(tensor) is torch.nn.Parameter:
            tensor.data = tensor.data.to(device)
        else:
            module._parameters[name] = torch.nn.Parameter(tensor.to(device), requires_grad=False)
    for name, tensor in module._buffers.items():
        if tensor is not None:
            module._buffers[name] = tensor.to(device)


def decoder_full_resolution_width(vae) -> int | None:
    """The channels of ``vae``'s decoder at the image's resolution (its last up block), None for a VAE whose
    configuration does not say."""
    config = getattr(vae, "config", {})
    widths = config.get("decoder_block_out_channels") or config.get("block_out_channels")
    return widths[0] if widths else config.get("base_dim")


def activation_reserve(vae, video: bool, pixels: int) -> int:
    """The bytes ``offload="auto"`` keeps free beside the weights it places: ``AUTO_OFFLOAD_RESERVE_GIB`` for the
    kind of output, or for an image model the untiled decode of a ``pixels`` image where that is more
    (``DECODE_PEAK_TENSORS``)."""
    reserve = int(AUTO_OFFLOAD_RESERVE_GIB["video" if video else "image"] * 2**30)
    tensors, width = DECODE_PEAK_TENSORS.get(type(vae).__name__), decoder_full_resolution_width(vae)
    if video or tensors is None or width is None:
        return reserve
    element_bytes = next(vae.parameters()).element_size()
    return max(reserve, int(tensors * pixels * width * element_bytes))


def choose_offload(sizes: dict[str, int], budget: int | None, reserve: int) -> str:
    """The fastest placement whose GPU-resident weights plus ``reserve`` fit ``budget`` bytes: ``none`` (all on the
    GPU), ``model`` (one component at a time, whole), else ``group`` (layer by layer, transfers overlapped). No
    budget (not a CUDA device) means ``none``."""
    if budget is None or sum(sizes.values()) + reserve <= budget:
        return "none"
    if max(sizes.values(), default=0) + reserve <= budget:
        return "model"
    return "group"


def place(pipe, device: str, offload: str, resident: dict[str, int] | None = None, whole=()) -> None:
    """Move the pipeline to ``device`` or set up CPU offloading: ``model`` (whole components move in and out),
    ``sequential`` (accelerate, layer by layer: least memory, slowest) or ``group`` (diffusers group offloading,
    layer by layer with transfers overlapped on a CUDA stream). With ``group``, ``resident`` maps denoiser component
    names to the bytes of their blocks that stay on the GPU (:func:`offload_blocks_keeping_resident`), and the
    components named in ``whole`` go on the GPU as they are (:func:`components_placed_whole`, which decides it: those
    that cannot be group-offloaded among them)."""
    import torch

    if offload == "group" and resident:
        from diffusers.hooks import apply_group_offloading

        leaf_level = {"onload_device": torch.device(device), "offload_type": "leaf_level",
                      "use_stream": str(device).startswith("cuda")}
        for name, component in pipe.components.items():
            if name in resident:
                offload_blocks_keeping_resident(component, device, resident[name])
            elif name in whole:
                component.to(device)
            elif hasattr(component, "enable_group_offload"):  # as the pipeline's own enable_group_offload does
                component.enable_group_offload(**leaf_level)
            elif isinstance(component, torch.nn.Module):
                apply_group_offloading(component, **leaf_level)
        return

    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=str(device).startswith("cuda"),
                                  exclude_modules=[name for name, component in pipe.components.items()
                                                   if refuses_group_offloading(component)])


#: a video model's decoders, which ``offload="auto"`` keeps whole on the GPU when it streams the denoiser's blocks:
#: they run once per latent frame (and per tile), and streamed layer by layer each call fetched every layer again
#: (Wan 2.2 A14B under a 24 GiB cap: the tiled decode took 9.0 s streamed, 4.9 s with everything on the GPU)
VIDEO_DECODERS = ("vae", "audio_vae", "vocoder")


def components_placed_whole(pipe, video: bool, sizes: dict[str, int], budget: int, reserve: int) -> set[str]:
    """The components a ``group`` placement of ``offload="auto"`` puts on the GPU as they are: those diffusers
    cannot group-offload (:func:`refuses_group_offloading`), and a video model's decoders (``VIDEO_DECODERS``) where
    they fit the ``budget`` beside the ``reserve`` and the others."""
    whole = {name for name, component in pipe.components.items() if refuses_group_offloading(component)}
    decoders = {name for name in VIDEO_DECODERS if video and name in sizes}
    if sum(sizes.get(name, 0) for name in whole | decoders) + reserve <= budget:
        whole |= decoders
    return whole


def refuses_group_offloading(component) -> bool:
    """Whether ``component`` is a diffusers model whose class says it cannot be group-offloaded (it sets
    ``_supports_group_offloading`` to False and its ``enable_group_offload`` raises: ACE-Step's Oobleck VAE,
    MiniMax-H3's audio VAE). ``group`` placements put such components on the GPU whole; they are small (audio VAEs)."""
    return getattr(component, "_supports_group_offloading", True) is False


# ---------------------------------------------------------------------------------------------------------------- compile
def use_persistent_compile_cache() -> str:
    """Keep torch.compile's kernels in a folder that outlives the process and /tmp clean-ups, so that a later process
    compiling the same graphs loads them instead of generating them again. ``TORCHINDUCTOR_CACHE_DIR`` wins when
    set; else ``AITK_COMPILE_CACHE``; else ``~/.cache/aitk_inference/torchinductor``. Returns the folder used."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.expanduser(
        os.environ.get(COMPILE_CACHE_ENV) or os.path.join("~", ".cache", "aitk_inference", "torchinductor"))
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


#: graphs Dynamo may keep for one compiled forward (all blocks of one class share it): every LoRA rank and LoRA count
#: in the dynamic mode, image size regime (a first size, then one graph for all others), attention kernel and weight
#: format compiles its own, and past torch's default of 8 a ``fullgraph`` compile raises instead of running
RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Let Dynamo keep at least ``limit`` graphs per compiled function (a process-wide setting; a higher one is kept),
    so that a long-lived process switching LoRAs and sizes keeps running its compiled blocks."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def recompile_limit_message(error: BaseException, model_id: str) -> str | None:
    """What to do when ``error`` is Dynamo refusing a compiled block one more graph (:func:`allow_recompiles`), else
    None."""
    import torch._dynamo.exc

    limit_hit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None)
    if limit_hit is None or not isinstance(error, limit_hit):
        return None
    return (f"{model_id}: the compiled blocks already hold torch's limit of {torch._dynamo.config.recompile_limit} "
            "graphs (each new LoRA rank or number of LoRAs with lora_mode='dynamic', and a second image size, "
            "compiles one), so this generation did not run. Load the pipeline again, or use lora_mode='fused', whose "
            "LoRA changes never compile, or raise torch._dynamo.config.recompile_limit.")


def compile_denoiser(denoisers: list, mode: str = "regional", **compile_kwargs) -> None:
    """``torch.compile`` the ``denoisers`` in place; the first generation pays the compilation.

    Args:
        denoisers (list): the denoiser module(s).
        mode (str, defaults to "regional"): ``regional`` compiles the repeated transformer blocks, each class once
            (``fullgraph=True``, fast to compile), streamed ones too, except those with diffusers' or accelerate's
            offloading hooks in them, which run eager (:func:`compile_resident_blocks`); ``full`` compiles the whole
            denoiser, which must not be offloaded (``options.compile_offload_conflict``).
        **compile_kwargs: passed on to ``torch.compile`` (``backend``, ``mode``...).
    """
    if mode not in ("regional", "full"):
        raise ValueError(f"Unknown compile mode {mode!r}; use regional or full.")
    use_persistent_compile_cache()
    allow_recompiles()
    for denoiser in denoisers:
        if mode == "full":
            denoiser.compile(**compile_kwargs)
            continue
        name = type(denoiser).__name__
        blocks = repeated_blocks(denoiser)
        if not blocks:
            raise ValueError(f"{name} declares no repeated blocks to compile regionally (or none of the classes its "
                             "`_repeated_blocks` names is in it); use compile='full'.")
        for block in blocks:  # compiled before: compile again with these settings
            block._compiled_call_impl = None
            block.__dict__.pop("forward", None)
        compiled, eager = compile_resident_blocks(denoiser, **compile_kwargs)
        if not compiled:
            logger.warning("compile='regional' has nothing to compile in %s: all its %d repeated blocks stream their "
                           "weights through offloading hooks, which torch.compile cannot trace, so they run eager. "
                           "offload='auto' streams blocks in a way that compiles; 'model' and 'none' compile every "
                           "block.", name, eager)
        elif eager:
            logger.info("compile='regional': %d repeated blocks of %s compiled; the %d with offloading hooks in them "
                        "run eager.", compiled, name, eager)


def repeated_blocks(denoiser) -> list:
    """The modules of ``denoiser`` whose class its ``_repeated_blocks`` names (what regional compile compiles)."""
    classes = set(getattr(denoiser, "_repeated_blocks", None) or ())
    return [module for module in denoiser.modules() if type(module).__name__ in classes]


def carries_offload_hook(module) -> bool:
    """Whether an offloading hook moves weights of ``module`` in or out during its forward: a streamed block's
    (``streaming``), diffusers' group offloading on it or on any of its layers, or an accelerate hook on it or inside
    it (``sequential`` hooks every layer, ``model`` the component itself). torch.compile cannot trace them into one
    graph (diffusers' are ``torch.compiler.disable()``d)."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    from .streaming import is_streamed

    return any(hasattr(m, "_hf_hook") or is_streamed(m) or (
        hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook(_GROUP_OFFLOADING) is not None)
        for m in module.modules())


def compile_resident_blocks(denoiser, **compile_kwargs) -> tuple[int, int]:
    """Make the compiled blocks of ``denoiser`` follow its placement; call it after every placement of a regionally
    compiled denoiser (offloading applied again after a LoRA change may stream other blocks). Each repeated block is
    compiled (``fullgraph=True``) unless it already is: whole (``nn.Module.compile``) when it stays on the device,
    its ``forward`` only when it streams (``streaming``: its hooks, which swap its weights in and out, run around the
    graph). A block with diffusers' or accelerate's offloading hooks in it runs eager (they cannot be traced).
    Returns how many blocks are compiled and how many run eager."""
    import torch

    from .streaming import is_streamed

    compiled = eager = 0
    for block in repeated_blocks(denoiser):
        streamed = is_streamed(block)
        hooked = not streamed and carries_offload_hook(block)
        if streamed or hooked:
            block._compiled_call_impl = None  # what nn.Module.compile set: the block's own (hooked) call runs
        if not streamed:
            block.__dict__.pop("forward", None)  # a forward compiled while the block streamed
        if hooked:
            eager += 1
            continue
        if streamed and "forward" not in block.__dict__:
            block.forward = torch.compile(block.forward, fullgraph=True, **compile_kwargs)
        elif not streamed and block._compiled_call_impl is None:
            block.compile(fullgraph=True, **compile_kwargs)
        compiled += 1
    return compiled, eager


# ---------------------------------------------------------------------------------------------------------------- attention
def set_attention_kernel(denoisers: list, kernel: str, device: str, model_id: str) -> None:
    """Run the attention of ``denoisers`` (``model_id``'s, on ``device``) with ``kernel``, a key of
    ``ATTENTION_KERNELS``.

    ``sdpa`` leaves a denoiser that cannot choose (UNets, OmniGen2) as it is; any other kernel raises for it.
    Kernels of the same attention differ only in floating-point rounding; ``flash_attn_3_fp8`` also rounds its
    inputs to FP8 (``runtime.fp8_attention``: a few percent of error, for speed). The attention layers
    ``runtime.rope`` lists (FLUX, FLUX.2, Krea 2, Wan, HiDream, LTX-2) first get its processors, which apply the rotary
    embedding in one kernel where they run eager on CUDA, with the same bits (HiDream's is also the one that makes its
    kernel selectable), and the only ones that run ``flash_attn_3_fp8``'s FP8 kernel.
    """
    import diffusers

    from .rope import FusedRopeProcessor, use_fused_rope

    if kernel not in ATTENTION_KERNELS:
        raise unknown_option("attention", kernel)
    use_fused_rope(denoisers)
    selectable = all(any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in denoiser.modules())
                     for denoiser in denoisers)
    if not selectable:
        if kernel != "sdpa":
            raise ValueError(f"{model_id}'s {type(denoisers[0]).__name__} cannot choose its attention kernel; use "
                             "attention='sdpa'.")
        return
    flash_attention_3 = ATTENTION_KERNELS[kernel] == ATTENTION_KERNELS["flash_attn_3"]
    odd_heads = sorted(size for size in attention_head_sizes(denoisers) if size % 8) if flash_attention_3 else []
    if odd_heads:
        raise ValueError(f"attention={kernel!r}: FlashAttention-3 takes attention heads whose size is a multiple of 8, "
                         f"and {model_id}'s attention has heads of {odd_heads}; use attention='sdpa'.")
    problem = attention_device_problem(kernel, device)
    if problem:
        raise ValueError(problem + ".")
    if flash_attention_3 and not use_fa3_fwd_if_needed():
        raise ValueError(f"attention={kernel!r} needs FlashAttention-3 for Hopper GPUs: pip install fa3-fwd (its "
                         "forward kernels as a wheel) or build FlashAttention's hopper/ folder; or use attention='sdpa'.")
    fp8_processors = [m.processor for denoiser in denoisers for m in denoiser.modules()
                      if isinstance(getattr(m, "processor", None), FusedRopeProcessor)]
    if kernel == "flash_attn_3_fp8" and not fp8_processors:
        raise ValueError(f"attention='flash_attn_3_fp8' runs in the attention layers of FLUX, FLUX.2, Krea 2, Wan, "
                         f"HiDream and LTX-2, not in {model_id}'s; use attention='flash_attn_3'.")
    for processor in fp8_processors:
        processor.fp8_attention = kernel == "flash_attn_3_fp8"
    # Set even for the default: diffusers keeps one process-wide active backend, which another pipeline may
    # have changed; naming it on every attention layer makes this model independent of that.
    quiet = diffusers.utils.logging.get_logger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Attention backends are an experimental feature" on every call
    try:
        for denoiser in denoisers:
            denoiser.set_attention_backend(ATTENTION_KERNELS[kernel])
    except (RuntimeError, ImportError) as e:
        raise ValueError(f"attention={kernel!r} is not usable here: {e}") from e
    finally:
        quiet.setLevel(level)


def attention_head_sizes(denoisers: list) -> set[int]:
    """The head sizes of the attention layers of ``denoisers`` that name them (diffusers' ``head_dim``, or the query
    projection's width over the head count)."""
    sizes = set()
    for denoiser in denoisers:
        for module in denoiser.modules():
            if not hasattr(module, "processor"):
                continue
            heads = getattr(module, "heads", None) or getattr(module, "num_heads", None)
            query_width = getattr(getattr(module, "to_q", None), "out_features", None)
            size = getattr(module, "head_dim", None) or (query_width // heads if heads and query_width else None)
            if size:
                sizes.add(size)
    return sizes


def use_fa3_fwd_if_needed() -> bool:
    """Whether diffusers' FlashAttention-3 backend can run, handing it the ``fa3-fwd`` wheel's kernels if needed.

    diffusers imports FlashAttention-3 as ``flash_attn_interface``, the module a source build of FlashAttention's
    hopper/ folder installs. The ``fa3-fwd`` wheel ships the same forward kernels with the same functions under the
    module name ``fa3_fwd_interface``; when only that one is installed, diffusers' backend is pointed at it (forward
    only, which is all inference needs)."""
    from diffusers.models import attention_dispatch

    if attention_dispatch._CAN_USE_FLASH_ATTN_3:
        return True
    if importlib.util.find_spec("fa3_fwd_interface") is None:
        return False
    import fa3_fwd_interface

    attention_dispatch.flash_attn_3_func = fa3_fwd_interface.flash_attn_func
    attention_dispatch.flash_attn_3_varlen_func = fa3_fwd_interface.flash_attn_varlen_func
    attention_dispatch._CAN_USE_FLASH_ATTN_3 = True
    return True


# ---------------------------------------------------------------------------------------------------------------- FP8
def quantize_fp8(denoisers: list, device: str, offload: str, keep_master: bool) -> int:
    """Give the block Linears of ``denoisers`` FP8 weights (see ``runtime.quantize``), computed on ``device`` (also
    for weights still on the host, before an offloaded placement); ``keep_master`` keeps the original weights that
    fused LoRA mode re-quantizes from. Returns how many layers were quantized."""
    from .quantize import fp8_option_conflict, fp8_unavailable, quantize_denoiser_fp8

    problem = fp8_unavailable(device) or fp8_option_conflict(offload)
    if problem:
        raise ValueError(problem + ".")
    return sum(quantize_denoiser_fp8(denoiser, keep_master, device=device) for denoiser in denoisers)
