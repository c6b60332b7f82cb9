#!/usr/bin/env bash
# End-to-end reservation benchmark of ticket-api on this machine.
#
# Builds the release binaries, starts `ticket-api` on a random loopback port with a fresh
# database and data folder, creates an admin, runs `loadgen reserve` with 64 and then 256
# WebSocket connections, prints the results and the writer's average batch size, then stops
# the server (SIGTERM) and removes everything it created.
#
# Environment:
#   BACKEND       postgres (default) or sqlite (the embedded SQLite file in the data folder)
#   DATABASE_URL  use this database as is (not created, not dropped); overrides BACKEND
#   PGHOST PGPORT PGUSER   where the PostgreSQL database is created (127.0.0.1, 5432, postgres)
#   DURATION      length of each run (default 10s)
#   CONNECTIONS   the runs, as a space-separated list (default "64 256")
#   MAX_REQUESTS  bound on calls per run (default 1000000)
#   RESULTS       file to append each run's JSON line to (default: none)
set -euo pipefail

cd "$(dirname "$0")/.."

BACKEND=${BACKEND:-postgres}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64 256}
MAX_REQUESTS=${MAX_REQUESTS:-1000000}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
ADMIN_EMAIL=bench-admin@loadgen.invalid
ADMIN_PASSWORD=bench-admin-password

log() { echo "bench: $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

case "$PGHOST" in
127.* | localhost | ::1) ;;
*)
	log "PGHOST=$PGHOST is not a loopback address"
	exit 2
	;;
esac

log "building (cargo build --release --workspace)…"
cargo build --release --workspace
SERVER=target/release/ticket-api
LOADGEN=target/release/loadgen

DATA_DIR=$(mktemp -d -t ticket-api-bench.XXXXXX)
SERVER_PID=
CREATED_DB=
STATUS=0

cleanup() {
	local code=$?
	stop_server
	if [[ $code -ne 0 && -f $DATA_DIR/server.log ]]; then
		log "last lines of the server log:"
		tail -n 20 "$DATA_DIR/server.log" >&2 || true
	fi
	if [[ -n $CREATED_DB ]]; then
		log "dropping database $CREATED_DB"
		psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -q -v ON_ERROR_STOP=1 \
			-c "DROP DATABASE IF EXISTS $CREATED_DB WITH (FORCE)" >/dev/null || true
	fi
	rm -rf "$DATA_DIR"
	exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

DB_ARGS=()
if [[ -n ${DATABASE_URL:-} ]]; then
	DB_ARGS=(--database-url "$DATABASE_URL")
	BACKEND_LABEL="given DATABASE_URL"
elif [[ $BACKEND == sqlite ]]; then
	BACKEND_LABEL="embedded SQLite"
elif [[ $BACKEND == postgres ]]; then
	CREATED_DB=ticket_api_bench_$$
	log "creating database $CREATED_DB on $PGHOST:$PGPORT"
	psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -q -v ON_ERROR_STOP=1 \
		-c "CREATE DATABASE $CREATED_DB" >/dev/null
	DB_ARGS=(--database-url "postgres://$PGUSER@$PGHOST:$PGPORT/$CREATED_DB")
	BACKEND_LABEL="PostgreSQL ($CREATED_DB)"
else
	log "BACKEND must be postgres or sqlite, not $BACKEND"
	exit 2
fi
# Not inherited by the server: only the flags above choose its database.
unset DATABASE_URL

PORT=$(random_port)
URL=http://127.0.0.1:$PORT
JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
COMMON=(--data-dir "$DATA_DIR" --jwt-secret "$JWT_SECRET" "${DB_ARGS[@]}")

log "creating the admin account"
"$SERVER" user add --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD" --admin "${COMMON[@]}" >&2

log "starting ticket-api on $URL ($BACKEND_LABEL), log in $DATA_DIR/server.log"
RUST_LOG=${RUST_LOG:-warn} "$SERVER" serve --listen "127.0.0.1:$PORT" "${COMMON[@]}" \
	--rate-limit 1000000 --rate-burst 1000000 --max-connections 10000 \
	--auth-rate-limit 1000000 --auth-rate-burst 1000000 --max-connections-per-address 1000000 \
	>"$DATA_DIR/server.log" 2>&1 &
SERVER_PID=$!

for i in $(seq 1 300); do
	if curl -fsS --max-time 2 "$URL/health" >/dev/null 2>&1; then
		break
	fi
	if ! kill -0 "$SERVER_PID" 2>/dev/null; then
		log "the server exited during start"
		exit 1
	fi
	if [[ $i -eq 300 ]]; then
		log "no healthy answer from $URL/health within 30 s"
		exit 1
	fi
	sleep 0.1
done
log "server healthy"

# `ticket_api_writer_batch_size_sum` and `_count` from /metrics, as "SUM COUNT".
writer_batches() {
	{ curl -fsS --max-time 5 "$URL/metrics" || true; } | awk '
		$1 == "ticket_api_writer_batch_size_sum" { s = $2 }
		$1 == "ticket_api_writer_batch_size_count" { c = $2 }
		END { print (s == "" ? 0 : s), (c == "" ? 0 : c) }'
}

# Average batch size between two "SUM COUNT" scrapes.
average_batch() {
	awk -v a="$1" -v b="$2" 'BEGIN {
		split(a, x, " "); split(b, y, " ")
		d = y[2] - x[2]
		if (d > 0) printf "%.1f changes per transaction (%d transactions, %d changes)", (y[1] - x[1]) / d, d, y[1] - x[1]
		else printf "no transactions"
	}'
}

