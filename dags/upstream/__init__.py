"""Airflow tasks for the user's own upstream DAGs, the pipelines that feed this repository's
workflows (not DAGs of this repository; listed in ``dags/.airflowignore``)."""
