"""The Celery app for render workers, configured from Settings at worker start.

Long GPU tasks: late ack with reject on worker loss (a task whose worker dies is
redelivered, and the render core is idempotent), prefetch 1, soft and hard time
limits, one queue per device class, recycle processes after N tasks. The
embedded mode uses kombu's filesystem transport, so no broker server is needed.
"""

from __future__ import annotations

from celery import Celery

from pigment.services.common.settings import Settings

RENDER_TASK = "pigment.render"


def make_celery(settings: Settings) -> Celery:
    app = Celery("pigment", broker=settings.broker_url)
    conf = dict(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True, task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1, task_soft_time_limit=settings.render_timeout_s,
        task_time_limit=settings.render_timeout_s + 30, worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        task_routes={RENDER_TASK: {"queue": settings.render_queue}}, task_default_queue=settings.render_queue,
        broker_connection_timeout=3, broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if settings.broker_url.startswith("filesystem"):
        folder = str(settings.broker_dir)
        settings.broker_dir.mkdir(parents=True, exist_ok=True)
        conf.update(broker_transport_options={"data_folder_in": folder, "data_folder_out": folder,
                                              "control_folder": str(settings.broker_dir / "control"),
                                              "store_processed": False},
                    worker_enable_remote_control=False)
    else:
        conf.update(broker_transport_options={"max_retries": 1, "socket_connect_timeout": 3, "socket_timeout": 5})
    app.conf.update(conf)
    return app


def dispatcher(app: Celery):
    """A function that queues one render by request id, failing fast if the broker is down."""

    def send(request_id: str) -> None:
        app.send_task(RENDER_TASK, args=[request_id], task_id=f"render-{request_id}", retry=False)

    return send

