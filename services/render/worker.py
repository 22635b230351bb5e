"""Worker entry point: ``celery -A pigment.services.render.worker worker -Q render.cpu``.

The one module that builds its app at import: Celery's ``-A`` needs it, and this
module is only ever imported by the worker process itself. Tasks defined outside
serving code (the retrain job, with the trainers) are plug-ins named in
``Settings.worker_plugins``. It also sets up what an operator sees of the worker:
our log format (JSON in production), traces joined to the gateway's (context
from the task headers) and ``/metrics`` on ``PIGMENT_WORKER_METRICS_PORT``.
"""

import importlib

from celery.signals import setup_logging, worker_init
from pigment.services.common.settings import Settings
from pigment.services.render import batch_tasks, liveness, tasks  # noqa: F401 - registers the tasks
from pigment.services.render.celery_app import make_celery

liveness.die_with_parent()  # no orphan consuming after the server that started this worker is killed
settings = Settings()
for _plugin in settings.worker_plugins:
    importlib.import_module(_plugin)
app = make_celery(settings)


@setup_logging.connect
def _logging(loglevel=None, **_kwargs) -> None:  # connected: Celery leaves the root logger to us
    from pigment.services.common.logs import configure_logging

    configure_logging(loglevel or "INFO", settings.log_format)


@worker_init.connect
def _observability(**_kwargs) -> None:
    from pigment.services.common.metrics import serve_metrics
    from pigment.services.common.tracing import setup_tracing

    setup_tracing(settings, "pigment-worker")
    if settings.worker_metrics_port is not None:
        serve_metrics(settings.worker_metrics_port, settings.host)
