"""One worker thread per process, fed by a FIFO queue whose positions clients can see.

The worker owns the GPU: it takes the oldest job, gets its pipeline from the shared cache (``pipelines.runtime.cache``: the
same model is never loaded twice, LoRA and strength changes are applied in place), and generates prompt by prompt.
Its progress callback raises :class:`GenerationInterrupted` when the job is canceled or past its deadline, so both
stop within one denoising step.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections import deque
from typing import Callable

from ..pipelines.runtime import cache
from ..pipelines.base import GenerationInterrupted
from .downloads import DownloadError, fetch_image, fetch_lora
from .mapping import Job, inputs_prefix
from .outputs import OUTPUT_KINDS, output_files, save_audio, save_image, save_video, sweep_outputs
from .settings import Settings
from .store import TaskStore, utc_now

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0  # the output retention sweep runs at most this often (and at start)


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
        self._last_sweep = float("-inf")
        self._thread = threading.Thread(target=self._loop, name="aitk-worker", daemon=True)

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs and interrupt the running one at its next step, putting it back in the queue: what is
        left queued stays queued in the store and runs after the next start (see :meth:`recover`)."""
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def recover(self) -> tuple[int, int]:
        """Queue again, in their order, the tasks a previous run left queued or running (crash or shutdown), each
        until it has been started ``max_attempts`` times; fail the others with the reason. Call before
        :meth:`start`. Returns (queued again, failed)."""
        requeued = failed = 0
        limit = self.settings.max_attempts
        for task in self.store.unfinished():
            reason = None
            if task["attempts"] >= limit:
                reason = (f"The server stopped while running this request {task['attempts']} time(s) "
                          f"(AITK_MAX_ATTEMPTS={limit}); it is not started again, as it may be what stops the server.")
            elif task["job"] is None or (task["job"]["own_token"] and any(l["url"] for l in task["job"]["loras"])):
                reason = ("The server restarted before this request finished, and the request cannot be run again "
                          "without what is never stored (the hf_token for its URL LoRAs); submit it again.")
            else:
                try:
                    job = Job.from_record(task["id"], task["model"], task["job"], self.settings.hf_token)
                except OSError:
                    reason = "The server restarted and this request's control images are gone; submit it again."
            if reason is not None:
                self._finish(task["id"], status="failed", error=reason)
                failed += 1
                continue
            self.store.update(task["id"], status="in_queue")
            self._queue.append(job)
            requeued += 1
        return requeued, failed

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
                    self._finish(task_id, status="canceled")
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
            self.sweep()

    def sweep(self, force: bool = False) -> None:
        """Apply the output retention settings (at most every ``SWEEP_INTERVAL_S`` unless ``force``)."""
        settings = self.settings
        if not (settings.output_max_age or settings.output_max_bytes):
            return
        if not force and time.monotonic() - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = time.monotonic()
        try:
            deleted = sweep_outputs(self.store, settings.output_max_age, settings.output_max_bytes)
            if deleted:
                logger.info("Output retention: deleted the files of %d finished request(s).", deleted)
        except OSError:
            logger.exception("Output retention sweep failed; it will be tried again.")

    def _finish(self, task_id: str, **fields) -> None:
        """Record the end of a task and delete the inline control images kept for a restart."""
        self.store.update(task_id, finished_at=utc_now(), **fields)
        for path in glob.glob(glob.escape(inputs_prefix(self.settings.inputs_path, task_id)) + "*"):
            os.remove(path)

    def record(self, task_id: str, outcome: dict) -> None:
        """Write what :func:`run_job` returned: ``in_queue`` (stopped by a shutdown: runs after the next start) or
        the end of the task."""
        fields = {key: value for key, value in outcome.items() if key != "status"}
        if outcome["status"] == "in_queue":
            self.store.update(task_id, status="in_queue")
        else:
            self._finish(task_id, status=outcome["status"], **fields)

    def _run(self, job: Job) -> None:
        self.store.start(job.id)
        self.record(job.id, run_job(job, self.settings, self.get_pipeline, lambda: self._stopping))


