"""One exception type per failure kind; every message names the file, line or field at fault."""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""


class DataSourceError(PipelineError):
    """The official file could neither be read from the mirror nor downloaded."""


class DataValidationError(PipelineError):
    """Input data broke the contract. ``where`` names the file and, if known, line and field."""

    def __init__(self, path: str | Path, problem: str, *, line: int | None = None,
                 field: str | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


class TrainingError(PipelineError):
    """Training could not produce a usable model."""


class ParameterError(PipelineError, ValueError):
    """A run parameter is unknown or has the wrong type."""


def with_overrides(defaults, overrides, owner: str, also_known: frozenset[str] = frozenset()):
    """``defaults`` (a dataclass) with the run's ``overrides`` applied, each cast to the default's
    type. An unknown key (outside the dataclass and ``also_known``) or a bad value is a
    :class:`ParameterError` naming ``owner``, never silently ignored."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(defaults)}
    overrides = {k: v for k, v in dict(overrides or {}).items() if k not in also_known}
    if unknown := set(overrides) - known:
        raise ParameterError(f"unknown {owner} params {sorted(unknown)}; known: {sorted(known | also_known)}")
    try:
        typed = {k: type(getattr(defaults, k))(v) for k, v in overrides.items()}
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"{owner} params {overrides}: {exc}") from None
    return dataclasses.replace(defaults, **typed)
