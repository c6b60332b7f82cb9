#!/usr/bin/env bash
# The durable reserve path against its baselines, side by side, in one run on this machine.
#
# Phases (each in its own window; the server is started afresh where memory is measured):
#   b-hot-64, b-spread-64  the database-bound way: pgbench, 64 clients, one PostgreSQL
#                          transaction per reservation (UPDATE … available - 1; INSERT), on a
#                          schema of its own in a fresh database (dropped at exit); one hot row,
#                          then 1,000 rows. Run before the server starts, so nothing competes.
#   c-echo-64              a plain axum WebSocket echo (`loadgen echo-server`), driven by the
#                          reserve loop with the reserve frames (`loadgen echo`).
#   a-hot-N                `loadgen reserve`, durable on PostgreSQL, one hot ticket type,
#                          closed loop, for each N of CONNECTIONS.
#   a-open-64              the same at a fixed arrival rate (OPEN_FRACTION of a-hot-64's rate),
#                          latency from the intended send (no coordinated omission).
#   a-spread-64            reserve spread over SPREAD_TYPES ticket types.
#   sqlite-hot-64          reserve on the embedded SQLite file (fresh server).
#   logins                 LOGINS concurrent `auth.login` (fresh server): RSS before, peak,
#                          5 s after; logins/s.
#   pending                PENDING reservations left pending (fresh server): RSS after − before,
#                          ÷ count.
# CPU per operation over each window comes from /proc/<pid>/stat: the server, PostgreSQL (the
# postmaster and all its backends), Redis (with REDIS=1), the load generator (and pgbench).
# Every reserve and pgbench phase checks afterwards that nothing was oversold. At the end it
# prints the table and the ratios a/b, a/c and the spread ratio, and appends a dated row to
# RESULTS_MD. The machine is shared: other processes' load shows in the figures.
#
# Environment:
#   QUICK=1          every phase for a few seconds with small counts (checks the script end to
#                    end in a few minutes); sets the defaults marked [quick] below
#   DURATION         length of each load window (default 10s [quick 3s])
#   CONNECTIONS      the hot PostgreSQL closed-loop runs (default "64 256 1024" [quick "64 256"])
#   OPEN_FRACTION    open-model rate as a fraction of a-hot-64's closed-loop rate (default 0.6)
#   SPREAD_TYPES     ticket types (server) and rows (pgbench) of the spread case (default 1000)
#   LOGINS           concurrent logins (default 1000 [quick 100])
#   PENDING          pending reservations for the memory figure (default 1000000 [quick 20000])
#   PENDING_MAX_DURATION  bound on that phase (default 600s [quick 60s])
#   PENDING_BACKEND  postgres (default) or sqlite
#   PHASES           the phases to run, space-separated, from: b c a open spread sqlite logins
#                    pending (default: all)
#   BACKEND=sqlite   the same as PHASES=sqlite (what this knob meant to earlier versions)
#   REDIS=1          the server uses Redis expiry at REDIS_URL (default redis://127.0.0.1:6379)
#                    with a key prefix of its own, deleted at exit; Redis CPU is then reported
#   PGHOST PGPORT PGUSER  the PostgreSQL instance (127.0.0.1, 5432, postgres; loopback only)
#   PGBENCH          the pgbench binary (default: on PATH, else /usr/lib/postgresql/*/bin)
#   RESULTS_MD       file the dated row is appended to (default loadtest/RESULTS.md; empty: none)
#   JSONL            also keep every phase's JSON line in this file
#   NO_BUILD=1       use target/release as it is (no cargo build)
#   RUST_LOG         the server's log filter (default warn)
#   WRITER_CONNECTIONS  the server's writer connections (`--writer-connections`, default 1)
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ ${QUICK:-0} == 1 ]]; then
	MODE=QUICK
	DURATION=${DURATION:-3s}
	CONNECTIONS=${CONNECTIONS:-64 256}
	LOGINS=${LOGINS:-100}
	PENDING=${PENDING:-20000}
	PENDING_MAX_DURATION=${PENDING_MAX_DURATION:-60s}
else
	MODE=full
	DURATION=${DURATION:-10s}
	CONNECTIONS=${CONNECTIONS:-64 256 1024}
	LOGINS=${LOGINS:-1000}
	PENDING=${PENDING:-1000000}
	PENDING_MAX_DURATION=${PENDING_MAX_DURATION:-600s}
fi
OPEN_FRACTION=${OPEN_FRACTION:-0.6}
SPREAD_TYPES=${SPREAD_TYPES:-1000}
PENDING_BACKEND=${PENDING_BACKEND:-postgres}
if [[ ${BACKEND:-} == sqlite ]]; then
	PHASES=${PHASES:-sqlite}
