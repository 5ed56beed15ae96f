"""Scaling out with Ray Serve (``serve --ray``): the same FastAPI app, task store, validation and job semantics as
the one-machine server; only what runs the queue changes.

The app is the Serve ingress (one process, which holds the SQLite store and the FIFO queue). In place of the worker
thread, a :class:`RayDispatcher` hands each job to one of N :class:`Replica` actors (one per GPU), each with its own
pipeline and LoRA caches (``pipelines.runtime.cache``). A replica runs :func:`server.worker.run_job`, the thread
worker's code, and only reports: the dispatcher writes every state change to the store.

Routing: the oldest queued job goes to a free replica, preferring one that holds its pipeline with the same LoRAs
applied, then one that holds its pipeline, then the one holding the fewest pipelines. A replica that dies takes
no job with it: its job is queued again at the front (once, preferring another replica) or failed with the reason,
and a fresh replica takes its place.

Ray is imported only here: ``python -m aitk_inference serve`` without ``--ray`` never needs it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import ray
from ray import serve
from ray.exceptions import RayActorError

from ..pipelines.runtime import cache
from .mapping import Job
from .settings import Settings
from .store import TaskStore
from .worker import Worker, run_job

logger = logging.getLogger(__name__)

PROGRESS_TIMEOUT_S = 5.0  # a status request waits at most this long for a busy replica's step count


@ray.remote(max_restarts=0)
class Replica:
    """One generator process (one GPU): runs one job at a time, answers progress and cancel while it runs (a
    threaded actor: ``max_concurrency`` > 1)."""

    def __init__(self, settings: Settings, name: str):
        self.settings, self.name = settings, name
        self.job: Job | None = None
        self.stopping = False
        self.canceled: set[str] = set()  # cancels that arrived before their job
        self.lock = threading.Lock()  # between a job's arrival and its cancel

    def run(self, job: Job) -> dict:
        """:func:`run_job`'s outcome, plus ``held``: the model ids of the pipelines this replica now holds."""
        with self.lock:
            job.cancel_requested = job.cancel_requested or job.id in self.canceled
            self.canceled.discard(job.id)
            self.job = job
        try:
            outcome = run_job(job, self.settings, cache.get_pipeline, lambda: self.stopping)
        finally:
            self.job = None
        if outcome["status"] == "succeeded":
            outcome["metadata"]["replica"] = self.name
        return {**outcome, "held": [key[0] for key in cache.cached_keys()]}

    def progress(self, task_id: str) -> tuple[int, int] | None:
        job = self.job
        return (job.step, job.total_steps) if job is not None and job.id == task_id else None

    def cancel(self, task_id: str) -> None:
        with self.lock:
            job = self.job
            if job is not None and job.id == task_id:
                job.cancel_requested = True
            else:
                self.canceled.add(task_id)

    def stop(self) -> None:
        """Interrupt the running job at its next step; it is reported ``in_queue`` (runs after the next start)."""
        self.stopping = True


@dataclass
class _Slot:
    """The dispatcher's view of one replica."""

    index: int
    actor: object = None
    name: str = ""
    spawned: int = 0  # how many actors this slot has had (a dead one is replaced)
    job: Job | None = None
    # model ids of the pipelines it holds (all replicas load a model id with the same settings, and the ingress
    # cannot resolve load options as a replica does: it has no GPU)
    held: list = field(default_factory=list)
    loras: dict = field(default_factory=dict)  # model id -> the LoRAs last applied to its pipeline


def lora_key(job: Job) -> tuple:
    return tuple((lora.path, lora.url, lora.strength, lora.side) for lora in job.loras)


