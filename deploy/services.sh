#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ run on this machine, installing them when missing:
# with `docker compose` where a Docker engine runs, else from the distribution's packages
# (Debian/Ubuntu). Safe to run when both already run. Writes the URLs that work to
# .flotilla/env, which the demo and the test command read.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .flotilla

log() { printf '\033[1m[services]\033[0m %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 1
  done
  log "$what did not open port $port within 2 minutes"
  return 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

docker_engine() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

ensure_postgres() {
  if port_open 5432; then return 0; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1 && docker_engine; then
    log "starting Postgres with docker compose"
    docker compose -f deploy/compose.yaml up -d postgres
  else
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
      log "installing PostgreSQL from the distribution's packages"
      apt_install postgresql postgresql-client
    fi
    log "starting PostgreSQL"
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  wait_port 5432 PostgreSQL
}

ensure_rabbitmq() {
  if port_open 5672; then return 0; fi
  if ! command -v rabbitmq-server >/dev/null 2>&1 && docker_engine; then
    log "starting RabbitMQ with docker compose"
    docker compose -f deploy/compose.yaml up -d rabbitmq
  else
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
      log "installing RabbitMQ from the distribution's packages"
      apt_install rabbitmq-server
    fi
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached || true
  fi
  wait_port 5672 RabbitMQ
  # The port opens before the broker accepts connections; wait for the application itself.
  if command -v rabbitmqctl >/dev/null 2>&1; then
    as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
  fi
}

# A Postgres login that can create databases: the `postgres` user where the server trusts local
# TCP connections (as on CI machines and the compose file), else a `flotilla` role with a
# password, created through the server's local socket.
postgres_base_url() {
  local trusted=postgres://postgres@127.0.0.1:5432
  if command -v psql >/dev/null 2>&1; then
    if psql "$trusted/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1; then
      echo "$trusted"
      return
    fi
    local own=postgres://flotilla:flotilla@127.0.0.1:5432
    if ! psql "$own/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1; then
      log "creating the Postgres role flotilla (password flotilla, may create databases)"
      as_root su postgres -c "psql -qc \"CREATE ROLE flotilla LOGIN PASSWORD 'flotilla' CREATEDB\"" >/dev/null
    fi
    echo "$own"
  else
    echo "$trusted"
  fi
}

ensure_postgres
ensure_rabbitmq
base=$(postgres_base_url)
cat > .flotilla/env <<ENV
export FLOTILLA_TEST_POSTGRES=$base
export DATABASE_URL=\${DATABASE_URL:-$base/flotilla}
export AMQP_URL=\${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
ENV
log "PostgreSQL and RabbitMQ are running"