fi
PHASES=${PHASES:-b c a open spread sqlite logins pending}
REDIS=${REDIS:-0}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
RESULTS_MD=${RESULTS_MD-loadtest/RESULTS.md}
ADMIN_EMAIL=bench-admin@loadgen.invalid
ADMIN_PASSWORD=bench-admin-password
# The window's length in whole seconds, for pgbench.
DURATION_S=$(awk -v d="$DURATION" 'BEGIN { n = d + 0; if (d ~ /ms$/) n = 1; else if (d ~ /m$/) n *= 60; print (n < 1 ? 1 : n) }')

log() { echo "bench: $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

require_loopback_services
# The servers get their database and Redis from the flags below only, never from the
# caller's environment (which could point them at a database that is not loopback, or not ours).
unset DATABASE_URL "${!TICKET_API_@}"
export -n REDIS_URL
for tool in curl jq psql; do
	command -v "$tool" >/dev/null || {
		log "needs $tool on PATH"
		exit 2
	}
done
wants() { [[ " $PHASES " == *" $1 "* ]]; }

if [[ ${NO_BUILD:-0} != 1 ]]; then
	log "building (cargo build --release --workspace)…"
	cargo build --release --workspace
fi
SERVER=target/release/ticket-api
LOADGEN=target/release/loadgen
PGBENCH=${PGBENCH:-$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | tail -n 1 || true)}

WORK=$(mktemp -d -t ticket-api-bench.XXXXXX)
JSON_OUT=$WORK/phases.jsonl
: >"$JSON_OUT"
SERVER_PID=
SERVER_BACKEND=
ECHO_PID=
DATA_DIR=
STATUS=0
SERVER_DB=ticket_api_bench_$$
PGBENCH_DB=ticket_api_pgbench_$$
REDIS_PREFIX=ticket-api-bench-$$:
CREATED_DBS=()

psql_admin() { psql -X -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -q -v ON_ERROR_STOP=1 "$@"; }

cleanup() {
	local code=$?
	stop_server
	if [[ -n $ECHO_PID ]]; then
		kill -TERM "$ECHO_PID" 2>/dev/null || true
		wait "$ECHO_PID" 2>/dev/null || true
	fi
	if [[ $code -ne 0 && -n $DATA_DIR && -f $DATA_DIR/server.log ]]; then
		log "last lines of the server log:"
		tail -n 20 "$DATA_DIR/server.log" >&2 || true
	fi
	for db in "${CREATED_DBS[@]}"; do
		[[ -n $db ]] || continue
		log "dropping database $db"
		psql_admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
	done
	if [[ $REDIS == 1 ]] && command -v redis-cli >/dev/null; then
		redis-cli -u "$REDIS_URL" --scan --pattern "${REDIS_PREFIX}*" 2>/dev/null |
			xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
	fi
	if [[ -n ${JSONL:-} ]]; then
		cp "$JSON_OUT" "$JSONL" || true
	fi
	rm -rf "$WORK"
	exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The postmaster: its data folder's postmaster.pid, else the oldest process named postgres.
POSTMASTER_PID=
if pg_data=$(psql -X -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -tAc 'SHOW data_directory' 2>/dev/null) &&
	[[ -r $pg_data/postmaster.pid ]]; then
	POSTMASTER_PID=$(head -n 1 "$pg_data/postmaster.pid")
fi
if [[ -z $POSTMASTER_PID ]]; then
	POSTMASTER_PID=$(pgrep -o -x postgres || pgrep -o -x postmaster || true)
fi
if [[ -n $POSTMASTER_PID ]]; then
	log "PostgreSQL postmaster: pid $POSTMASTER_PID (its tree is measured)"
else
	log "PostgreSQL's processes are not visible here: no PostgreSQL CPU figures"
fi
REDIS_PID=
if [[ $REDIS == 1 ]]; then
	REDIS_PID=$(pgrep -o -x redis-server || true)
fi

# --cpu flags for the load generator: server (when given a pid), PostgreSQL, Redis, itself.
cpu_flags() {
	local flags=(--cpu loadgen=self)
	[[ -n ${1:-} ]] && flags+=(--cpu "server=$1")
	[[ -n $POSTMASTER_PID ]] && flags+=(--cpu "postgres=tree:$POSTMASTER_PID")
	[[ -n $REDIS_PID ]] && flags+=(--cpu "redis=$REDIS_PID")
	printf '%s\n' "${flags[@]}"
}


# The rate a phase reached, from its JSON line.
phase_rate() {
	jq -r --arg p "$1" 'select(.phase == $p) | .reservations_per_s' "$JSON_OUT" | tail -n 1
}

wait_listening() {
	local url=$1 pid=$2
	for i in $(seq 1 300); do
		if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true) != 000 ]]; then
			return 0
		fi
		if ! kill -0 "$pid" 2>/dev/null; then
			log "the process exited during start"
			return 1
		fi
		[[ $i -eq 300 ]] && break
		sleep 0.1
	done
	log "nothing listening at $url within 30 s"
	return 1
}

