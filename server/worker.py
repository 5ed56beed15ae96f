"""One worker thread per process, fed by a FIFO queue whose positions clients can see.

The worker owns the GPU: it takes the oldest job, gets its pipeline from the shared cache (``pipelines.runtime.cache``: the
same model is never loaded twice, LoRA and strength changes are applied in place), and generates prompt by prompt.
Its progress callback raises :class:`GenerationInterrupted` when the job is canceled or past its deadline, so both
stop within one denoising step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Callable

from ..pipelines.runtime import cache
from ..pipelines.base import GenerationInterrupted
from .downloads import DownloadError, fetch_image, fetch_lora
from .mapping import Job
from .outputs import save_image, save_video
from .settings import Settings
from .store import TaskStore, utc_now

logger = logging.getLogger(__name__)

SHUTDOWN_REASON = "The server shut down before this request finished; submit it again."


class _Stop(GenerationInterrupted):
    """Why a job stopped early: ``status`` is what the task becomes, ``reason`` its error text."""

    def __init__(self, status: str, reason: str | None):
        super().__init__(reason or status)
        self.status, self.reason = status, reason


class Worker:
    """The FIFO queue and its single worker thread.

    Args:
        settings (Settings): device, dtype, offload, base overrides, timeout, download limits.
        store (TaskStore): where task state is written.
        get_pipeline (callable, defaults to ``pipelines.runtime.cache.get_pipeline``): ``(model_id, LoadOptions) ->
            AITKPipeline``.
    """

    def __init__(self, settings: Settings, store: TaskStore, get_pipeline: Callable = cache.get_pipeline):
        self.settings = settings
        self.store = store
        self.get_pipeline = get_pipeline
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._current: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="aitk-worker", daemon=True)

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, interrupt the running one at its next step, and fail what is left with a reason."""
        with self._cond:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            self.store.update(job.id, status="failed", error=SHUTDOWN_REASON, finished_at=utc_now())
        self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns its queue position (1 = runs next)."""
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
            return len(self._queue)

    def position(self, task_id: str) -> int | None:
        with self._cond:
            for i, job in enumerate(self._queue):
                if job.id == task_id:
                    return i + 1
        return None

    def progress(self, task_id: str) -> tuple[int, int] | None:
        """(steps done, total steps) of the running job, or None if ``task_id`` is not running."""
        job = self._current
        return (job.step, job.total_steps) if job is not None and job.id == task_id else None

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued job at once, or a running one at its next step; False if ``task_id`` is neither."""
        with self._cond:
            for job in self._queue:
                if job.id == task_id:
                    self._queue.remove(job)
                    self.store.update(task_id, status="canceled", finished_at=utc_now())
                    return True
            if self._current is not None and self._current.id == task_id:
                self._current.cancel_requested = True
                return True
        return False

    # ------------------------------------------------------------------------------------------------ running
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._current = self._queue.popleft()
            try:
                self._run(self._current)
            finally:
                self._current = None

    def _check(self, job: Job, deadline: float) -> None:
        """Raise :class:`_Stop` if the job was canceled, timed out, or the server is stopping."""
        if job.cancel_requested:
            raise _Stop("canceled", None)
        if self._stopping:
            raise _Stop("failed", SHUTDOWN_REASON)
        if time.monotonic() > deadline:
            raise _Stop("failed", f"Timed out after INFERENCE_TIMEOUT={self.settings.inference_timeout:g} s; "
                                  "the generation was stopped between two steps.")

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.inference_timeout
        self.store.update(job.id, status="in_progress", started_at=utc_now())
        timings: dict = {"pipeline_details": {}, "prompts": []}
        try:
            # 1. Resolve LoRA files (URL LoRAs are downloaded, checked and cached)
            from ..pipelines.lora.stack import LoraRequest

            t = time.perf_counter()
            requests, downloads = [], []
            for lora in job.loras:
                path = lora.path
                if lora.url is not None:
                    path, cached = fetch_lora(lora.url, self.settings.lora_download_cache_dir, self.settings.lora_max_bytes,
                                              job.hf_token, self.settings.token_hosts, lambda: self._check(job, deadline),
                                              self.settings.fetch_policy)
                    downloads.append({"url": lora.url, "cached": cached})
                requests.append(LoraRequest(path=path, strength=lora.strength, side=lora.side))
            timings["pipeline_details"].update(download_loras=round(time.perf_counter() - t, 4), downloads=downloads)
            self._check(job, deadline)

            # 2. Get the pipeline from the shared cache
            t = time.perf_counter()
            options = self.settings.load_options(job.model)
            hit = options.cache_key(job.model) in cache.cached_keys()
            pipeline = self.get_pipeline(job.model, options)
            timings["get_pipeline"] = round(time.perf_counter() - t, 4)
            timings["pipeline_details"].update(cache_hit=hit, cache_action="reuse" if hit else "load")

            # 3. Apply LoRAs (in place: no reload for a new LoRA set or strength)
            applied = pipeline.set_loras(requests)
            self._check(job, deadline)

            # 4. Run the prompts
            outputs = {"images": [], "videos": []}
            generations = []
            done = 0
            t_inference = time.perf_counter()
            for i, kwargs in enumerate(job.prompts):
                t = time.perf_counter()
                controls = [fetch_image(c, self.settings.control_image_max_bytes, self.settings.control_image_max_pixels,
                                        self.settings.fetch_policy)
                            if isinstance(c, str) else c for c in job.controls[i]]
                t_controls = time.perf_counter() - t

                def on_step(step: int, total: int, done=done) -> None:
                    job.step = done + step
                    self._check(job, deadline)

                t = time.perf_counter()
                result = pipeline.generate(progress=on_step, control_images=controls or None,
                                           vae_tiling=self.settings.vae_tiling, **kwargs)
                t_generate = time.perf_counter() - t
                done += result.params.steps
                job.step = done
                # 5. Save (temporary name, then rename)
                t = time.perf_counter()
                index = len(outputs["images"]) + len(outputs["videos"])
                self._save(job, index, result, outputs)
                generations.append(result.metadata())
                timings["prompts"].append({"load_control_images": round(t_controls, 4), "generate": round(t_generate, 4),
                                           "save": round(time.perf_counter() - t, 4)})
            timings["inference_total"] = round(time.perf_counter() - t_inference, 4)
            metadata = {"model": job.model, "inference_time": round(time.perf_counter() - started, 4), "timings": timings,
                        "loras": applied, "generations": generations}
            self.store.update(job.id, status="succeeded", outputs=outputs, metadata=metadata, finished_at=utc_now())
        except _Stop as stop:
            self.store.update(job.id, status=stop.status, error=stop.reason, finished_at=utc_now())
        except Exception as e:  # a failed task must never take the worker down
            self.store.update(job.id, status="failed", error=_describe(e, job), finished_at=utc_now())

    def _save(self, job: Job, index: int, result, outputs: dict) -> None:
        base = os.path.join(self.settings.output_base_path, f"{job.id}_output_{index}")
        url = f"{self.settings.public_url}/v1/requests/{job.id}/outputs/{index}"
        common = {"width": result.width, "height": result.height, "seed": result.seed}
        if result.is_video:
            path, video_format = save_video(result, base, job.output_format)
            outputs["videos"].append({"index": index, "format": video_format, "file_path": path, "url": url,
                                      "num_frames": result.params.num_frames, "fps": result.params.fps, **common})
            return
        path = save_image(result.to_pil()[0], base, job.output_format, result.metadata())
        outputs["images"].append({"index": index, "format": job.output_format, "file_path": path, "url": url, **common})


def _describe(error: Exception, job: Job) -> str:
    """A user-facing reason for a failed task; CUDA OOM frees the cache's scratch memory and says what to lower."""
    try:
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
            return (f"CUDA out of memory while running {job.model}: lower width/height or the number of stacked LoRAs, "
                    "or restart the server with OFFLOAD_MODE=model. The server and its cached pipeline are still usable.")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(error, (ValueError, FileNotFoundError, DownloadError)):
        return str(error)
    logger.exception("Task %s failed", job.id)
    return f"{type(error).__name__}: {error}"
