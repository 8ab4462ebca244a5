#!/usr/bin/env bash
# The embedded stack: a local MLflow tracking server and Airflow 3 in standalone shape
# (api-server, scheduler, dag-processor, triggerer; LocalExecutor, SQLite), all state under $VTM_HOME (default .local/), listening on 127.0.0.1 only.
#
#   tools/stack.sh up      start MLflow and Airflow (idempotent), import pools, wait until healthy
#   tools/stack.sh down    stop both (by process group) - state stays in $VTM_HOME
#   tools/stack.sh env     print the environment the stack uses (eval "$(tools/stack.sh env)")
#   tools/stack.sh status  what is running
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export VTM_HOME=${VTM_HOME:-$ROOT/.local}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
AIRFLOW_PORT=${AIRFLOW_PORT:-8080}
RUN_DIR=$VTM_HOME/run
LOG_DIR=$VTM_HOME/logs

stack_env() {
  # The venv's bin must be on PATH: `airflow standalone` starts its parts as `airflow ...`.
  export PATH="$VENV/bin:$PATH"
  export AIRFLOW_HOME=$VTM_HOME/airflow
  export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
  export AIRFLOW__CORE__LOAD_EXAMPLES=False
  export AIRFLOW__CORE__EXECUTOR=LocalExecutor
  # SQLite allows one writer: give a CLI write (e.g. `airflow backfill create`) up to 60 s to get
  # the lock while the scheduler works, instead of sqlite3's 5 s ("database is locked").
  export PYTHONPATH=$ROOT/dags${PYTHONPATH:+:$PYTHONPATH}
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=common.config.SQLITE_CONNECT_ARGS
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
  export AIRFLOW__API_AUTH__JWT_SECRET=$(secret jwt_secret)
  export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
  export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
  export NO_COLOR=1
  # Tasks inherit this: an offline mirror of the official data files (absolute: task cwd varies).
  if [[ -n ${DATA_MIRROR:-} ]]; then export DATA_MIRROR=$(realpath "$DATA_MIRROR"); fi
}

secret() {
  # Generated once per $VTM_HOME, never committed, never a default like admin/admin.
  local file=$VTM_HOME/secrets/$1
  if [[ ! -s $file ]]; then
    mkdir -p "$(dirname "$file")" && chmod 700 "$(dirname "$file")"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file")
  fi
  cat "$file"
}

running() { [[ -f $RUN_DIR/$1.pid ]] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

start() {  # name, command...: in its own session so `down` can stop the whole process group
  local name=$1; shift
  if running "$name"; then echo "$name already running"; return; fi
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  setsid "$@" >"$LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/$name.pid"
}

wait_http() {  # url, seconds, name
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      echo "$3 did not answer $1 within $2 s; last log lines:" >&2
      tail -n 30 "$LOG_DIR/$3.log" >&2 || true
      return 1
    fi
    sleep 2
  done
}

up() {
  stack_env
  mkdir -p "$VTM_HOME/mlflow" "$AIRFLOW_HOME"
  start mlflow "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$VTM_HOME/mlflow/mlflow.db" \
    --artifacts-destination "$VTM_HOME/mlflow/artifacts" --serve-artifacts
  # A running Airflow started with another DATA_MIRROR would keep using that one: restart it.
  if running airflow && [[ "$(cat "$RUN_DIR/airflow.mirror" 2>/dev/null)" != "${DATA_MIRROR:-}" ]]; then
    echo "DATA_MIRROR changed: restarting Airflow"
    stop airflow
  fi
  if ! running airflow; then
    airflow db migrate >"$LOG_DIR/airflow-migrate.log" 2>&1 ||
      { tail -n 30 "$LOG_DIR/airflow-migrate.log" >&2; exit 1; }
    python3 "$ROOT/dags/common/config.py" pools >"$VTM_HOME/pools.json"
    airflow pools import "$VTM_HOME/pools.json" >>"$LOG_DIR/airflow-migrate.log" 2>&1
    # The four parts `airflow standalone` runs, started here so that nothing listens beyond
    # 127.0.0.1: standalone's scheduler and triggerer also start log servers bound to every
    # interface, which the embedded stack does not need (all logs are local files).
    start airflow bash -c 'airflow api-server & airflow scheduler --skip-serve-logs &
      airflow dag-processor & airflow triggerer --skip-serve-logs & wait'
    echo "${DATA_MIRROR:-}" >"$RUN_DIR/airflow.mirror"
  fi
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 120 mlflow
  wait_http "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" 240 airflow
  echo "MLflow  http://127.0.0.1:$MLFLOW_PORT"
  echo "Airflow http://127.0.0.1:$AIRFLOW_PORT"
}

stop() {
  local name=$1 pid
  [[ -f $RUN_DIR/$name.pid ]] || return 0
  pid=$(cat "$RUN_DIR/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped $name"
  fi
  rm -f "$RUN_DIR/$name.pid"
}

case ${1:-} in
  up) up ;;
  down) stop airflow; stop mlflow ;;
  env) stack_env; env | grep -E '^(PATH|VTM_[A-Z_]*|AIRFLOW[A-Z_]*|MLFLOW[A-Z_]*|DATA_MIRROR|TICK_LAKE[A-Z_]*|PYTHONPATH)=' | sed 's/^/export /; s/=\(.*\)$/="\1"/' ;;
  status) for n in mlflow airflow; do running $n && echo "$n running" || echo "$n stopped"; done ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