# Starts a fresh server on a fresh database: `start_server postgres|sqlite`. A server loads
# the pending reservations it finds at start, so reusing a database would carry an earlier
# phase's reservations (and their memory) into the next one.
SERVERS_STARTED=0
start_server() {
	local backend=$1 db_args=()
	DATA_DIR=$(mktemp -d -p "$WORK" server.XXXXXX)
	SERVERS_STARTED=$((SERVERS_STARTED + 1))
	if [[ $backend == postgres ]]; then
		local db=${SERVER_DB}_$SERVERS_STARTED
		psql_admin -c "CREATE DATABASE $db" >/dev/null
		CREATED_DBS+=("$db")
		db_args=(--database-url "postgres://$PGUSER@$PGHOST:$PGPORT/$db")
	fi
	if [[ $REDIS == 1 ]]; then
		db_args+=(--redis-url "$REDIS_URL" --redis-prefix "$REDIS_PREFIX")
	fi
	PORT=$(random_port)
	URL=http://127.0.0.1:$PORT
	local common=(--data-dir "$DATA_DIR" --jwt-secret "$JWT_SECRET" "${db_args[@]}")
	"$SERVER" user add --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD" --admin "${common[@]}" >/dev/null
	RUST_LOG=${RUST_LOG:-warn} "$SERVER" serve --listen "127.0.0.1:$PORT" "${common[@]}" \
		--rate-limit 1000000 --rate-burst 1000000 --max-connections 10000 \
		--auth-rate-limit 1000000 --auth-rate-burst 1000000 --max-connections-per-address 1000000 \
		--reservation-ttl 1h --writer-connections "${WRITER_CONNECTIONS:-1}" \
		>"$DATA_DIR/server.log" 2>&1 &
	SERVER_PID=$!
	SERVER_BACKEND=$backend
	wait_listening "$URL/health" "$SERVER_PID"
	log "ticket-api ($backend) on $URL, pid $SERVER_PID"
}
# Stops the server and drops the database it was given (if PostgreSQL).
stop_server_and_db() {
	stop_server
	if [[ $SERVER_BACKEND == postgres ]]; then
		local db=${SERVER_DB}_$SERVERS_STARTED
		psql_admin -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
		CREATED_DBS=("${CREATED_DBS[@]/$db/}")
	fi
}
JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

# `reserve PHASE DURATION [FLAGS…]`: one `loadgen reserve` window against the running server.
reserve() {
	local phase=$1 duration=$2
	shift 2
	local cpu
	mapfile -t cpu < <(cpu_flags "$SERVER_PID")
	run_phase "$phase" "$LOADGEN" reserve --url "$URL" --phase "$phase" --duration "$duration" \
		--admin-email "$ADMIN_EMAIL" --admin-password "$ADMIN_PASSWORD" "${cpu[@]}" --json "$@"
}

echo
echo "== ticket-api benchmark ($MODE): $DURATION windows, $(nproc) CPUs, $(date -u '+%F %T') UTC =="

# (b) before anything of ours runs: pgbench alone with PostgreSQL.
if wants b; then
	if [[ -z $PGBENCH ]]; then
		log "no pgbench found: (b) not measured"
		STATUS=1
	else
		psql_admin -c "CREATE DATABASE $PGBENCH_DB" >/dev/null
		CREATED_DBS+=("$PGBENCH_DB")
		pg_cpu=()
		[[ -n $POSTMASTER_PID ]] && pg_cpu=(--cpu "postgres=tree:$POSTMASTER_PID")
		for rows in 1 "$SPREAD_TYPES"; do
			phase=b-hot-64
			[[ $rows != 1 ]] && phase=b-spread-64
			run_phase "$phase" "$LOADGEN" pgbench --pgbench "$PGBENCH" --host "$PGHOST" --port "$PGPORT" \
				--user "$PGUSER" --dbname "$PGBENCH_DB" --clients 64 --duration "${DURATION_S}s" \
				--rows "$rows" --phase "$phase" "${pg_cpu[@]}" --json
		done
		psql_admin -c "DROP DATABASE IF EXISTS $PGBENCH_DB WITH (FORCE)" >/dev/null
		CREATED_DBS=("${CREATED_DBS[@]/$PGBENCH_DB/}")
	fi
