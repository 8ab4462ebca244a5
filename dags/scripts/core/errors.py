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
    """A run parameter is unknown, has the wrong type or is out of bounds; ``field`` names it.

    Raised by ``scripts.core.params`` (the one parser of run parameters) before a run does any work.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)