JSON_LINES=()
echo
echo "== ticket-api reservation benchmark: $BACKEND_LABEL, $DURATION per run, $(nproc) CPUs =="
for connections in $CONNECTIONS; do
	echo
	echo "-- $connections connections --"
	set +e
	output=$("$LOADGEN" reserve --url "$URL" --connections "$connections" --duration "$DURATION" \
		--max-requests "$MAX_REQUESTS" --admin-email "$ADMIN_EMAIL" --admin-password "$ADMIN_PASSWORD" \
		--json)
	code=$?
	set -e
	# Everything but the JSON line is the human summary.
	printf '%s\n' "$output" | grep -v '^{' || true
	json=$(printf '%s\n' "$output" | grep '^{' | tail -n 1 || true)
	if [[ -n $json ]]; then
		JSON_LINES+=("$json")
		if [[ -n ${RESULTS:-} ]]; then
			printf '%s\n' "$json" >>"$RESULTS"
		fi
	fi
	if [[ $code -ne 0 ]]; then
		log "loadgen reserve with $connections connections failed (exit $code)"
		STATUS=1
	fi
done

echo
echo "== writer batch size over the whole server run (GET /metrics): $(average_batch "0 0" "$(writer_batches)") =="
if command -v jq >/dev/null && [[ ${#JSON_LINES[@]} -gt 0 ]]; then
	echo
	printf '%-12s %10s %10s %8s %8s %8s %8s %s\n' connections ok "res/s" "p50 ms" "p90 ms" "p99 ms" "max ms" consistency
	for json in "${JSON_LINES[@]}"; do
		jq -r '[.connections, .ok, (.reservations_per_s | floor), .latency_ok_ms.p50_ms,
			.latency_ok_ms.p90_ms, .latency_ok_ms.p99_ms, .latency_ok_ms.max_ms,
			(if .consistency == null then "unchecked" elif .consistency.ok then "ok" else "MISMATCH" end)]
			| @tsv' <<<"$json" |
			awk -F'\t' '{ printf "%-12s %10s %10s %8.2f %8.2f %8.2f %8.2f %s\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
	done
fi
exit "$STATUS"