class RayDispatcher(Worker):
    """The :class:`Worker` queue (positions, cancel of queued jobs, restart recovery, output sweep), run by Ray
    replicas instead of one thread.

    Args:
        settings, store, get_pipeline: as for :class:`Worker` (``get_pipeline`` is unused: replicas use their own
            ``pipelines.runtime.cache``).
        replicas (int): how many replicas.
        replica_options (dict): Ray actor options of each replica, e.g. ``{"num_gpus": 1}``.
        name_prefix (str, defaults to ``"aitk-replica"``): replica actor names are ``<prefix>-<run>-<slot>.<n>``
            (``run`` is new for each dispatcher: a restarted ingress never meets its predecessor's names).
    """

    def __init__(self, settings: Settings, store: TaskStore, get_pipeline: Callable, *, replicas: int,
                 replica_options: dict, name_prefix: str = "aitk-replica"):
        if replicas < 1:
            raise ValueError(f"replicas={replicas}: run at least one replica (one per GPU).")
        super().__init__(settings, store, get_pipeline)
        self.replica_options = replica_options
        self.name_prefix = f"{name_prefix}-{uuid.uuid4().hex[:6]}"
        self._slots = [_Slot(i) for i in range(replicas)]
        self._died_once: dict[str, int] = {}  # task id -> the slot it died on (its one retry avoids it)
        self._watchers: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        super().start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        for slot in self._slots:
            slot.actor.stop.remote()
        for watcher in list(self._watchers):
            watcher.join(timeout)
        self._thread.join(timeout)
        for slot in self._slots:
            ray.kill(slot.actor)

    def progress(self, task_id: str) -> tuple[int, int] | None:
        slot = self._slot_of(task_id)
        if slot is None:
            return None
        try:
            return ray.get(slot.actor.progress.remote(task_id), timeout=PROGRESS_TIMEOUT_S)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return None

    def cancel(self, task_id: str) -> bool:
        if super().cancel(task_id):  # queued: canceled at once
            return True
        with self._cond:
            slot = self._slot_of(task_id)
            if slot is None:
                return False
            slot.job.cancel_requested = True  # also covers a job handed out but not yet started there
            slot.actor.cancel.remote(task_id)
            return True

    # ------------------------------------------------------------------------------------------------ running
    def _slot_of(self, task_id: str) -> _Slot | None:
        return next((slot for slot in self._slots if slot.job is not None and slot.job.id == task_id), None)

    def _spawn(self, slot: _Slot) -> None:
        slot.spawned += 1
        slot.name = f"{self.name_prefix}-{slot.index}.{slot.spawned}"
        slot.actor = Replica.options(name=slot.name, max_concurrency=4, **self.replica_options).remote(
            self.settings, slot.name)
        slot.held, slot.loras = [], {}

    def _choose(self, job: Job) -> _Slot:
        """The free replica for ``job`` (call with a free one present, under the lock)."""
        avoid = self._died_once.get(job.id)

        def rank(slot: _Slot) -> tuple:
            holds = job.model in slot.held
            return (slot.index != avoid, holds and slot.loras.get(job.model) == lora_key(job), holds,
                    -len(slot.held), -slot.index)

        return max((slot for slot in self._slots if slot.job is None), key=rank)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._queue and any(s.job is None for s in self._slots)):
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                slot = self._choose(job)
                slot.job = job
                self.store.start(job.id)
                watcher = threading.Thread(target=self._watch, args=(slot, job), name=f"aitk-watch-{job.id}",
                                           daemon=True)
                self._watchers = [w for w in self._watchers if w.is_alive()] + [watcher]
                watcher.start()  # under the lock: stop() never joins a thread not yet started

    def _watch(self, slot: _Slot, job: Job) -> None:
        """Hand ``job`` to ``slot``'s replica and record how it ended."""
        actor = slot.actor
        try:
            outcome = ray.get(actor.run.remote(job))
        except RayActorError as error:
            self._replica_died(slot, actor, job, error)
            return
        with self._cond:
            slot.held = outcome.pop("held")
            slot.loras = {model: loras for model, loras in slot.loras.items() if model in slot.held}
            if job.model in slot.held:
                slot.loras[job.model] = lora_key(job)
            self.record(job.id, outcome)
            self._died_once.pop(job.id, None)
            slot.job = None
            self._cond.notify_all()
        self.sweep()

    def _replica_died(self, slot: _Slot, actor, job: Job, error: Exception) -> None:
        logger.error("Replica %s died while running request %s: %s", slot.name, job.id, error)
        with self._cond:
            if slot.actor is actor and not self._stopping:
                self._spawn(slot)
            slot.job = None
            if self._stopping:
                self.store.update(job.id, status="in_queue")
            elif job.cancel_requested:
                self._finish(job.id, status="canceled")
            elif job.id in self._died_once:
                self._died_once.pop(job.id)
                self._finish(job.id, status="failed", error=(
                    f"The replica running this request died, twice (last: {type(error).__name__}); it is not "
                    "started again, as it may be what kills replicas. Check the replica logs (ray logs)."))
            else:
                self._died_once[job.id] = slot.index
                job.step = 0
                self.store.update(job.id, status="in_queue")
                self._queue.appendleft(job)
                logger.warning("Request %s queued again, to run on another replica.", job.id)
            self._cond.notify_all()