fi

# (c) the transport's ceiling.
if wants c; then
	ECHO_PORT=$(random_port)
	"$LOADGEN" echo-server --listen "127.0.0.1:$ECHO_PORT" --max-lifetime 10m 2>"$WORK/echo.log" &
	ECHO_PID=$!
	if wait_listening "http://127.0.0.1:$ECHO_PORT/ws" "$ECHO_PID"; then
		run_phase c-echo-64 "$LOADGEN" echo --url "http://127.0.0.1:$ECHO_PORT" --connections 64 \
			--duration "$DURATION" --phase c-echo-64 --cpu loadgen=self --cpu "server=$ECHO_PID" --json
	else
		STATUS=1
	fi
	kill -TERM "$ECHO_PID" 2>/dev/null || true
	wait "$ECHO_PID" 2>/dev/null || true
	ECHO_PID=
fi

# (a), the open model and the spread case on one PostgreSQL server.
if wants a || wants open || wants spread; then
	start_server postgres
	if wants a || wants open; then
		for connections in $CONNECTIONS; do
			reserve "a-hot-$connections" "$DURATION" --connections "$connections"
		done
	fi
	if wants open; then
		closed=$(phase_rate a-hot-64)
		if [[ -z $closed || $closed == null ]]; then
			log "no a-hot-64 rate (CONNECTIONS without 64?): open model not run"
		else
			rate=$(awk -v r="$closed" -v f="$OPEN_FRACTION" 'BEGIN { printf "%.0f", r * f }')
			reserve a-open-64 "$DURATION" --connections 64 --rate "$rate/s"
		fi
	fi
	if wants spread; then
		reserve a-spread-64 "$DURATION" --connections 64 --ticket-types "$SPREAD_TYPES" --capacity 1000000
	fi
	echo
	echo "writer batch size over this server's life: $(curl -fsS --max-time 5 "$URL/metrics" | awk '
		$1 == "ticket_api_writer_batch_size_sum" { s = $2 }
		$1 == "ticket_api_writer_batch_size_count" { c = $2 }
		END { if (c > 0) printf "%.1f changes per transaction over %d transactions", s / c, c; else print "no transactions" }')"
	stop_server_and_db
fi

if wants sqlite; then
	start_server sqlite
	reserve sqlite-hot-64 "$DURATION" --connections 64
	stop_server
fi

if wants logins; then
	start_server postgres
	run_phase logins "$LOADGEN" logins --url "$URL" --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD" \
		--count "$LOGINS" --server-pid "$SERVER_PID" --settle 5s --phase logins --json
	stop_server_and_db
fi

if wants pending; then
	start_server "$PENDING_BACKEND"
	# One registration at a time: each Argon2 hash in flight leaves its memory with the
	# allocator of the thread that ran it, which would inflate the "before" figure.
	reserve pending "$PENDING_MAX_DURATION" --connections 64 --max-requests "$PENDING" \
		--capacity "$PENDING" --server-pid "$SERVER_PID" --register-concurrency 1
	stop_server_and_db
fi

echo
echo "== summary ($MODE, $(date -u '+%F %T') UTC, $(nproc) CPUs, shared machine: figures are noisy) =="
"$LOADGEN" summary --input "$JSON_OUT"

if [[ -n $RESULTS_MD ]]; then
	label="$(date -u '+%F %H:%M') $MODE $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
	row=$("$LOADGEN" summary --input "$JSON_OUT" --markdown-row --label "$label")
	heading="## bench.sh runs: the durable reserve path side by side with its baselines"
	if ! grep -qxF "$heading" "$RESULTS_MD" 2>/dev/null; then
		{
			echo
			echo "$heading"
			echo
			echo "\`bash loadtest/bench.sh\` (\`QUICK=1\`: a few seconds per window). One row per run, appended by the script; \"—\" where a phase did not run. The phases and columns are described in \`loadtest/README.md\`."
			echo
			"$LOADGEN" summary --markdown-header
		} >>"$RESULTS_MD"
	fi
	# After the last row of that section's table, wherever the section is in the file.
	awk -v heading="$heading" -v row="$row" '
		$0 == heading { in_section = 1 }
		in_section && /^\|/ { in_table = 1 }
		in_table && !/^\|/ && !done { print row; done = 1; in_section = 0; in_table = 0 }
		{ print }
		END { if (!done) print row }' "$RESULTS_MD" >"$WORK/results.md"
	cp "$WORK/results.md" "$RESULTS_MD"
	log "row appended to $RESULTS_MD"
fi
exit "$STATUS"
