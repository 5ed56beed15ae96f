"""The one place loaded pipelines live, shared by the nodes, the CLI and the server.

Keyed by the model id and its load options (``LoadOptions.cache_key``): LoRAs and strengths are NOT part of the key,
they are state of the cached pipeline changed in place by ``set_loras``. At most ``max_entries`` pipelines are kept
(default 1, env ``AITK_MAX_CACHED_PIPELINES``); loading another evicts the least recently used one first, so two
copies of the same weights never coexist.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections import Counter, OrderedDict

from ..registry import get_spec
from .options import LoadOptions

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_entries: "OrderedDict[tuple, object]" = OrderedDict()
stats: Counter = Counter()


def max_entries() -> int:
    return max(1, int(os.environ.get("AITK_MAX_CACHED_PIPELINES", "1")))


def get_pipeline(model_id: str, options: LoadOptions):
    """Return the cached pipeline of ``model_id`` with these load options, loading it (and evicting others) when
    needed."""
    key = options.cache_key(model_id)
    with _lock:
        if key in _entries:
            _entries.move_to_end(key)
            stats["hits"] += 1
            return _entries[key]
        while len(_entries) >= max_entries():
            evict(next(iter(_entries)))
        spec = get_spec(model_id)
        pipeline = spec.family_class().from_spec(spec, options)
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
