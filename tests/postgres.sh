#!/usr/bin/env bash
# Start the machine's PostgreSQL cluster (Debian's postgresql package) and make sure the test
# role and database exist; print the SQLAlchemy URL the server tests use. Idempotent. Exits
# non-zero, printing nothing on standard output, when PostgreSQL cannot be started.
set -euo pipefail
version=$(pg_lsclusters -h | awk 'NR==1 {print $1}')
if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_createcluster "$version" main >/dev/null
fi
pg_ctlcluster "$version" main start >/dev/null 2>&1 || pg_ctlcluster "$version" main status >/dev/null
as_postgres() { su postgres -c "psql -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
ready=no
for _ in $(seq 30); do as_postgres "SELECT 1" >/dev/null 2>&1 && { ready=yes; break; }; sleep 1; done
if [ "$ready" != yes ]; then
    echo "tests/postgres.sh: PostgreSQL $version did not answer within 30 s" >&2
    exit 1
fi
if [ "$(as_postgres "SELECT 1 FROM pg_roles WHERE rolname='fleet'")" != "1" ]; then
    as_postgres "CREATE ROLE fleet LOGIN PASSWORD 'fleet' CREATEDB"
fi
if [ "$(as_postgres "SELECT 1 FROM pg_database WHERE datname='fleet_test'")" != "1" ]; then
    as_postgres "CREATE DATABASE fleet_test OWNER fleet"
fi
echo "postgresql+psycopg2://fleet:fleet@127.0.0.1:5432/fleet_test"
