"""Denoiser blocks that stream from pinned host memory through two GPU slots.

Each streamed block keeps its weights in one pinned host buffer (plain memory once the system refuses to pin more)
and is copied to the GPU in one transfer, on a copy stream, into one of two preallocated slots. When streamed block
``k`` ends, the streamed block after the next one (in the order the forward runs them, the first ones again after the
last) is copied into the slot ``k`` leaves, so that the copy of each block overlaps the two streamed blocks before it
and every kept block since the first of them. A copy waits only for the compute queued before it (an event, not a
host synchronisation), and the copy stream writes only into the slots, which are never freed while in use, so no
allocation crosses streams.

This replaced diffusers' group offloading for the denoiser's blocks: under a 12 GiB cap on an H100 its FLUX image
took 2.13x the uncapped time where the transfers alone would have allowed much less (BENCHMARKS.md, "The GPUs users
own"); its hooks synchronise the host with the transfer stream before every fetch, fetch a block only when the
streamed one before it starts, and move weights tensor by tensor. This streaming runs the same FP8 image in 0.83x
the uncapped bf16 time (H200, BENCHMARKS.md).

Between forwards a streamed block's tensors are its host copies (a plain weight keeps its ``Parameter`` object and
changes ``.data``; a quantized (torchao) weight, which cannot change ``.data`` across devices, is a ``Parameter``
around its inner tensors' host copies), so that code reading or editing weights between forwards (LoRA fusing, FP8
re-quantizing) sees the real values. While the block runs they are views of its slot, built once.

Imported only when blocks stream (it imports torch).
"""

from __future__ import annotations

import dataclasses

import torch

from .host_memory import host_tensor

#: byte alignment of each tensor in a block's buffer (enough for any dtype and for vectorised kernels)
_ALIGNMENT = 512
#: the attribute a streamed block carries (its forward hooks' handles)
STREAM_HOOKS = "_aitk_stream_hooks"
#: the attribute a block that streamed keeps: its host buffer (reused by the next streaming of the block when its
#: tensors are still the views of it)
HOST_COPY = "_aitk_stream_host"


@dataclasses.dataclass
class _TableEntry:
    """What a module holds under one name: ``host`` between forwards, ``views[slot]`` while its block runs there."""

    owner: torch.nn.Module
    table: str  # "_parameters" or "_buffers"
    name: str
    host: torch.Tensor
    views: list

    def hold(self, slot: int | None) -> None:
        getattr(self.owner, self.table)[self.name] = self.host if slot is None else self.views[slot]


@dataclasses.dataclass
class _ParameterData:
    """A plain weight: the same ``Parameter`` object, its ``.data`` the host copy or the slot's view."""

    tensor: torch.Tensor
    host: torch.Tensor
    views: list

    def hold(self, slot: int | None) -> None:
        self.tensor.data = self.host if slot is None else self.views[slot]


def _is_wrapper(tensor) -> bool:
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


def _plain(tensor) -> torch.Tensor:
    return tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor


