"""Worker entry point: ``celery -A pigment.services.render.worker worker -Q render.cpu``.

The one module that builds its app at import: Celery's ``-A`` needs it, and this
module is only ever imported by the worker process itself. Tasks defined outside
serving code (the retrain job, with the trainers) are plug-ins named in
``Settings.worker_plugins``.
"""

import importlib

from pigment.services.common.settings import Settings
from pigment.services.render import batch_tasks, liveness, tasks  # noqa: F401 - registers the tasks
from pigment.services.render.celery_app import make_celery

liveness.die_with_parent()  # no orphan consuming after the server that started this worker is killed
settings = Settings()
for _plugin in settings.worker_plugins:
    importlib.import_module(_plugin)
app = make_celery(settings)
