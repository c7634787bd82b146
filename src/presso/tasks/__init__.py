"""Tasks: what depends on the task, asked of one object so that no verb branches on it.

- ``classify`` (``tasks/classify.py``): class scores against class indices; top-1.
- ``detect`` (``tasks/detect.py``): boxes; the detector's own loss; COCO mAP50-95 / mAP50; NMS.
- a user's own task: ``path/to/file.py:ClassName``, a subclass of :class:`presso.tasks.Task` (``--trust``: it is
  code). See docs/tasks.md for the protocol and an example.

The task is resolved in this order: given (``--task``), the model's card, the data (a detection dataset), the model
(a detector's class), else ``classify``.
"""

from __future__ import annotations

import importlib
from typing import Any

from presso.errors import ConfigError, UntrustedFileError, closest
from presso.tasks.base import Task

__all__ = ["TASKS", "Task", "get_task", "infer_task", "model_task", "register_task", "task_name_of_model"]

TASKS: dict[str, type[Task]] = {}
_MODULES = {"classify": "presso.tasks.classify", "detect": "presso.tasks.detect"}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available by its ``name`` (``--task NAME``)."""
    if not cls.name or not cls.headline:
        raise ConfigError(f"Task class {cls.__name__} needs a name and a headline metric.")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str | Task, *, trust: bool = False) -> Task:
    """A task object by name (``classify``, ``detect``), or a user's ``file.py:Class`` (only with ``trust``)."""
    if isinstance(name, Task):
        return name
    text = str(name).strip()
    if text in _MODULES:
        importlib.import_module(_MODULES[text])
        return TASKS[text]()
    if text in TASKS:
        return TASKS[text]()
    file, sep, cls_name = text.partition(":")
    if sep and file.endswith(".py"):
        return _user_task(file, cls_name, trust)
    raise ConfigError(
        f"Unknown task '{text}': give {', '.join(_MODULES)} or path/to/file.py:ClassName.{closest(text, _MODULES)}"
    )


def _user_task(file: str, cls_name: str, trust: bool) -> Task:
    from pathlib import Path

    from presso.models.sources import TRUST_HINT, import_file

    if not trust:
        raise UntrustedFileError(f"The task '{file}:{cls_name}' runs the Python file '{file}'. {TRUST_HINT}")
    module = import_file(Path(file), "task file")
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(
            f"'{file}:{cls_name}' is not a subclass of presso.tasks.Task; define `class {cls_name}(Task)` with "
            "name, headline, loss() and metric() (docs/tasks.md)."
        )
    try:
        task = cls()
    except TypeError as e:
        raise ConfigError(f"The task class '{file}:{cls_name}' cannot be created: {e}") from None
    task.spec = f"{file}:{cls_name}"  # what the card records, so a later verb finds the same task
    return task


def task_name_of_model(model: Any) -> str | None:
    """The task a model's own class implies: a known detector family gives ``detect``; None when not known."""
    if model is None:
        return None
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        if module == "presso.models.transformers_hub" and cls.__name__ == "HFDetection":
            return "detect"
        if module.startswith("torchvision.models.detection") and cls.__name__ in (
            "GeneralizedRCNN", "SSD", "RetinaNet", "FCOS",
        ):  # fmt: skip
            return "detect"
        if module.startswith("ultralytics.") and cls.__name__ == "DetectionModel":
            return "detect" if type(model).__name__ in ("DetectionModel",) else None
    return None


def model_task(model: Any) -> Task:
    """The built-in task ``model`` is for, without running anyone's code: its card's task when built in, else its
    class's (:func:`task_name_of_model`), else ``classify``. A user's own task on the card (code, needing trust) is
    answered by ``classify``'s defaults; verbs that run it resolve it with :func:`infer_task`."""
    from presso.models.card import get_card

    recorded = getattr(get_card(model), "task", None) if model is not None else None
    return get_task(recorded if recorded in _MODULES else task_name_of_model(model) or "classify")


def infer_task(model: Any = None, bundle: Any = None, given: str | Task | None = None, *, trust: bool = False) -> Task:
    """The task for ``model`` on ``bundle``: ``given``, else the model's card, else the data, else the model's
    class, else ``classify``. A given task that contradicts the data is an error naming both."""
    from presso.models.card import get_card

    card = get_card(model) if model is not None else None
    name: str | Task | None = given or getattr(card, "task", None)
    if name is None and bundle is not None and getattr(bundle, "task", "classify") != "classify":
        name = bundle.task
    name = name or task_name_of_model(model) or "classify"
    task = get_task(name, trust=trust)
    kind = getattr(bundle, "task", None)
    if kind is not None and kind != task.data_kind:
        what = {"detect": "boxes", "classify": "class labels"}
        raise ConfigError(
            f"The task is '{task.name}' but the data '{bundle.name}' is {kind} data ({what.get(kind, kind)}); "
            f"give --task {kind} or data with {what.get(task.data_kind, task.data_kind)}."
        )
    if bundle is not None:
        task.classes = list(bundle.classes) if getattr(bundle, "classes", None) else None
    return task