# ---------------------------------------------------------------------------------------------------------------- app
def replica_options(settings: Settings) -> dict:
    """One GPU per replica where the cluster has GPUs and the device is not the CPU; else one CPU."""
    gpus = ray.cluster_resources().get("GPU", 0)
    return {"num_gpus": 1} if gpus and settings.device != "cpu" else {"num_cpus": 1}


def default_replicas(settings: Settings) -> int:
    """One replica per GPU of the cluster (one on a CPU-only cluster)."""
    options = replica_options(settings)
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if "num_gpus" in options else 1


def check_fits(replicas: int, options: dict) -> None:
    """Refuse a replica count the cluster cannot hold: the extra replicas would wait for resources forever, and so
    would every job routed to them."""
    available = ray.cluster_resources()
    for resource, option in (("GPU", "num_gpus"), ("CPU", "num_cpus")):
        needed = replicas * options.get(option, 0)
        if needed > available.get(resource, 0):
            raise ValueError(f"{replicas} replicas need {needed:g} {resource}(s) ({option}={options[option]:g} each), "
                             f"but the Ray cluster has {available.get(resource, 0):g}; lower --replicas or add nodes.")


def build_app(settings: Settings, replicas: int | None = None, options: dict | None = None,
              name_prefix: str = "aitk-replica") -> serve.Application:
    """The Serve application: the FastAPI app of ``server.main`` as the ingress (one process), its queue run by
    ``replicas`` replica actors (default: one per GPU) with Ray actor ``options`` (default:
    :func:`replica_options`). Call after ``ray.init``."""
    from .main import create_app

    replicas = default_replicas(settings) if replicas is None else replicas
    options = replica_options(settings) if options is None else options
    check_fits(replicas, options)
    make_worker = partial(RayDispatcher, replicas=replicas, replica_options=options, name_prefix=name_prefix)

    def make_app():  # a function (not a partial): Serve builds the app in the ingress process
        return create_app(settings, make_worker=make_worker)

    @serve.deployment(name="aitk-ingress", num_replicas=1, max_ongoing_requests=256,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(make_app)
    class Ingress:
        """The HTTP API; the app's lifespan opens the store and starts the replicas."""

    return Ingress.bind()


def app_builder(args: dict) -> serve.Application:
    """For a Serve config file (``import_path: aitk_inference.server.ray_serve:app_builder``): settings from the
    environment (``runtime_env.env_vars``), ``args: {replicas: N}`` optional."""
    unknown = set(args) - {"replicas"}
    if unknown:
        raise ValueError(f"Unknown application args {sorted(unknown)}; the only one is 'replicas' (settings come "
                         "from the environment, see SERVER.md).")
    replicas = args.get("replicas")
    return build_app(Settings.from_env(), None if replicas is None else int(replicas))


def serve_ray(settings: Settings, replicas: int | None = None, address: str | None = None) -> int:
    """``serve --ray``: connect to (or start) a Ray cluster and run the app on ``settings.host:port`` until SIGINT
    or SIGTERM, then shut Serve down (the ingress stops its replicas; what they were running is queued again)."""
    import signal

    ray.init(address=address)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, replicas), name="aitk", route_prefix="/")
        logger.warning("Serving on http://%s:%d with Ray Serve; Ctrl+C stops.", settings.host, settings.port)
        stop.wait()
        serve.delete("aitk")
    finally:
        ray.shutdown()
    return 0
