"""Airflow's local-settings hook, not a DAG file (``.airflowignore``): Airflow imports it first in
every command started with ``dags/`` on ``PYTHONPATH``, as the embedded stack, the Celery layout and
the compose images start them. It installs the project's guard for ``airflow dags test``
(``common/airflow_guard.py``: a DAG with a ``DeadlineAlert`` ends a successful test run with a
crash in Airflow 3.3.2). The scheduler and API server get their guards from ``python -m
common.airflow_guard``; nothing else is touched, and every other command imports nothing here.
"""

import sys

if sys.argv[1:3] == ["dags", "test"]:
    from common.airflow_guard import install_dag_test_guard

    install_dag_test_guard()
