"""YAML files and ``--set key=value`` overrides -> ``TrainConfig``, with errors a person can act
on: each names where the key came from (``file.yaml:LINE`` or ``--set key=value``) and the
dotted field; an unknown key gets a "did you mean" from the schema's field paths, and a key of
another kind of a ``kind``-tagged section (``data.dataset``, ``model``) names that kind."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Discriminator, Tag, ValidationError

from elastic_ckpt.config.schema import TrainConfig
from elastic_ckpt.errors import ConfigError


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML; None: defaults), apply ``overrides`` (``a.b=value``, value parsed
    as YAML) and validate. Raises ``ConfigError`` naming the file (and line) or the ``--set``
    item, and the field."""
    raw: dict[str, Any] = {}
    marks: dict[str, str] = {}
    if path is not None:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}", file=path) from None
        loader = yaml.SafeLoader(text)  # one parse: the nodes (for line numbers) and the data
        try:
            node = loader.get_single_node()
            raw = (loader.construct_document(node) if node is not None else None) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}", file=path) from None
        finally:
            loader.dispose()
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got "
                              f"{type(raw).__name__}", file=path)
        marks = {key: f"{path}:{line}" for key, line in _key_lines(node).items()}
    sets: dict[str, str] = {}
    for item in overrides or []:
        sets[_apply_override(raw, item)] = f"--set {item}"
    where = path if path is not None else "--set overrides" if overrides else None
    return _validate(raw, where, path, marks, sets)


def validate_config(raw: dict[str, Any], where: str | None = None) -> TrainConfig:
    """Validate a plain dict; ``where`` (e.g. a file name) starts the error message."""
    return _validate(raw, where, where, {}, {})


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# -- where each key came from ---------------------------------------------------------------------
def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of that key, for every mapping key in a composed document."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set ``a.b=value`` in ``raw``; returns the dotted key."""
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
    return ".".join(parts)


def _origin(key: str, marks: dict[str, str], sets: dict[str, str]) -> str | None:
    """Where the value at ``key`` came from: the ``--set`` that wrote it (or a section above or
    below it), else the YAML line of the key or of its nearest section present."""
    parts = key.split(".") if key else []
    above = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    for k in above:
        if k in sets:
            return sets[k]
    for k, origin in sets.items():
        if key and k.startswith(key + "."):
            return origin
    for k in above:
        if k in marks:
            return marks[k]
    return None


# -- the schema as field paths --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Union:
    """A discriminated union of sections, chosen by their ``kind``."""

    members: dict[str, type[BaseModel]]
    default: str | None
    """The kind used when ``kind`` is omitted."""


_Shape = Union[type[BaseModel], _Union, None]  # None: a value, not a section


