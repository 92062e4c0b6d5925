"""Finding tasks, codecs and strategies by name: built-ins, entry points, import strings.

A name is resolved in this order:
1. an import string `"package.module:Attr"` (the module is imported from `sys.path`; `fedray run`
   puts the job spec's folder first);
2. an entry point of the group (`fedray.tasks`, `fedray.codecs`, `fedray.strategies`) in any
   installed distribution, e.g. in a user's `pyproject.toml`:

       [project.entry-points."fedray.tasks"]
       cifar-resnet = "mypkg.tasks:CifarResNet"
       [project.entry-points."fedray.codecs"]
       mycodec = "mypkg.codecs"          # importing the module registers the codec

3. the built-ins (`fedray.builtin_tasks` for tasks).

Every process that needs a plug-in resolves it itself: the driver, worker actors (tasks arrive
pickled and import their module), aggregation shards and real clients (codec and strategy
registries call `load_group` when they meet an unknown name).
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, Mapping

__all__ = ["GROUPS", "PluginError", "entry_point", "entry_point_names", "import_target", "load_group", "load_task",
           "task_for_spec"]

GROUPS = ("fedray.tasks", "fedray.codecs", "fedray.strategies")
_loaded: set[str] = set()


class PluginError(ImportError):
    """A plug-in name or import string cannot be resolved; the message says why."""


def import_target(target: str) -> Any:
    """The object an import string `"pkg.mod:Attr"` (or `"pkg.mod:Outer.Inner"`) names.

    Raises:
        PluginError: malformed string, module not importable, or no such attribute; the
            message carries the underlying error.
    """
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise PluginError(f"{target!r} is not an import string of the form 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or the user module's own error while importing
        raise PluginError(f"cannot import module {mod_name!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"module {mod_name!r} has no attribute {attr!r}") from None
    return obj


def _entry_points(group: str):
    return metadata.entry_points().select(group=group)


def entry_point_names(group: str) -> list[str]:
    """Names the installed distributions register in `group`."""
    return sorted({ep.name for ep in _entry_points(group)})


def entry_point(group: str, name: str) -> Any | None:
    """The object entry point `name` of `group` loads, or None when there is none.

    Raises:
        PluginError: the entry point exists but fails to load.
    """
    for ep in _entry_points(group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as e:
                raise PluginError(f"entry point {name!r} of {group} ({ep.value}) fails to load: "
                                  f"{type(e).__name__}: {e}") from e
    return None


def load_group(group: str) -> None:
    """Import every entry point of `group` once per process (codec and strategy modules register
    themselves when imported). A failing plug-in is skipped here; resolving it by name reports it."""
    if group not in GROUPS:
        raise ValueError(f"unknown plug-in group {group!r}; groups: {', '.join(GROUPS)}")
    if group in _loaded:
        return
    _loaded.add(group)
    for ep in _entry_points(group):
        try:
            ep.load()
        except Exception:  # reported when the name is asked for
            pass


def load_task(target: str, params: Mapping[str, Any] | None = None):
    """Build the task `target` names (import string, `fedray.tasks` entry point or built-in
    name) with `params` as keyword arguments.

    Raises:
        PluginError: the target cannot be found or imported, or building it fails.
    """
    from .builtin_tasks import BUILTIN_TASKS
    from .task import Task

    params = dict(params or {})
    if ":" in target:
        factory = import_target(target)
    else:
        factory = entry_point("fedray.tasks", target) or BUILTIN_TASKS.get(target)
        if factory is None:
            known = sorted(set(BUILTIN_TASKS) | set(entry_point_names("fedray.tasks")))
            raise PluginError(f"no task named {target!r}; give an import string 'package.module:Class' or one of "
                              f"{', '.join(known)}")
    if isinstance(factory, Task):
        if params:
            raise PluginError(f"{target!r} is a task object, not a class: it takes no params")
        return factory
    if not callable(factory):
        raise PluginError(f"{target!r} is a {type(factory).__name__}, not a Task class")
    try:
        task = factory(**params)
    except Exception as e:
        raise PluginError(f"{target}({', '.join(f'{k}=...' for k in params)}) failed: {type(e).__name__}: {e}") from e
    missing = [m for m in ("model", "num_clients", "client_data") if not callable(getattr(task, m, None))]
    if missing:
        raise PluginError(f"{target!r} built a {type(task).__name__}, which lacks {', '.join(missing)}; "
                          f"subclass fedray.Task")
    return task


def task_for_spec(spec, *, base_dir: str | None = None):
    """The task a job spec runs: `task.target` with `task.params`, else the built-in
    classification task its `data:` and `model:` sections describe. `base_dir` (the spec file's
    folder) goes first on `sys.path` so that `target: mytask:MyTask` beside the spec imports.

    Raises:
        SpecError: naming `task.target` (or `data`/`model`), with the import or build error.
    """
    import sys

    from fedray.orchestrator.spec import SpecError

    from .builtin_tasks import task_from_sections

    ts = getattr(spec, "task", None)
    if ts is None or ts.target is None:
        try:
            return task_from_sections(spec)
        except ValueError as e:
            raise SpecError(f"data: {e}") from None
    if base_dir and base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    try:
        return load_task(ts.target, ts.params)
    except PluginError as e:
        raise SpecError(f"task.target: {e}") from None
