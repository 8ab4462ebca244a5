"""The governance tail every workflow ends with (docs/operations.md, "Approving a model").

After ``register``, a challenger that passed the automatic gate waits in ``approve`` for a person's
Approve/Reject in the Airflow UI (Airflow 3's human-in-the-loop operator: the form shows the
challenger's and the champion's scores that ``register`` wrote into ``approval_body``); no answer
within the workflow's ``approval_timeout`` is a Reject. ``promote`` applies the answer through the
registry's compare-and-set gate and writes decision, reason and who decided on the model version.
A run with ``auto_promote`` (``register`` promoted already) or a challenger that failed the gate
skips all three (``awaits_approval`` short-circuits).

The DAG files import this module when they are parsed: it holds only Airflow's task SDK, the
standard provider's HITL operator and this package's light modules. The registry (MLflow) is
imported inside the tasks.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import AssetAlias, Param, task, task_group

from common import alerts, config

if TYPE_CHECKING:
    from airflow.sdk.definitions.xcom_arg import XComArg

    from common.config import WorkflowConfig

# The task whose XCom (the registry's decision) the approval step reads; every DAG names it so.
REGISTER_TASK_ID = "register"
APPROVE, REJECT = "Approve", "Reject"  # the registry's own spelling (registry.APPROVE/REJECT)


def champion_events(cfg: WorkflowConfig) -> AssetAlias:
    """The outlet through which a task announces a new champion of ``cfg.model_name``: an event of
    the model's Asset is added to it only when the champion really moved
    (``registry.model_alias_name``; tests/test_registry_approval.py checks the two agree)."""
    return AssetAlias(f"{cfg.model_name}_champion_events")


def _pull(key: str) -> str:
    return f"{{{{ ti.xcom_pull(task_ids='{REGISTER_TASK_ID}')['{key}'] }}}}"


def approval_operator(subject: str, body: str, response_timeout: timedelta,
                      task_id: str = "approve") -> HITLOperator:
    """The form a person answers: Approve/Reject with a reason; no answer within
    ``response_timeout`` is a Reject. Every workflow's approval step is this operator
    (tests/e2e/approval_dags.py runs the same one in its race and timeout checks)."""
    return HITLOperator(
        task_id=task_id,
        subject=subject,
        body=body,
        options=[APPROVE, REJECT],
        defaults=[REJECT],  # no answer within the timeout is a rejection
        params={"reason": Param("", type="string", title="Reason",
                                description="Why (written on the model version with your name)")},
        response_timeout=response_timeout,
        notifiers=alerts.notifiers(),  # tells people a decision waits (links to the form)
    )


# prefix_group_id=False: the task ids stay `awaits_approval`, `approve` and `promote`, so the
# UI's form URL, the REST API calls and the docs name them the same in every workflow.
@task_group(group_id="approval", prefix_group_id=False)
def approval_step(cfg: WorkflowConfig, decision: XComArg) -> None:
    """``awaits_approval >> approve``, then ``promote(decision, approve's answer)``: wire it after
    the DAG's ``register`` task, whose XCom is ``decision``."""

    @task.short_circuit
    def awaits_approval(decision: dict) -> bool:
        """True only when register left the challenger waiting for approval (no auto_promote)."""
        return decision["decision"] == "pending_approval"

    approve = approval_operator(
        subject=f"Promote {cfg.model_name} v{_pull('version')} to champion?",
        body=_pull("approval_body"),
        response_timeout=cfg.approval_response_timeout(),
    )

    # One slot shared by every workflow (as register): promotions never race.
    @task(pool=config.REGISTRY_POOL.name, outlets=[champion_events(cfg)])
    def promote(decision: dict, answer: dict | None, **context: Any) -> dict:
        """Approve: promote through the gate (champion still the one compared with). Reject or no
        answer: champion unchanged. Decision, reason and who decided go on the model version."""
        from common import registry

        result = registry.resolve_approval(cfg.model_name, decision["version"], answer).to_dict()
        event = registry.champion_event(cfg.model_name, result)
        registry.announce_champion(context, cfg.model_name, event)
        return {**result, "champion_event": event}

    awaits_approval(decision) >> approve
    promote(decision, approve.output)
