"""Run parameters -> a trainer's typed settings: the one parser of all three workflows.

Each workflow declares its parameters once, as ``ParamSpec``s (type, enum, bounds, default,
description; the specs themselves live in ``common.config`` beside the rest of each workflow's
settings, and the class is here so that this parser, which scripts/ uses, needs nothing above it). Airflow validates a triggered run's conf against the same declarations
(typed ``Param``), so from the UI, the REST API and ``airflow dags trigger`` a bad value never
becomes a run. This parser is the second line, run by each DAG's first task before any work and
by the pipelines' command lines:

* it checks what a JSON schema cannot: a key no workflow parameter has (Airflow passes unknown
  conf keys through), and it is the only check on paths that bypass the schema (``dag.test``,
  ``python -m scripts.*_pipeline``, a run created with ``dag_run_conf`` validation off);
* it types values strictly: a bool is not an integer, ``0`` epochs is not "the default", NaN is
  not a number, ``3.5`` is not an integer; a string that spells the exact type ("300", "0.1",
  "true") is cast, because the command lines (``--param num_boost_round=300``) give strings;
* every error is a :class:`~scripts.core.errors.ParameterError` naming the workflow and the field, which
  ``common.alerts.permanent_errors_fail_fast`` turns into a failure without retries.

Pure: standard library only (no Airflow, no MLflow, no numpy).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

from scripts.core.errors import ParameterError

T = TypeVar("T")


@dataclass(frozen=True)
class ParamSpec:
    """One run parameter of a workflow, declared once.

    From this one declaration come: the DAG's typed ``airflow.sdk.Param`` (built in ``common.config``; the trigger form in the
    UI shows every knob with its default and meaning, and the API and CLI reject a value outside
    the schema when the run is triggered), the parser that checks a run's parameters before
    ``prepare`` does any work (``scripts.core.params``: the same types and bounds, plus what a schema
    cannot say - unknown keys, cross-field rules), and the docs table (``python
    dags/common/config.py params-table``).

    ``type`` is a JSON-schema type: integer | number | string | boolean. A parameter whose default
    is None is nullable: None means "not set" (the profile's epochs, the logical date's day).
    """

    name: str
    type: str
    default: object
    description: str
    enum: tuple[object, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    format: str | None = None  # JSON-schema format, e.g. "date" (YYYY-MM-DD)

    def __post_init__(self) -> None:
        if self.type not in JSON_TYPES:
            raise ValueError(f"param {self.name}: type must be one of {sorted(JSON_TYPES)}, not {self.type!r}")

    @property
    def nullable(self) -> bool:
        return self.default is None

    def schema(self) -> dict[str, object]:
        """The JSON schema Airflow validates this parameter's value against."""
        schema: dict[str, object] = {"type": [self.type, "null"] if self.nullable else self.type}
        if self.enum is not None:
            schema["enum"] = [*self.enum, None] if self.nullable else list(self.enum)
        for key, value in (("minimum", self.minimum), ("maximum", self.maximum),
                           ("exclusiveMinimum", self.exclusive_minimum), ("format", self.format)):
            if value is not None:
                schema[key] = value
        return schema

    def accepts(self) -> str:
        """What the value may be, in words (the docs table and the parser's messages)."""
        words = {"integer": "integer", "number": "number", "string": "string", "boolean": "true/false"}
        text = ("one of " + ", ".join(str(v) for v in self.enum) if self.enum is not None
                else words[self.type])
        if self.format:
            text += f" ({'YYYY-MM-DD' if self.format == 'date' else self.format})"
        bounds = []
        if self.exclusive_minimum is not None:
            bounds.append(f"> {_num(self.exclusive_minimum)}")
        if self.minimum is not None:
            bounds.append(f">= {_num(self.minimum)}")
        if self.maximum is not None:
            bounds.append(f"<= {_num(self.maximum)}")
        if bounds:
            text += " " + ", ".join(bounds)
        if self.nullable:
            text += ", or null"
        return text


JSON_TYPES = frozenset({"integer", "number", "string", "boolean"})


def _num(value: float) -> str:
    return f"{value:g}"


