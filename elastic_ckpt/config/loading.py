"""YAML files and ``--set key=value`` overrides -> ``TrainConfig``, with errors naming the field."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from elastic_ckpt.config.schema import TrainConfig
from elastic_ckpt.errors import ConfigError


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML; None: defaults), apply ``overrides`` (``a.b=value``, value parsed
    as YAML) and validate. Raises ``ConfigError`` naming the file and the field."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = path
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}", file=path) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}", file=path) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got "
                              f"{type(raw).__name__}", file=path)
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, where)


def validate_config(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        fields = [_field_path(err["loc"], raw) for err in exc.errors()]
        lines = [f"  {field or '<root>'}: {err['msg']}"
                 for field, err in zip(fields, exc.errors())]
        raise ConfigError(f"{where}: invalid configuration:\n" + "\n".join(lines),
                          file=where, field=fields[0]) from None


def _field_path(loc: tuple, raw: Any) -> str:
    """The dotted key a user writes (and can ``--set``): pydantic's ``loc`` without validator
    names and without the tag a discriminated union inserts, which is not a key of the input
    (``data.dataset.synthetic.seq_len`` -> ``data.dataset.seq_len``)."""
    parts: list[str] = []
    node = raw
    for i, part in enumerate(loc):
        if str(part).startswith("function-"):
            continue
        if isinstance(node, dict) and part not in node and i < len(loc) - 1:
            continue
        parts.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. data.global_batch_size=64",
                          field=item)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section", field=key)
        node = child
    node[parts[-1]] = value


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
