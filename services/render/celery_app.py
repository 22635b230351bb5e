"""The Celery app for render workers, configured from Settings at worker start.

Long GPU tasks: late ack with reject on worker loss (a task whose worker dies is
redelivered, and the render core is idempotent), prefetch 1, soft and hard time
limits, one queue per device class, recycle processes after N tasks. The
embedded mode uses kombu's filesystem transport, so no broker server is needed.
"""

from __future__ import annotations

from celery import Celery
from pigment.services.common.settings import Settings

RENDER_TASK = "pigment.render"  # args: [request_ids] rendered together where compatible
RETRAIN_TASK = "pigment.retrain"  # args: [kind]; a worker plug-in (Settings.worker_plugins) defines it
BATCH_CHUNK_TASK = "pigment.batch.chunk"  # services/render/batch_tasks.py
BATCH_SWEEP_TASK = "pigment.batch.sweep"


def make_celery(settings: Settings) -> Celery:
    app = Celery("pigment", broker=settings.broker_url)
    conf = dict(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True, task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1, task_soft_time_limit=settings.render_timeout_s,
        task_time_limit=settings.render_timeout_s + 30, worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        task_routes={RENDER_TASK: {"queue": settings.render_queue}, RETRAIN_TASK: {"queue": settings.retrain_queue}},
        task_default_queue=settings.render_queue,
        task_annotations={RETRAIN_TASK: {"soft_time_limit": settings.retrain_timeout_s,
                                         "time_limit": settings.retrain_timeout_s + 60}},
        beat_schedule=retrain_schedule(settings),
        broker_connection_timeout=3, broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if settings.broker_url.startswith("filesystem"):
        folder = str(settings.broker_dir)
        settings.broker_dir.mkdir(parents=True, exist_ok=True)
        conf.update(broker_transport_options={"data_folder_in": folder, "data_folder_out": folder,
                                              "control_folder": str(settings.broker_dir / "control"),
                                              "store_processed": False,
                                              # kombu polls the folder once a second by default: that
                                              # was 0.96 s of a 2.07 s request on a GPU (RESULTS "GPU")
                                              "polling_interval": 0.1},
                    worker_enable_remote_control=False)
    else:
        # Redis redelivers an unacked (late-ack) task after visibility_timeout: longer than any task's hard
        # limit, or a slow render would run twice; a dead worker's render is re-sent sooner by the reaper.
        visibility = max(settings.render_timeout_s + 30, settings.retrain_timeout_s + 60) + 60
        conf.update(broker_transport_options={"max_retries": 1, "socket_connect_timeout": 3, "socket_timeout": 5,
                                              "visibility_timeout": visibility})
    app.conf.update(conf)
    return app


def retrain_schedule(settings: Settings) -> dict:
    """The beat entry of the retrain job, when ``retrain_every_s`` > 0 (else none)."""
    if settings.retrain_every_s <= 0:
        return {}
    return {"pigment-retrain": {"task": RETRAIN_TASK, "schedule": settings.retrain_every_s,
                                "args": [settings.retrain_kind],
                                "options": {"queue": settings.retrain_queue, "expires": settings.retrain_every_s}}}


def dispatcher(app: Celery, window_s: float = 0.0, max_batch: int = 8):
    """A function that queues one render by request id, failing fast if the broker is down.

    With ``window_s > 0`` requests arriving within the window go out as one task
    (at most ``max_batch`` ids), so the worker can render them as one batch; each
    caller still gets its own broker error, if any.
    """

    def send(request_ids: list[str]) -> None:
        app.send_task(RENDER_TASK, args=[request_ids], task_id=f"render-{request_ids[0]}", retry=False)

    if window_s <= 0:
        return lambda request_id: send([request_id])
    return MicroBatcher(send, window_s, max_batch)


class MicroBatcher:
    """Collects ids for ``window_s`` (or until ``max_batch``), then sends them in one call."""

    def __init__(self, send, window_s: float, max_batch: int):
        import threading

        self.send, self.window_s, self.max_batch = send, window_s, max_batch
        self.lock = threading.Lock()
        self.pending: list[tuple[str, threading.Event, list]] = []
        self.flusher: threading.Timer | None = None

    def __call__(self, request_id: str) -> None:
        import threading

        done, error = threading.Event(), []
        with self.lock:
            self.pending.append((request_id, done, error))
            if len(self.pending) >= self.max_batch:
                self._flush_locked()
            elif self.flusher is None:
                self.flusher = threading.Timer(self.window_s, self._flush)
                self.flusher.daemon = True
                self.flusher.start()
        done.wait()
        if error:
            raise error[0]

    def _flush(self) -> None:
        with self.lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            self.flusher = None
        batch, self.pending = self.pending, []
        if not batch:
            return
        try:
            self.send([rid for rid, _, _ in batch])
        except Exception as exc:  # every caller of this batch sees the broker error
            for _, _, error in batch:
                error.append(exc)
        for _, done, _ in batch:
            done.set()


def batch_queue(settings: Settings) -> str:
    return f"{settings.render_queue}.batch"


def chunk_dispatcher(app: Celery, settings: Settings):
    """A function that queues one chunk task, failing fast if the broker is down."""

    def send(job_id: str, chunk: int, chunk_size: int) -> None:
        limit = chunk_size * settings.render_timeout_s + 60
        app.send_task(BATCH_CHUNK_TASK, args=[job_id, chunk], queue=batch_queue(settings), retry=False,
                      time_limit=limit + 30, soft_time_limit=limit)

    return send
