"""Render the config reference (README.md's table) from the models' field docstrings, so the
documentation cannot drift from the code. ``python -m elastic_ckpt.config.reference``."""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel

from elastic_ckpt.config.schema import TrainConfig


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = field.annotation if isinstance(field.annotation, type) and issubclass(
            field.annotation, BaseModel) else None
        if section is not None:
            rows += _rows(section, key + ".")
            continue
        variants = [typing.get_args(v)[0] if typing.get_origin(v) is typing.Annotated else v
                    for v in typing.get_args(field.annotation)]
        if variants and all(isinstance(v, type) and issubclass(v, BaseModel) for v in variants):
            for cls in variants:  # a tagged union of sections (data.dataset)
                kind = typing.get_args(cls.model_fields["kind"].annotation)[0]
                rows += _rows(cls, f"{key} ({kind}).")
            continue
        doc = (field.description or "").replace("``", "`").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_default(field)} | {doc} |")
    return rows


def reference_markdown() -> str:
    return "\n".join(["| field | default | meaning |", "|---|---|---|", *_rows(TrainConfig)])


if __name__ == "__main__":
    print(reference_markdown())