def run_job(job: Job, settings: Settings, get_pipeline: Callable, stopping: Callable[[], bool]) -> dict:
    """Run one job where the pipeline cache is (the worker thread, or a Ray replica) and report how it ended,
    without touching the task store: ``{"status": "succeeded", "outputs": ..., "metadata": ...}``, or
    ``{"status": "canceled" | "failed", "error": reason}``, or ``{"status": "in_queue"}`` when ``stopping()``
    became true mid-run. ``job.step`` follows the progress; setting ``job.cancel_requested`` stops it at the next
    step. Never raises: a failed job must never take its runner down."""
    started = time.perf_counter()
    deadline = time.monotonic() + settings.inference_timeout

    def check() -> None:
        """Raise :class:`_Stop` if the job was canceled, timed out, or the server is stopping."""
        if job.cancel_requested:
            raise _Stop("canceled", None)
        if stopping():
            raise _Stop("in_queue", None)  # run again after the next start
        if time.monotonic() > deadline:
            raise _Stop("failed", f"Timed out after INFERENCE_TIMEOUT={settings.inference_timeout:g} s; "
                                  "the generation was stopped between two steps.")

    timings: dict = {"pipeline_details": {}, "prompts": []}
    try:
        # 1. Resolve LoRA files (URL LoRAs are downloaded, checked and cached)
        from ..pipelines.lora.stack import LoraRequest

        t = time.perf_counter()
        requests, downloads = [], []
        for lora in job.loras:
            path = lora.path
            if lora.url is not None:
                path, cached = fetch_lora(lora.url, settings.lora_download_cache_dir, settings.lora_max_bytes,
                                          job.hf_token, settings.token_hosts, check, settings.fetch_policy)
                downloads.append({"url": lora.url, "cached": cached})
            requests.append(LoraRequest(path=path, strength=lora.strength, side=lora.side))
        timings["pipeline_details"].update(download_loras=round(time.perf_counter() - t, 4), downloads=downloads)
        check()
        # ... and control images: every input is fetched and checked before the model is touched
        control_images, control_times = [], []
        for sources in job.controls:
            t = time.perf_counter()
            control_images.append([fetch_image(c, settings.control_image_max_bytes, settings.control_image_max_pixels,
                                               settings.fetch_policy)
                                   if isinstance(c, str) else c for c in sources])
            control_times.append(time.perf_counter() - t)
            check()

        # 2. Get the pipeline from the shared cache
        t = time.perf_counter()
        options = settings.load_options(job.model)
        hit = options.cache_key(job.model) in cache.cached_keys()
        pipeline = get_pipeline(job.model, options)
        timings["get_pipeline"] = round(time.perf_counter() - t, 4)
        timings["pipeline_details"].update(cache_hit=hit, cache_action="reuse" if hit else "load")

        # 3. Apply LoRAs (in place: no reload for a new LoRA set or strength)
        applied = pipeline.set_loras(requests)
        check()

        # 4. Run the prompts
        outputs = {kind: [] for kind in OUTPUT_KINDS}
        generations = []
        done = 0
        t_inference = time.perf_counter()
        for i, kwargs in enumerate(job.prompts):
            def on_step(step: int, total: int, done=done) -> None:
                job.step = done + step
                check()

            t = time.perf_counter()
            result = pipeline.generate(progress=on_step, control_images=control_images[i] or None,
                                       vae_tiling=settings.vae_tiling, **kwargs)
            t_generate = time.perf_counter() - t
            done += result.params.steps
            job.step = done
            # 5. Save (temporary name, then rename)
            t = time.perf_counter()
            index = sum(len(entries) for entries in outputs.values())
            _save(job, index, result, outputs, settings)
            generations.append(result.metadata())
            timings["prompts"].append({"load_control_images": round(control_times[i], 4), "generate": round(t_generate, 4),
                                       "save": round(time.perf_counter() - t, 4)})
        timings["inference_total"] = round(time.perf_counter() - t_inference, 4)
        metadata = {"model": job.model, "inference_time": round(time.perf_counter() - started, 4), "timings": timings,
                    "loras": applied, "generations": generations}
        incomplete = [p for p in output_files({"outputs": outputs}) if not os.path.getsize(p)]
        if incomplete:
            raise OSError(f"Output file(s) {incomplete} are empty after writing (disk full?).")
        return {"status": "succeeded", "outputs": outputs, "metadata": metadata}
    except _Stop as stop:
        return {"status": "in_queue"} if stop.status == "in_queue" else {"status": stop.status, "error": stop.reason}
    except Exception as e:  # a failed task must never take the runner down
        return {"status": "failed", "error": _describe(e, job)}


def _save(job: Job, index: int, result, outputs: dict, settings: Settings) -> None:
    base = os.path.join(settings.output_base_path, f"{job.id}_output_{index}")
    url = f"{settings.public_url}/v1/requests/{job.id}/outputs/{index}"
    common = {"width": result.width, "height": result.height, "seed": result.seed}
    if result.is_audio:
        outputs["audios"].append({"index": index, "format": "flac", "file_path": save_audio(result, base),
                                  "url": url, "seed": result.seed, "sample_rate": result.sample_rate})
        return
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
                    "or restart the server with OFFLOAD_MODE=auto (keeps on the GPU what fits, streams the rest). "
                    "The server and its cached pipeline are still usable.")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(error, (ValueError, OSError, DownloadError)):
        return str(error)
    logger.exception("Task %s failed", job.id)
    return f"{type(error).__name__}: {error}"
