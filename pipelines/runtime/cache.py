"""The one place loaded pipelines live, shared by the nodes, the CLI and the server.

Keyed by (model id, base, device, dtype, offload, LoRA mode, compile mode, attention kernel, quantization): LoRAs and strengths are NOT part of the key, they are
state of the cached pipeline changed in place by ``set_loras``. At most ``max_entries`` pipelines are kept (default 1,
env ``AITK_MAX_CACHED_PIPELINES``); loading another evicts the least recently used one first, so two copies of the
same weights never coexist.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import Counter, OrderedDict

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_entries: "OrderedDict[tuple, object]" = OrderedDict()
stats: Counter = Counter()


def max_entries() -> int:
    return max(1, int(os.environ.get("AITK_MAX_CACHED_PIPELINES", "1")))


def cache_key(model_id, base=None, device=None, dtype=None, offload=None, lora_mode=None, compile=None, attention=None,
              quantize=None) -> tuple:
    from ..base import resolve_device, resolve_dtype
    from ..registry import get_spec

    spec = get_spec(model_id)
    device = resolve_device(device)
    source = os.path.realpath(os.path.expanduser(base)) if base and os.path.exists(os.path.expanduser(base)) else (base or spec.base)
    return (model_id, source, device, str(resolve_dtype(dtype, device)), offload or "none",
            lora_mode or spec.lora_mode, compile or "none", attention or "sdpa",
            quantize or "none")


def get_pipeline(model_id, base=None, device=None, dtype=None, offload=None, lora_mode=None, compile=None,
                 attention=None, quantize=None):
    """Return the cached pipeline for these load settings, loading it (and evicting others) when needed."""
    from ..base import load_pipeline

    key = cache_key(model_id, base, device, dtype, offload, lora_mode, compile, attention, quantize)
    with _lock:
        if key in _entries:
            _entries.move_to_end(key)
            stats["hits"] += 1
            return _entries[key]
        while len(_entries) >= max_entries():
            evict(next(iter(_entries)))
        pipeline = load_pipeline(model_id, base=base, device=device, dtype=dtype, offload=offload, lora_mode=lora_mode,
                                 compile=compile, attention=attention, quantize=quantize)
        stats["loads"] += 1
        _entries[key] = pipeline
        return pipeline


def evict(key=None) -> int:
    """Drop one cached pipeline (or all with ``key=None``) and free its memory; returns how many were dropped."""
    with _lock:
        keys = list(_entries) if key is None else [key] if key in _entries else []
        for k in keys:
            pipeline = _entries.pop(k)
            with pipeline.lock:
                pipeline.pipe = None
            logger.info("Evicted %s from the pipeline cache", k[0])
        if keys:
            stats["evictions"] += len(keys)
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover
                pass
        return len(keys)


def cached_keys() -> list[tuple]:
    with _lock:
        return list(_entries)
