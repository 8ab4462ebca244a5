"""Which failures are worth a retry.

Bad input data or an untrainable data set fail the same way on every try: retrying only delays
the alert. Inside a task, ``permanent_errors_fail_fast()`` turns those into Airflow's
``AirflowFailException`` (fail now, no retries, callbacks still fire) and leaves everything else
(network, a killed worker, a busy server) to the task's retries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from scripts.core.errors import DataValidationError, ParameterError, TrainingError

PERMANENT = (DataValidationError, ParameterError, TrainingError)


@contextlib.contextmanager
def permanent_errors_fail_fast() -> Iterator[None]:
    try:
        yield
    except PERMANENT as exc:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
