#!/bin/bash
# Runs once when the primary's data directory is created (postgres image's initdb hook):
# the application role and database, a table for the CDC rule, and replication access
# for the replica.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
CREATE ROLE app LOGIN PASSWORD 'secret';
CREATE DATABASE app OWNER app;
SQL

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname app <<'SQL'
CREATE TABLE users (
    id serial PRIMARY KEY,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE users OWNER TO app;
INSERT INTO users (name) VALUES ('ada'), ('grace');
SQL

echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