def _span(tensor) -> int:
    """Elements from a tensor's first to its last (its strides may skip some, a transpose reorders them)."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def _aligned(size: int) -> int:
    return -(-size // _ALIGNMENT) * _ALIGNMENT


class _BlockLayout:
    """Where each tensor of one block lies in its buffer: the block's named tensors (parameters and buffers, each once),
    and for each the plain tensors it is made of (itself, or a quantized tensor's inner tensors) with their offsets."""

    def __init__(self, block: torch.nn.Module):
        self.entries = []  # (owner, table, name, tensor, [(plain tensor, offset)])
        seen, offset = set(), 0
        for module in block.modules():
            for table in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, table).items():
                    if tensor is None or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    plains = [getattr(tensor, inner) for inner in tensor.__tensor_flatten__()[0]] \
                        if _is_wrapper(tensor) else [_plain(tensor)]
                    if any(_is_wrapper(p) for p in plains if p is not None):
                        raise ValueError(f"{type(tensor).__name__} nests quantized tensors; it cannot stream.")
                    placed = []
                    for plain in plains:
                        placed.append((plain, offset))
                        offset += _aligned(_span(plain) * plain.element_size()) if plain is not None else 0
                    self.entries.append((module, table, name, tensor, placed))
        self.nbytes = offset

    def signature(self, buffer: torch.Tensor | None = None) -> list:
        """Where each plain tensor's memory starts, with its dtype, shape and strides: as it is now, or as its view
        in ``buffer`` would be. Equal signatures mean the tensors are those views."""
        return [None if p is None or _span(p) == 0 else
                (p.data_ptr() if buffer is None else buffer.data_ptr() + offset, p.dtype, tuple(p.shape), p.stride())
                for *_, placed in self.entries for p, offset in placed]

    def view(self, buffer: torch.Tensor, plain: torch.Tensor, offset: int) -> torch.Tensor:
        """``plain``'s dtype, shape and strides over ``buffer`` (uint8) at ``offset``."""
        size = _span(plain) * plain.element_size()
        if size == 0:
            return torch.empty(plain.shape, dtype=plain.dtype, device=buffer.device)
        flat = buffer[offset:offset + size].view(plain.dtype)
        return flat.as_strided(plain.shape, plain.stride())

    def rebuilt(self, tensor, placed, buffer: torch.Tensor):
        """``tensor`` over ``buffer``: a plain view, or the quantized tensor rebuilt around its inner tensors' views
        (a ``Parameter`` where ``tensor`` was one)."""
        views = [self.view(buffer, plain, offset) if plain is not None else None for plain, offset in placed]
        if not _is_wrapper(tensor):
            return views[0]
        names, attributes = tensor.__tensor_flatten__()
        rebuilt = type(tensor).__tensor_unflatten__(dict(zip(names, views)), attributes, tensor.size(), tensor.stride())
        return torch.nn.Parameter(rebuilt, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else rebuilt


class _StreamedBlock:
    """One streamed block: its host buffer and what each of its modules holds between forwards and in each slot."""

    def __init__(self, block: torch.nn.Module, layout: _BlockLayout, slots: list[torch.Tensor], pin: bool):
        previous = getattr(block, HOST_COPY, None)
        if previous is not None and layout.signature() == layout.signature(previous):
            self.host = previous  # the tensors are still views of the buffer made before: no copy
        else:
            self.host = host_tensor(layout.nbytes, torch.uint8, pin, "the remaining streamed blocks stay in plain "
                                    "memory and stream more slowly")
            for *_, placed in layout.entries:
                for plain, offset in placed:
                    if plain is not None:
                        layout.view(self.host, plain, offset).copy_(plain)
        self.nbytes = layout.nbytes
        self.holders = []
        for owner, table, name, tensor, placed in layout.entries:
            host = layout.rebuilt(tensor, placed, self.host)
            views = [layout.rebuilt(tensor, placed, slot) for slot in slots]
            if _is_wrapper(tensor) or table == "_buffers":
                self.holders.append(_TableEntry(owner, table, name, host, views))
            else:
                self.holders.append(_ParameterData(tensor, host, views))
        self.hold(None)
        setattr(block, HOST_COPY, self.host)

    def hold(self, slot: int | None) -> None:
        for holder in self.holders:
            holder.hold(slot)


class BlockStreamer:
    """Streams ``blocks`` (in the order a forward runs them) through two slots on ``device``; see the module
    docstring. On a CPU ``device`` (the tests) the copies are plain and in order, with the same bookkeeping."""

    def __init__(self, blocks: list[torch.nn.Module], device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.modules = list(blocks)
        layouts = [_BlockLayout(block) for block in blocks]
        slot_bytes = max((layout.nbytes for layout in layouts), default=0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.blocks, pin = [], self.cuda
        for block, layout in zip(blocks, layouts):
            self.blocks.append(_StreamedBlock(block, layout, self.slots, pin=pin))
            pin = pin and self.blocks[-1].host.is_pinned()  # once the system refuses, stop asking
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.holding: list[int | None] = [None, None]  # the block each slot holds (or is being copied into it)
        self.ready: list = [None, None]  # per slot, the copy stream's event after its last copy
        self.running = 1  # the slot of the block that ran last
        for index, block in enumerate(blocks):
            setattr(block, STREAM_HOOKS, (
                block.register_forward_pre_hook(lambda module, args, index=index: self._enter(index)),
                block.register_forward_hook(lambda module, args, output, index=index: self._leave(index),
                                            always_call=True)))

    def _fetch(self, index: int, slot: int) -> None:
        block = self.blocks[index]
        target = self.slots[slot][:block.nbytes]
        self.holding[slot] = index
        if not self.cuda:
            target.copy_(block.host)
            return
        queued = torch.cuda.current_stream(self.device).record_event()  # the last reads of this slot are in it
        self.copy_stream.wait_event(queued)
        with torch.cuda.stream(self.copy_stream):
            target.copy_(block.host, non_blocking=True)
            self.ready[slot] = self.copy_stream.record_event()

    def _enter(self, index: int) -> None:
        if index in self.holding:
            slot = self.holding.index(index)
        else:  # not prefetched: the first forward, or blocks run out of their order
            slot = 1 - self.running
            self._fetch(index, slot)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        self.blocks[index].hold(slot)
        self.running = slot
        following = (index + 1) % len(self.blocks)
        if following != index and self.holding[1 - slot] != following:
            self._fetch(following, 1 - slot)

    def _leave(self, index: int) -> None:
        self.blocks[index].hold(None)
        if index not in self.holding:
            return
        slot = self.holding.index(index)
        waiting = self.holding[1 - slot]  # normally the next streamed block, fetched when this one started
        upcoming = ((index if waiting is None else waiting) + 1) % len(self.blocks)
        if upcoming not in self.holding:  # the slot is free once this block's queued kernels have run
            self._fetch(upcoming, slot)

    def remove(self) -> None:
        """Stop streaming: the hooks come off and the slots are freed. The blocks keep what they hold between
        forwards (their host copies, or what a LoRA change made of them since)."""
        if self.cuda:
            self.copy_stream.synchronize()
        for block in self.modules:
            for handle in getattr(block, STREAM_HOOKS):
                handle.remove()
            delattr(block, STREAM_HOOKS)
        self.modules, self.blocks, self.slots, self.holding = [], [], [], [None, None]


def is_streamed(module) -> bool:
    """Whether ``module`` is a block a :class:`BlockStreamer` streams."""
    return hasattr(module, STREAM_HOOKS)
