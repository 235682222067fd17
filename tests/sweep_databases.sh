#!/usr/bin/env bash
# Drops the databases earlier test and bench runs left behind: named `flotilla_test_…`,
# `flotilla_store_…` or `flotilla_bench_…`, with nobody connected. A test drops its database when
# it passes; one that fails (or is killed) keeps it, and on a long-lived server they pile up.
# Run before the suite. Needs psql (skipped without it).
set -euo pipefail

log() { printf '\033[1m[databases]\033[0m %s\n' "$1" >&2; }

if ! command -v psql >/dev/null; then
  log "no psql here; databases left by earlier test runs are not swept"
  exit 0
fi
admin="${FLOTILLA_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432}/postgres"
left=$(psql "$admin" -Atc "
  SELECT datname FROM pg_database d
  WHERE datname ~ '^flotilla_(test|store|bench)_[0-9a-f]+$'
    AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)")
dropped=0
for db in $left; do
  # Someone may connect in between (another suite on the same server): then it stays.
  if psql "$admin" -qc "DROP DATABASE IF EXISTS \"$db\"" 2>/dev/null; then
    dropped=$((dropped + 1))
  fi
done
log "dropped $dropped databases that earlier test runs left behind"