def _shape(annotation: Any, metadata: tuple = ()) -> _Shape:
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        return _shape(inner, (*metadata, *meta))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _shape(args[0], metadata)
        members: dict[str, type[BaseModel]] = {}
        for arg in args:
            model, meta = (get_args(arg)[0], get_args(arg)[1:]) if get_origin(
                arg) is Annotated else (arg, ())
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                return None
            tags = [m.tag for m in meta if isinstance(m, Tag)] or get_args(
                model.model_fields["kind"].annotation if "kind" in model.model_fields else None)
            if not tags:
                return None
            members[str(tags[0])] = model
        default = None
        for m in metadata:
            if isinstance(m, Discriminator) and callable(m.discriminator):
                try:
                    default = m.discriminator({})
                except Exception:  # a discriminator that needs its key: no default kind
                    pass
        return _Union(members, default if default in members else None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _fields(model: type[BaseModel]) -> dict[str, _Shape]:
    return {name: _shape(f.annotation, tuple(f.metadata)) for name, f in model.model_fields.items()}


@functools.cache
def _all_paths() -> tuple[str, ...]:
    """Every dotted field path of ``TrainConfig``, sections and each kind's fields included."""
    paths: dict[str, None] = {}

    def walk(shape: _Shape, prefix: str) -> None:
        for model in shape.members.values() if isinstance(shape, _Union) else [shape]:
            for name, child in _fields(model).items():
                paths[prefix + name] = None
                if child is not None:
                    walk(child, f"{prefix}{name}.")

    walk(TrainConfig, "")
    return tuple(paths)


@dataclasses.dataclass
class _Loc:
    """A pydantic error location as the user writes it, with the schema around its last key."""

    keys: list[str]
    shape: _Shape = None
    """The schema at the location (a section, a union, or None for a value)."""
    section: type[BaseModel] | None = None
    """The section holding the last key."""
    union: _Union | None = None
    """The union ``section`` was chosen from (the last key is a field of one of its kinds)."""
    kind: str | None = None


def _resolve(loc: tuple) -> _Loc:
    """Drop validator names and the tag a discriminated union inserts, which is not a key of
    the input (``data.dataset.synthetic.seq_len`` -> ``data.dataset.seq_len``)."""
    out = _Loc(keys=[], shape=TrainConfig)
    union = kind = None
    for part in loc:
        if str(part).startswith("function-"):
            continue
        shape = out.shape
        if isinstance(shape, _Union) and part in shape.members:
            union, kind = shape, str(part)
            out.shape = shape.members[part]
            continue
        out.section = shape if isinstance(shape, type) else None
        out.union, out.kind = union, kind
        union = kind = None
        out.keys.append(str(part))
        out.shape = _fields(out.section).get(part) if out.section is not None else None
    return out


# -- the messages ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    field: str
    """``ConfigError.field``: the dotted key the user wrote (or should write)."""
    display: str
    """What the line names (empty for a rule across sections, whose sentence names them)."""
    text: str
    origin_key: str | None = None
    """The key whose origin (file line, ``--set``) the line starts with; None: no origin."""


def _validate(raw: dict[str, Any], where: str | None, file: str | None,
              marks: dict[str, str], sets: dict[str, str]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        entries = _entries(exc.errors(), raw)
    label = where or "the configuration"
    lines = []
    for e in entries:
        origin = None if e.origin_key is None else _origin(e.origin_key, marks, sets)
        body = f"{e.display}: {e.text}" if e.display else e.text
        lines.append((origin, body))
    if len(lines) == 1:
        origin, body = lines[0]
        message = f"{origin or label}: {body}"
    else:
        message = f"{label}: {len(lines)} configuration errors:\n" + "\n".join(
            f"  {origin}: {body}" if origin else f"  {body}" for origin, body in lines)
    raise ConfigError(message, file=file, field=entries[0].field) from None


def _entries(errors: list[dict[str, Any]], raw: dict[str, Any]) -> list[_Entry]:
    entries: list[_Entry] = []
    other_kind: dict[tuple[str, str], tuple[_Entry, _Loc, list[str]]] = {}
    for err in errors:
        loc = _resolve(err["loc"])
        path = ".".join(loc.keys)
        if err["type"] == "extra_forbidden":
            key, section = loc.keys[-1], ".".join(loc.keys[:-1])
            owners = [] if loc.union is None else [
                kind for kind, model in loc.union.members.items()
                if kind != loc.kind and key in model.model_fields]
            if owners:  # a field of another kind: one line per section and kind
                if (section, owners[0]) not in other_kind:
                    entry = _Entry(path, section, "", origin_key=path)
                    other_kind[(section, owners[0])] = (entry, loc, [])
                    entries.append(entry)
                other_kind[(section, owners[0])][2].append(key)
                continue
            entries.append(_Entry(path, path, _unknown(loc, err.get("input")), origin_key=path))
        elif err["type"] == "union_tag_invalid" and isinstance(loc.shape, _Union):
            entries.append(_Entry(path, path, _bad_kind(loc.shape, err["ctx"]["tag"]),
                                  origin_key=f"{path}.kind"))
        elif not loc.keys:  # a rule across sections: its sentence names the fields
            text = _message(err)
            entries.append(_Entry(_mentioned(text), "", text))
        elif err["type"] == "missing":  # it came from where its section was written
            entries.append(_Entry(path, path, "required, not set",
                                  origin_key=".".join(loc.keys[:-1])))
        else:
            entries.append(_Entry(path, path, _message(err), origin_key=path))
    for (section, owner), (entry, loc, keys) in other_kind.items():
        explicit = isinstance(_at(raw, section), dict) and "kind" in _at(raw, section)
        entry.text = _other_kind(section, loc, owner, keys, explicit)
    return entries


_SCALARS = (str, int, float, bool, type(None))


def _message(err: dict[str, Any]) -> str:
    text = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
    if isinstance(err.get("input"), _SCALARS):
        text += f" (got {err['input']!r})"
    return text


def _mentioned(text: str) -> str:
    """The first field path a sentence names ("" if none)."""
    paths = set(_all_paths())
    return next((t for t in re.findall(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", text)
                 if t in paths), "")


def _at(raw: Any, dotted: str) -> Any:
    for part in dotted.split(".") if dotted else []:
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _leaves(value: Any, prefix: str = "") -> list[str]:
    if not isinstance(value, dict) or not value:
        return [prefix.rstrip(".")] if prefix else []
    return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}{k}.")]


def _unknown(loc: _Loc, value: Any) -> str:
    """An unknown key: the closest field of its section, else the same name in another
    section, else the closest field path anywhere; with none, the section's fields."""
    key, section = loc.keys[-1], ".".join(loc.keys[:-1])
    names = list(loc.section.model_fields) if loc.section is not None else []
    paths = _all_paths()

    def full(name: str) -> str:
        return f"{section}.{name}" if section else name

    guess = difflib.get_close_matches(key, names, n=1)
    suggestions = [full(guess[0])] if guess else [
        p for p in paths if p.rsplit(".", 1)[-1] == key][:3]
    if not suggestions:
        others = [p for p in paths  # its own section's fields were tried by name above
                  if p.rpartition(".")[0] != section and not full(key).startswith(p + ".")]
        suggestions = difflib.get_close_matches(full(key), others, n=1, cutoff=0.7)
    leaves = _leaves(value)
    if len(suggestions) == 1 and len(leaves) == 1 and f"{suggestions[0]}.{leaves[0]}" in paths:
        suggestions = [f"{suggestions[0]}.{leaves[0]}"]  # checkpont.uri -> checkpoint.uri
    if suggestions:
        return f"unknown field; did you mean {' or '.join(suggestions)}?"
    where = f"{section} has" if section else "the top level has"
    return f"unknown field; {where}: {', '.join(names)}"


def _kinds(union: _Union) -> str:
    return ", ".join(f"{kind} ({', '.join(n for n in model.model_fields if n != 'kind')})"
                     for kind, model in union.members.items())


def _kind_doc(model: type[BaseModel]) -> str:
    """A kind's ``kind`` docstring as a phrase: "token sequences from Parquet files ..."."""
    doc = (model.model_fields["kind"].description or "").strip().rstrip(".").replace("``", "`")
    first = doc.split(" ", 1)[0]
    if first[1:] == first[1:].lower():  # "A ..." -> "a ...", but "HF ..." stays
        doc = doc[:1].lower() + doc[1:]
    return doc


def _other_kind(section: str, loc: _Loc, owner: str, keys: list[str], explicit: bool) -> str:
    union = loc.union
    noun = section.rsplit(".", 1)[-1]
    how = f"kind: {loc.kind}" if explicit or loc.kind != union.default else "the default kind"
    names = ", ".join(f"`{k}`" for k in keys)
    verb = "is not a field" if len(keys) == 1 else "are not fields"
    doc = _kind_doc(union.members[owner])
    return (f"{names} {verb} of the {loc.kind} {noun} ({how}); set kind: {owner}"
            f"{f' for {doc}' if doc else ''}. Kinds: {_kinds(union)}")


def _bad_kind(union: _Union, tag: Any) -> str:
    guess = difflib.get_close_matches(str(tag), list(union.members), n=1)
    hint = f"; did you mean {guess[0]}?" if guess else "."
    return f"unknown kind {tag!r}{hint} Kinds: {_kinds(union)}"
