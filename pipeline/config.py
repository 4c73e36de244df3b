"""Stage configs: one frozen, typed dataclass per stage, loaded from a section of ``params.yaml``.

The dataclass defaults are the documented defaults; unknown keys, wrongly typed values (a boolean
is not a number) and values out of their bounds fail loudly, naming the section and key. Bounds
are declared on the fields themselves (:func:`setting`), so the generated JSON schema
(``schemas/params.v1.json``) carries the same ``minimum``/``maximum``/``enum`` as the checks.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import ConfigError

C = TypeVar("C")

# The top-level keys params.yaml may hold: one section per stage, the teacher and recipe mappings,
# and the teacher names dvc.yaml interpolates. ``tests/test_config.py`` checks this list against
# the generated schema, so a new section is added to both.
PARAMS_SECTIONS = ("prepare", "teachers", "teach", "align", "neighbors", "itm", "train", "recipes", "evaluate",
                   "export", "distill_from", "vision_from", "text_from", "single_stream_from", "grounding")

# Bound keywords a field may declare (JSON-schema names); sequences apply them to each item.
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "pattern")
# A device: "auto" (CUDA when available), "cpu", "mps", "cuda" or "cuda:<index>".
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            minimum: float | None = None, maximum: float | None = None,
            exclusive_minimum: float | None = None, pattern: str | None = None,
            min_items: int | None = None) -> Any:
    """A config field with bounds, checked when the config is built and written to the schema.

    ``minimum``/``maximum`` are inclusive, ``exclusive_minimum`` strict; ``pattern`` is a regular
    expression a string must match whole. On a sequence they bound every item, and ``min_items``
    its length. ``None`` (for optional fields) is never bounded.
    """
    bounds = {"minimum": minimum, "maximum": maximum, "exclusiveMinimum": exclusive_minimum,
              "pattern": pattern, "minItems": min_items}
    metadata = {"bounds": {k: v for k, v in bounds.items() if v is not None}}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def check_settings(cfg: Any, where: str) -> None:
    """Check every bounded field of config ``cfg`` (call from ``__post_init__``)."""
    for f in dataclasses.fields(cfg):
        check_bounds(getattr(cfg, f.name), f.metadata.get("bounds", {}), f"{where}.{f.name}")


def check_bounds(value: Any, bounds: dict[str, Any], where: str) -> None:
    """Raise ``ConfigError`` naming ``where`` when ``value`` is outside ``bounds``."""
    if value is None or not bounds:
        return
    if isinstance(value, (tuple, list)):
        if len(value) < bounds.get("minItems", 0):
            raise ConfigError(f"{where}: needs at least {bounds['minItems']} item(s), got {list(value)}")
        for i, item in enumerate(value):
            check_bounds(item, bounds, f"{where}[{i}]")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in bounds and not value >= bounds["minimum"]:
            raise ConfigError(f"{where}: must be >= {bounds['minimum']}, got {value}")
        if "maximum" in bounds and not value <= bounds["maximum"]:
            raise ConfigError(f"{where}: must be <= {bounds['maximum']}, got {value}")
        if "exclusiveMinimum" in bounds and not value > bounds["exclusiveMinimum"]:
            raise ConfigError(f"{where}: must be > {bounds['exclusiveMinimum']}, got {value}")
    if isinstance(value, str) and "pattern" in bounds and not re.fullmatch(bounds["pattern"], value):
        raise ConfigError(f"{where}: {value!r} is not valid here (expected {bounds['pattern']})")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read ``params.yaml`` (an empty file gives ``{}``); malformed YAML and unknown top-level
    sections are one-line errors naming the file (and line and column)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameters file not found (run from the project root or pass --params)")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(str(k) for k in data if k not in PARAMS_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level section(s) {unknown}; known: "
                          f"{', '.join(PARAMS_SECTIONS)}")
    return data


def from_dict(cls: type[C], data: dict[str, Any] | None, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``; nested dataclasses are built recursively."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
        check_bounds(kwargs[name], fields[name].metadata.get("bounds", {}), key)
    return cls(**kwargs)


def recipe_fields(recipes: dict[str, Any] | None, name: str, cls: type, key: str, section: str,
                  none_hint: str) -> dict[str, Any]:
    """Recipe ``name`` of the ``section`` mapping ``recipes``, checked as dataclass ``cls`` and
    returned as a dict; an unknown name (setting ``key``) fails with the known ones."""
    recipes = recipes or {}
    if name not in recipes:
        raise ConfigError(f"{key}: unknown recipe {name!r}; known: "
                          f"{', '.join(sorted(recipes)) or none_hint}")
    return dataclasses.asdict(from_dict(cls, recipes[name], f"{section}.{name}"))


def load_section(cls: type[C], section: str, params: str | Path | dict = "params.yaml") -> C:
    """Build ``cls`` from ``params[section]`` (dotted sections like ``teach.clip`` allowed)."""
    data = params if isinstance(params, dict) else load_params(params)
    node: Any = data
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params: section {section!r} not found (missing {part!r})")
        node = node[part]
    return from_dict(cls, node, section)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config (for fingerprints and logs)."""
    return dataclasses.asdict(cfg)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint``; build nested dataclasses, tuples from lists."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {hint}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint in (int, float) and isinstance(value, bool):  # YAML's true/false are not numbers
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint is float and isinstance(value, int):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def json_schema(cls: type) -> dict[str, Any]:
    """JSON schema of a config dataclass: field types, defaults, no unknown keys."""
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        prop = _with_bounds(_type_schema(hints[f.name]), f.metadata.get("bounds", {}))
        default = _default(f)
        if default is not dataclasses.MISSING:
            prop["default"] = default
        props[f.name] = prop
    required = [f.name for f in dataclasses.fields(cls) if _default(f) is dataclasses.MISSING]
    schema = {"type": "object", "title": cls.__name__, "properties": props, "additionalProperties": False}
    return schema | ({"required": required} if required else {})


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return dataclasses.MISSING
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else (
        [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        if isinstance(value, tuple) else value)


def _with_bounds(prop: dict[str, Any], bounds: dict[str, Any]) -> dict[str, Any]:
    """``prop`` with ``bounds`` on its numbers or strings: on an array's items, a union's members."""
    if not bounds:
        return prop
    if "anyOf" in prop:
        return {"anyOf": [p if p.get("type") == "null" else _with_bounds(p, bounds) for p in prop["anyOf"]]}
    if prop.get("type") == "array":
        items = {k: v for k, v in bounds.items() if k != "minItems"}
        length = {"minItems": bounds["minItems"]} if "minItems" in bounds else {}
        return prop | {"items": _with_bounds(prop["items"], items)} | length
    kind = prop.get("type")
    keep = {k: v for k, v in bounds.items()
            if (k == "pattern") == (kind == "string") and k in _BOUND_KEYS}
    if "pattern" in keep:
        keep["pattern"] = f"^(?:{keep['pattern']})$"  # JSON schema patterns are not anchored
    return prop | keep


def _type_schema(hint: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [{"type": "null"} if a is type(None) else _type_schema(a) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (tuple, list):
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if dataclasses.is_dataclass(hint):
        return json_schema(hint)
    return {"type": _JSON_TYPES[hint]} if hint in _JSON_TYPES else {}


@dataclasses.dataclass(frozen=True)
class TeacherEntry:
    """One teacher of ``params.yaml``'s ``teachers`` mapping."""

    teacher: str                                           # registry name (`distill list` prints them)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # the teacher's factory's kwargs
