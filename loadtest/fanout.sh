#!/usr/bin/env bash
# Fan-out latency and memory per idle connection of ticket-api on this machine.
#
# Builds the release binaries, then:
# 1. starts `ticket-api` (embedded SQLite, temporary data folder, random loopback port,
#    --max-connections 20000, rate limit out of the way), creates an admin, and runs
#    `loadgen fanout` for each of SUBSCRIBERS (default "1000 10000") with RESERVATIONS
#    reservations at RATE;
# 2. for each idle kind (WebSocket; long-poll sessions without a pending GET; long-poll
#    sessions with one pending GET each) starts a fresh server, reads its VmRSS from
#    /proc/<pid>/status before, and while `loadgen idle` holds IDLE connections or
#    sessions, and prints (RSS during − RSS before) / IDLE in KiB.
# Every server is stopped with SIGTERM and its data folder removed, also on failure.
#
# A fresh server per memory figure: memory freed by an earlier phase would otherwise be
# reused by the allocator and hide part of the cost.
#
# Environment:
#   SUBSCRIBERS   fan-out runs, space-separated (default "1000 10000")
#   RESERVATIONS  reservations per fan-out run (default 200)
#   RATE          their pace (default 20/s)
#   MAX_DURATION  bound on each run's reservation phase (default 25s): with many
#                 subscribers the achieved rate can fall below RATE
#   IDLE          connections / sessions held for the memory figures (default 10000)
#   HOLD          how long loadgen idle holds them (default 5s)
#   RESULTS       file to append each fan-out run's JSON line to (default: none)
set -euo pipefail

cd "$(dirname "$0")/.."

SUBSCRIBERS=${SUBSCRIBERS:-1000 10000}
RESERVATIONS=${RESERVATIONS:-200}
RATE=${RATE:-20/s}
MAX_DURATION=${MAX_DURATION:-25s}
IDLE=${IDLE:-10000}
HOLD=${HOLD:-5s}
MAX_CONNECTIONS=20000
ADMIN_EMAIL=fanout-admin@loadgen.invalid
ADMIN_PASSWORD=fanout-admin-password

