"""Where a run's files go: relative local paths made absolute on the driver, once, and refused
where they would land in a directory Ray deletes (a ``ray job submit`` working-dir copy)."""

from __future__ import annotations

import os
from typing import Any

from elastic_ckpt.config import TrainConfig
from elastic_ckpt.errors import ConfigError

_WRITTEN = ("checkpoint.uri", "run_dir")
"""Fields a run writes to: they must outlive the job."""
_READ = ("checkpoint.init_from", "data.dataset.uri", "eval.dataset.uri", "model.path")
"""Fields a run only reads: a relative path names a file shipped with the working dir."""


def ray_working_dir_copy(cwd: str) -> bool:
    """Whether ``cwd`` is the copy of a job's ``--working-dir`` that Ray unpacks under its
    session directory (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``) and
    deletes when the job's runtime env is garbage-collected."""
    parts = os.path.normpath(cwd).split(os.sep)
    return "runtime_resources" in parts and any(p.startswith("_ray_pkg_") for p in parts)


def is_relative_local(uri: str) -> bool:
    if "://" in uri:
        return uri.startswith("file://") and not uri[len("file://"):].startswith("/")
    return not os.path.isabs(uri) and not uri.startswith("~")


def resolve_run_paths(config: TrainConfig, cwd: str | None = None) -> TrainConfig:
    """``config`` with every relative local path it writes to made absolute against ``cwd``
    (default: the driver's working directory), so every process of the run, on any node and
    in any working directory, uses the same one. Inside a Ray job's working-dir copy a
    relative written path is refused (``ConfigError`` naming the field): it would be deleted
    with the job. Relative read-only paths are made absolute outside jobs and kept relative
    inside one (each node has its own copy of the working dir)."""
    cwd = os.path.abspath(cwd or os.getcwd())
    in_job = ray_working_dir_copy(cwd)
    for field in _WRITTEN + _READ:
        value = _get(config, field)
        if not isinstance(value, str) or not value or not (
                is_relative_local(value) or value.startswith("~")):
            continue
        path = os.path.expanduser(value.removeprefix("file://"))
        if os.path.isabs(path):  # ~/...: absolute once expanded
            config = _set(config, field, path)
            continue
        if in_job:
            if field in _WRITTEN:
                raise ConfigError(
                    f"{field} is the relative path {value!r}, and this job runs in Ray's "
                    f"temporary copy of its working dir ({cwd}), which Ray deletes when the "
                    f"job ends: checkpoints and run files written there are lost. Set {field} "
                    "to an absolute path on storage every node shares (e.g. --set "
                    f"{field}=/mnt/shared/{os.path.basename(path.rstrip('/')) or 'run'}) or, "
                    "for checkpoints, an object store URI (s3://bucket/prefix, gs://...).",
                    field=field)
            continue
        config = _set(config, field, os.path.normpath(os.path.join(cwd, path)))
    return config


def _get(config: Any, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = getattr(node, part, None)
    return node


def _set(config: Any, field: str, value: str) -> Any:
    """A copy of the frozen ``config`` with ``field`` replaced (sections copied, not
    re-validated: only a path string changes)."""
    head, _, rest = field.partition(".")
    if not rest:
        return config.model_copy(update={head: value})
    return config.model_copy(update={head: _set(getattr(config, head), rest, value)})
