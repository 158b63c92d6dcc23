#!/bin/sh
# The replication role walvault connects as, and its pg_hba.conf lines.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<'SQL'
CREATE ROLE walvault WITH LOGIN REPLICATION PASSWORD 'walvault';
GRANT EXECUTE ON FUNCTION pg_switch_wal() TO walvault;
SQL
echo "host replication walvault all scram-sha-256" >> "$PGDATA/pg_hba.conf"