log() { echo "fanout: $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

log "building (cargo build --release --workspace)…"
cargo build --release --workspace
SERVER=target/release/ticket-api
LOADGEN=target/release/loadgen

WORK_DIR=$(mktemp -d -t ticket-api-fanout.XXXXXX)
SERVER_PID=
DATA_DIR=
URL=
STATUS=0

cleanup() {
	local code=$?
	stop_server
	if [[ $code -ne 0 && -n $DATA_DIR && -f $DATA_DIR/server.log ]]; then
		log "last lines of the server log:"
		tail -n 20 "$DATA_DIR/server.log" >&2 || true
	fi
	rm -rf "$WORK_DIR"
	exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_server NAME [--with-admin]: a fresh server with its own data folder.
start_server() {
	local name=$1
	DATA_DIR=$WORK_DIR/$name
	mkdir -p "$DATA_DIR"
	local port
	port=$(random_port)
	URL=http://127.0.0.1:$port
	local secret
	secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
	local common=(--data-dir "$DATA_DIR" --jwt-secret "$secret")
	if [[ ${2:-} == --with-admin ]]; then
		"$SERVER" user add --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD" --admin "${common[@]}" >&2
	fi
	# Not inherited: the server uses the embedded SQLite file in its data folder.
	env -u DATABASE_URL RUST_LOG="${RUST_LOG:-warn}" "$SERVER" serve --listen "127.0.0.1:$port" \
		"${common[@]}" --max-connections "$MAX_CONNECTIONS" \
		--rate-limit 1000000 --rate-burst 1000000 \
		--auth-rate-limit 1000000 --auth-rate-burst 1000000 --max-connections-per-address 1000000 \
		>"$DATA_DIR/server.log" 2>&1 &
	SERVER_PID=$!
	for i in $(seq 1 300); do
		if curl -fsS --max-time 2 "$URL/health" >/dev/null 2>&1; then
			log "server $name healthy on $URL (pid $SERVER_PID, open-file limit $(awk '/Max open files/ { print $4 }' "/proc/$SERVER_PID/limits"))"
			return 0
		fi
		if ! kill -0 "$SERVER_PID" 2>/dev/null; then
			log "the server exited during start"
			return 1
		fi
		if [[ $i -eq 300 ]]; then
			log "no healthy answer from $URL/health within 30 s"
			return 1
		fi
		sleep 0.1
	done
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status"; }

echo
echo "== ticket-api fan-out: embedded SQLite, $RESERVATIONS reservations at $RATE, $(nproc) CPUs =="
start_server fanout --with-admin
FANOUT_ROWS=()
for subscribers in $SUBSCRIBERS; do
	echo
	echo "-- $subscribers subscribers --"
	set +e
	output=$("$LOADGEN" fanout --url "$URL" --subscribers "$subscribers" \
		--reservations "$RESERVATIONS" --rate "$RATE" --max-duration "$MAX_DURATION" \
		--admin-email "$ADMIN_EMAIL" --admin-password "$ADMIN_PASSWORD" --json)
	code=$?
	set -e
	printf '%s\n' "$output" | grep -v '^{' || true
	json=$(printf '%s\n' "$output" | grep '^{' | tail -n 1 || true)
	if [[ -n $json ]]; then
		if [[ -n ${RESULTS:-} ]]; then
			printf '%s\n' "$json" >>"$RESULTS"
		fi
		if command -v jq >/dev/null; then
			FANOUT_ROWS+=("$(jq -r '[.subscribers, .ok, .achieved_rate_per_s, .latency_ms.p50_ms,
				.latency_ms.p90_ms, .latency_ms.p99_ms, .latency_ms.max_ms, (.coalesced_fraction * 100),
				.latency_all_ms.p99_ms, .missing] | @tsv' <<<"$json")")
		fi
	fi
	if [[ $code -ne 0 ]]; then
		log "loadgen fanout with $subscribers subscribers failed (exit $code)"
		STATUS=1
	fi
done
echo "server RSS after the fan-out runs: $(rss_kib) KiB"
stop_server

# measure NAME ARGS…: fresh server, RSS before and while loadgen idle holds IDLE of them.
MEMORY_ROWS=()
measure() {
	local name=$1
	shift
	echo
	echo "-- memory: $IDLE $name --"
	start_server "idle-${name// /-}"
	sleep 1
	local before during=0 sample fds=0
	before=$(rss_kib)
	local out=$WORK_DIR/idle.out
	"$LOADGEN" idle --url "$URL" --connections "$IDLE" --hold "$HOLD" "$@" >"$out" &
	local idle_pid=$!
	# Until it says it holds them all (bounded: 120 s), then sample a few times.
	for _ in $(seq 1 1200); do
		grep -q '^idle: holding' "$out" 2>/dev/null && break
		kill -0 "$idle_pid" 2>/dev/null || break
		sleep 0.1
	done
	if grep -q '^idle: holding' "$out"; then
		cat "$out"
		for _ in 1 2 3; do
			sleep 1
			sample=$(rss_kib)
			if ((sample > during)); then
				during=$sample
			fi
		done
		fds=$(find "/proc/$SERVER_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
	fi
	local code=0
	wait "$idle_pid" || code=$?
	grep '^idle: released' "$out" || true
	if [[ $code -ne 0 || $during -eq 0 ]]; then
		log "loadgen idle ($name) failed (exit $code)"
		STATUS=1
		stop_server
		return 0
	fi
	local per
	per=$(awk -v b="$before" -v d="$during" -v n="$IDLE" 'BEGIN { printf "%.2f", (d - b) / n }')
	echo "server VmRSS: before $before KiB, during $during KiB → $per KiB per connection/session ($fds open files in the server while held)"
	MEMORY_ROWS+=("$name	$before	$during	$per")
	stop_server
}

echo
echo "== server memory per idle connection ($IDLE held for $HOLD; VmRSS from /proc/<pid>/status) =="
measure "WebSocket connections" --transport ws
measure "long-poll sessions" --transport longpoll
measure "long-poll sessions with a pending GET" --transport longpoll --pending-get

echo
echo "== summary =="
if [[ ${#FANOUT_ROWS[@]} -gt 0 ]]; then
	echo "commit answer → pool.update over (subscriber, received version) pairs; \"all p99\": until every subscriber had the version"
	printf '%-12s %5s %7s %8s %8s %8s %8s %11s %11s %8s\n' subscribers ok "res/s" "p50 ms" "p90 ms" "p99 ms" "max ms" "coalesced%" "all p99 ms" missing
	for row in "${FANOUT_ROWS[@]}"; do
		awk -F'\t' '{ printf "%-12s %5s %7.1f %8.2f %8.2f %8.2f %8.2f %11.1f %11.2f %8s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 }' <<<"$row"
	done
	echo
fi
printf '%-40s %12s %12s %14s\n' "held ($IDLE)" "before KiB" "during KiB" "KiB per conn"
for row in "${MEMORY_ROWS[@]}"; do
	awk -F'\t' '{ printf "%-40s %12s %12s %14s\n", $1, $2, $3, $4 }' <<<"$row"
done
exit "$STATUS"
