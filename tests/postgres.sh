#!/usr/bin/env bash
# Start the machine's PostgreSQL cluster (Debian's postgresql package) and make sure the test
# role and database exist; print the SQLAlchemy URL the server tests use. Idempotent.
set -euo pipefail
version=$(pg_lsclusters -h | awk 'NR==1 {print $1}')
if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_createcluster "$version" main >/dev/null
fi
pg_ctlcluster "$version" main start >/dev/null 2>&1 || pg_ctlcluster "$version" main status >/dev/null
as_postgres() { su postgres -c "psql -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
for _ in $(seq 30); do as_postgres "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
if [ "$(as_postgres "SELECT 1 FROM pg_roles WHERE rolname='fleet'")" != "1" ]; then
    as_postgres "CREATE ROLE fleet LOGIN PASSWORD 'fleet' CREATEDB"
fi
if [ "$(as_postgres "SELECT 1 FROM pg_database WHERE datname='fleet_test'")" != "1" ]; then
    as_postgres "CREATE DATABASE fleet_test OWNER fleet"
fi
echo "postgresql+psycopg2://fleet:fleet@127.0.0.1:5432/fleet_test"