def integer(name: str, default: int | None, description: str, *, minimum: int | None = None,
         maximum: int | None = None) -> ParamSpec:
    return ParamSpec(name, "integer", default, description, minimum=minimum, maximum=maximum)


def number(name: str, default: float | None, description: str, *, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None) -> ParamSpec:
    return ParamSpec(name, "number", default, description, minimum=minimum, maximum=maximum,
                     exclusive_minimum=above)

_INT = re.compile(r"[+-]?\d+")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _bad(owner: str, spec: ParamSpec, value: Any, why: str = "") -> ParameterError:
    # Worded like Airflow's own "Invalid input for param epochs: ...".
    what = f"{owner} param {spec.name}" if owner else f"param {spec.name}"
    why = why or f": must be {spec.accepts()}"
    return ParameterError(f"{what} {value!r}{why}", field=spec.name)


def check(spec: ParamSpec, value: Any, owner: str = "") -> Any:
    """``value`` cast to the spec's type and checked against its enum, bounds and format."""
    if value is None:
        if spec.nullable:
            return None
        raise _bad(owner, spec, value)
    typed = _typed(spec, value)
    if typed is _INVALID:
        raise _bad(owner, spec, value)
    if spec.enum is not None and typed not in spec.enum:
        raise _bad(owner, spec, value)
    if spec.minimum is not None and typed < spec.minimum:
        raise _bad(owner, spec, value)
    if spec.exclusive_minimum is not None and typed <= spec.exclusive_minimum:
        raise _bad(owner, spec, value)
    if spec.maximum is not None and typed > spec.maximum:
        raise _bad(owner, spec, value)
    if spec.format == "date":
        try:
            if not _DATE.fullmatch(typed):
                raise ValueError
            date.fromisoformat(typed)
        except ValueError:
            raise _bad(owner, spec, value, " is not YYYY-MM-DD (a calendar date)") from None
    return typed


_INVALID = object()


def _typed(spec: ParamSpec, value: Any) -> Any:
    """The value as the spec's Python type, or ``_INVALID``; never a silent conversion that
    changes the value (3.5 -> 3, True -> 1, "x" -> default)."""
    if spec.type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return _INVALID
    if spec.type == "string":
        return value if isinstance(value, str) else _INVALID
    if isinstance(value, bool):  # bool is an int subclass; True is not 1 epoch
        return _INVALID
    if isinstance(value, str):
        text = value.strip()
        if spec.type == "integer":
            return int(text) if _INT.fullmatch(text) else _INVALID
        try:
            value = float(text)
        except ValueError:
            return _INVALID
    if not isinstance(value, int | float) or not math.isfinite(value):
        return _INVALID
    if spec.type == "integer":
        # JSON (and so Airflow's schema check) counts 3.0 as an integer; 3.5 is not.
        return int(value) if isinstance(value, int) or value.is_integer() else _INVALID
    return float(value)


def parse(specs: Iterable[ParamSpec], values: Mapping[str, Any] | None, owner: str) -> dict[str, Any]:
    """The given ``values`` typed and checked; a key that is no parameter is an error (never
    ignored: a typo such as ``epoch`` would otherwise train with the default)."""
    by_name = {spec.name: spec for spec in specs}
    values = dict(values or {})
    if unknown := sorted(set(values) - set(by_name)):
        raise ParameterError(f"unknown {owner} params {unknown}; known: {', '.join(by_name)}",
                             field=unknown[0])
    return {name: check(by_name[name], value, owner) for name, value in values.items()}


def build(cls: type[T], specs: Iterable[ParamSpec], values: Mapping[str, Any] | None, owner: str,
          **fixed: Any) -> T:
    """The dataclass ``cls`` from the run's ``values`` (checked by :func:`parse`); fields not given
    keep the dataclass's defaults, parameters that are not fields of ``cls`` (the tick workflow's
    ``trade_date``) are checked and left out. ``fixed`` are fields the caller sets (the data set)."""
    parsed = parse(specs, values, owner)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**fixed, **{k: v for k, v in parsed.items() if k in fields})
    except (TypeError, ValueError) as exc:  # the dataclass's own cross-field checks
        raise ParameterError(f"{owner}: {exc}") from None
