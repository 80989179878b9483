#!/bin/sh
# A streaming replica of the `primary` service: cloned with pg_basebackup on first start
# (-R writes the standby settings; -c fast avoids waiting for a checkpoint), then run as
# a hot standby.
set -eu

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready -h primary -p 5432 -U postgres >/dev/null 2>&1; do
        sleep 1
    done
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    gosu postgres env PGPASSWORD="$POSTGRES_PASSWORD" \
        pg_basebackup -h primary -p 5432 -U postgres -D "$PGDATA" -R -X stream -c fast
fi

exec gosu postgres postgres -c hot_standby=on
