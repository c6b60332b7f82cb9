#!/usr/bin/env bash
# Cluster mode on this machine: three `ticket-api --cluster` servers on one fresh PostgreSQL
# database and one fresh Redis key prefix, and three measurements.
#
# Phases:
#   forward    reserves/s straight to an event's owner and through another server, which
#              forwards every call to the owner: `loadgen reserve` on one existing event,
#              CONNECTIONS WebSocket connections, closed loop, DURATION each; the same pair
#              again with an idempotency key on every call (KEYS=1). Rates, p50/p99, the
#              ratio forwarded ÷ straight (goal ≥ 0.5). Every window checks nothing was
#              oversold, reading the owner's count.
#   fanout     SUBSCRIBERS_PER_SERVER idle WebSocket subscribers on each of the three servers
#              at once, subscribed to one event, bound to SOURCE_ADDRESSES loopback addresses
#              (127.0.0.x) and held by helper processes of SUBSCRIBERS_PER_PROCESS each;
#              RESERVATIONS paced at RATE through one server; from each reserve answer to
#              the pool.update at the last subscriber, p50/p99 (goal ≤ 200 ms).
#   takeover   KILLS times: with reservations streaming on an event through the two other
#              servers, SIGKILL its owner; from the kill to the first successful reserve
#              sent after it (goal ≤ 10 s); then the killed server is started again (a new
#              node id) before the next kill. min/p50/max and every value.
# At the end: the summary (`loadgen cluster-summary`), and with RESULTS_MD a dated section
# appended to that file. Every server is stopped (SIGTERM), its data folder removed, the
# database dropped and the Redis prefix's keys deleted at exit, also on failure or Ctrl-C.
# The machine is shared: the servers, PostgreSQL, Redis and the load generator share its
# cores, so the figures are noisy and an upper bound of what the servers alone would cost.
#
# Environment:
#   QUICK=1                  the whole run in about a minute: sets the defaults marked [quick]
#   PHASES                   from: forward fanout takeover (default: all three)
#   DURATION                 each forwarding window (default 10s [quick 2s])
#   CONNECTIONS              WebSocket connections of the forwarding windows (default 64)
#   KEYS                     1: also the pair with idempotency keys (default 1)
#   SUBSCRIBERS_PER_SERVER   fan-out subscribers on each server (default 10000 [quick 1000])
#   SUBSCRIBERS_PER_PROCESS  most subscribers per load-generator process (default 10000
#                            [quick 1000], so helper processes run in both)
#   SOURCE_ADDRESSES         loopback source addresses of the subscribers (default: enough
#                            for half of each address's ephemeral ports, at least 2)
#   RESERVATIONS, RATE       the fan-out's reservations and their pace (default 200 at 20/s
#                            [quick 40])
#   KILLS                    owner kills (default 10 [quick 3])
#   TAKEOVER_CONNECTIONS     reserving connections during a kill (default 4)
#   PGHOST PGPORT PGUSER     PostgreSQL (127.0.0.1, 5432, postgres; loopback only, trust auth)
#   REDIS_URL                Redis (redis://127.0.0.1:6379; loopback only)
#   RESULTS_MD               append a dated section to this file (default: none)
#   JSONL                    also keep every phase's JSON line in this file
#   NO_BUILD=1               use target/release as it is (no cargo build)
#   RUST_LOG                 the servers' log filter (default warn)
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ ${QUICK:-0} == 1 ]]; then
	MODE=QUICK
	DURATION=${DURATION:-2s}
	SUBSCRIBERS_PER_SERVER=${SUBSCRIBERS_PER_SERVER:-1000}
	SUBSCRIBERS_PER_PROCESS=${SUBSCRIBERS_PER_PROCESS:-1000}
	RESERVATIONS=${RESERVATIONS:-40}
	KILLS=${KILLS:-3}
else
	MODE=full
	DURATION=${DURATION:-10s}
	SUBSCRIBERS_PER_SERVER=${SUBSCRIBERS_PER_SERVER:-10000}
	SUBSCRIBERS_PER_PROCESS=${SUBSCRIBERS_PER_PROCESS:-10000}
	RESERVATIONS=${RESERVATIONS:-200}
	KILLS=${KILLS:-10}
fi
PHASES=${PHASES:-forward fanout takeover}
CONNECTIONS=${CONNECTIONS:-64}
KEYS=${KEYS:-1}
RATE=${RATE:-20/s}
TAKEOVER_CONNECTIONS=${TAKEOVER_CONNECTIONS:-4}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PGUSER=${PGUSER:-postgres}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
RESULTS_MD=${RESULTS_MD:-}
ADMIN_EMAIL=cluster-admin@loadgen.invalid
ADMIN_PASSWORD=cluster-admin-password
# Large enough that no run sells out.
CAPACITY=1000000000

log() { echo "cluster: $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

require_loopback_services
# The servers get their settings from the flags below only, never from the caller's
# environment (which could point them at a database that is not loopback, or not ours).
unset DATABASE_URL "${!TICKET_API_@}"
export -n REDIS_URL
for tool in curl jq psql redis-cli; do
	command -v "$tool" >/dev/null || {
		log "needs $tool on PATH"
		exit 2
	}
done
wants() { [[ " $PHASES " == *" $1 "* ]]; }
for phase in $PHASES; do
	case $phase in
	forward | fanout | takeover) ;;
	*)
		log "unknown phase $phase (PHASES from: forward fanout takeover)"
		exit 2
		;;
	esac
done

# Open files: every subscriber is one in a server and one in a load generator process.
HARD_NOFILE=$(ulimit -Hn)
if [[ $HARD_NOFILE != unlimited ]]; then
	ulimit -n "$HARD_NOFILE"
else
	HARD_NOFILE=1048576
fi
read -r PORT_LOW PORT_HIGH < <(sysctl -n net.ipv4.ip_local_port_range 2>/dev/null || echo "32768 60999")
PORTS_PER_ADDRESS=$((PORT_HIGH - PORT_LOW + 1))
FANOUT_TOTAL=$((3 * SUBSCRIBERS_PER_SERVER))
if [[ -z ${SOURCE_ADDRESSES:-} ]]; then
	# Half of each address's ports at most, so the servers' own connections and sockets
	# still in TIME_WAIT from an earlier run leave room.
	SOURCE_ADDRESSES=$(((FANOUT_TOTAL * 2 + PORTS_PER_ADDRESS - 1) / PORTS_PER_ADDRESS))
	((SOURCE_ADDRESSES < 2)) && SOURCE_ADDRESSES=2
fi
# A server holds its subscribers plus the other connections of a run.
MAX_CONNECTIONS=$((HARD_NOFILE > 20000 ? 20000 : HARD_NOFILE))
log "open files: soft $(ulimit -n), hard $HARD_NOFILE; ephemeral ports $PORT_LOW–$PORT_HIGH ($PORTS_PER_ADDRESS per source address)"

if [[ ${NO_BUILD:-0} != 1 ]]; then
	log "building (cargo build --release --workspace)…"
	cargo build --release --workspace
fi
SERVER=target/release/ticket-api
LOADGEN=target/release/loadgen

WORK=$(mktemp -d -t ticket-api-cluster.XXXXXX)
JSON_OUT=$WORK/phases.jsonl
: >"$JSON_OUT"
DB=ticket_api_cluster_$$
DB_CREATED=0
REDIS_PREFIX=ticket-api-cluster-bench-$$-$RANDOM:
SERVER_PID=
STATUS=0
JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
# Per slot (0, 1, 2): the running server's pid, node id, base URL and data folder.
NODE_PIDS=()
NODE_IDS=()
NODE_URLS=()
NODE_DIRS=()
# Every node id a slot has had, for the logs shown on failure.
ALL_DIRS=()

psql_admin() { psql -X -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -q -v ON_ERROR_STOP=1 "$@"; }
redis() { redis-cli -u "$REDIS_URL" --raw "$@"; }

cleanup() {
	local code=$?
	local slot
	for slot in "${!NODE_PIDS[@]}"; do
		SERVER_PID=${NODE_PIDS[$slot]}
		stop_server
	done
	if [[ $code -ne 0 || $STATUS -ne 0 ]]; then
		local dir
		for dir in "${ALL_DIRS[@]}"; do
			if [[ -s $dir/server.log ]]; then
				log "last lines of $(basename "$dir")'s log:"
				tail -n 15 "$dir/server.log" >&2 || true
			fi
		done
	fi
	if [[ $DB_CREATED == 1 ]]; then
		log "dropping database $DB"
		psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null || true
	fi
	log "deleting the Redis keys of prefix $REDIS_PREFIX"
	redis --scan --pattern "${REDIS_PREFIX}*" 2>/dev/null |
		xargs -r -d '\n' -n 2000 redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
	if [[ -n ${JSONL:-} ]]; then
		cp "$JSON_OUT" "$JSONL" || true
	fi
	rm -rf "$WORK"
	exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

psql_admin -c "CREATE DATABASE $DB" >/dev/null
DB_CREATED=1
DB_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB"
COMMON=(--database-url "$DB_URL" --redis-url "$REDIS_URL" --redis-prefix "$REDIS_PREFIX"
	--jwt-secret "$JWT_SECRET")
SERVE_FLAGS=(--reservation-ttl 1h --max-connections "$MAX_CONNECTIONS"
	--rate-limit 1000000 --rate-burst 1000000 --auth-rate-limit 1000000 --auth-rate-burst 1000000
	--max-connections-per-address 1000000)

# start_node SLOT NODE_ID: a cluster server on a free loopback port, with a data folder of its
# own; returns once its /health says it takes part in the cluster (at most 30 s).
start_node() {
	local slot=$1 id=$2
	local dir=$WORK/$id
	mkdir -p "$dir"
	ALL_DIRS+=("$dir")
	RUST_LOG=${RUST_LOG:-warn} "$SERVER" serve --cluster --node-id "$id" --listen 127.0.0.1:0 \
		--data-dir "$dir" "${COMMON[@]}" "${SERVE_FLAGS[@]}" >"$dir/server.log" 2>&1 &
	NODE_PIDS[slot]=$!
	# Out of the job table: the shell then reports nothing when the takeover phase kills
	# it (stop_server and `kill -0` work on the pid as before).
	disown "${NODE_PIDS[slot]}"
	NODE_IDS[slot]=$id
	NODE_DIRS[slot]=$dir
	NODE_URLS[slot]=
	local i addr
	for i in $(seq 1 300); do
		if ! kill -0 "${NODE_PIDS[slot]}" 2>/dev/null; then
			log "server $id exited during start"
			return 1
		fi
		if [[ -z ${NODE_URLS[slot]} ]]; then
			addr=$(sed -n 's/^ticket-api listening on //p' "$dir/server.log" | head -n 1)
			[[ -n $addr ]] && NODE_URLS[slot]=http://$addr
		fi
		if [[ -n ${NODE_URLS[slot]} ]] &&
			curl -fsS --max-time 2 "${NODE_URLS[slot]}/health" 2>/dev/null | jq -e '.cluster == "ok"' >/dev/null 2>&1; then
			log "server $id on ${NODE_URLS[slot]} (pid ${NODE_PIDS[slot]}) is in the cluster"
			return 0
		fi
		[[ $i -eq 300 ]] && break
		sleep 0.1
	done
	log "server $id not healthy in the cluster within 30 s"
	return 1
}

# rpc URL METHOD PARAMS [TOKEN]: one JSON-RPC call over POST /rpc; prints the result, fails
# on an error answer.
rpc() {
	local auth=()
	[[ -n ${4:-} ]] && auth=(-H "authorization: Bearer $4")
	local body
	body=$(jq -cn --arg m "$2" --argjson p "$3" '{jsonrpc: "2.0", id: 1, method: $m, params: $p}')
	local answer
	answer=$(curl -fsS --max-time 10 -H 'content-type: application/json' "${auth[@]}" -d "$body" "$1/rpc")
	if ! jq -e '.error == null' >/dev/null <<<"$answer"; then
		log "$2 through $1: $answer"
		return 1
	fi
	jq -c '.result' <<<"$answer"
}

# create_event NAME: an event with one ticket type of CAPACITY through the first server;
# prints "EVENT_ID TICKET_TYPE_ID".
ADMIN_TOKEN=
create_event() {
	if [[ -z $ADMIN_TOKEN ]]; then
		ADMIN_TOKEN=$(rpc "${NODE_URLS[0]}" auth.login \
			"$(jq -cn --arg e "$ADMIN_EMAIL" --arg p "$ADMIN_PASSWORD" '{email: $e, password: $p}')" | jq -r .token)
	fi
	local starts_at
	starts_at=$(date -u -d '+30 days' '+%Y-%m-%dT%H:%M:%SZ')
	local params
	params=$(jq -cn --arg n "$1" --arg s "$starts_at" --argjson c "$CAPACITY" \
		'{name: $n, starts_at: $s, venue: "loopback", ticket_types: [{name: "Hot", price: {amount: 1000, currency: "EUR"}, capacity: $c, rule: {kind: "any"}}]}')
	rpc "${NODE_URLS[0]}" admin.events.create "$params" "$ADMIN_TOKEN" | jq -r '"\(.id) \(.ticket_types[0].id)"'
}

# owner_slot EVENT_ID: the slot of the server owning the event, from Redis:
# `<prefix>owner:<event>` holds the owner's node id (possibly followed by ':' and more), and
# `<prefix>node:<id>` its URL. Waits up to 15 s for a live owner.
owner_slot() {
	local value id url slot
	for _ in $(seq 1 150); do
		value=$(redis get "${REDIS_PREFIX}owner:$1" 2>/dev/null || true)
		if [[ -n $value ]]; then
			id=${value%%:*}
			url=$(redis get "${REDIS_PREFIX}node:$id" 2>/dev/null || true)
			for slot in "${!NODE_IDS[@]}"; do
				if [[ ${NODE_IDS[$slot]} == "$id" && ${NODE_URLS[$slot]} == "$url" ]] &&
					kill -0 "${NODE_PIDS[$slot]}" 2>/dev/null; then
					echo "$slot"
					return 0
				fi
			done
		fi
		sleep 0.1
	done
	log "no live owner of event $1 in Redis within 15 s (last value: ${value:-none})"
	return 1
}

note() { jq -cn --arg n "$*" '{note: $n}' >>"$JSON_OUT"; }


# The postmaster, for PostgreSQL's CPU time in the forwarding windows.
POSTMASTER_PID=
if pg_data=$(psql -X -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres -tAc 'SHOW data_directory' 2>/dev/null) &&
	[[ -r $pg_data/postmaster.pid ]]; then
	POSTMASTER_PID=$(head -n 1 "$pg_data/postmaster.pid")
fi

echo
echo "== ticket-api cluster benchmark ($MODE): three servers, $(nproc) CPUs, $(date -u '+%F %T') UTC =="
note "$MODE run, $(nproc) CPUs, load average $(cut -d ' ' -f 1-3 /proc/loadavg) at start; open files hard limit $HARD_NOFILE; $PORTS_PER_ADDRESS ephemeral ports per source address"
"$SERVER" user add --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD" --admin \
	--data-dir "$WORK/admin" "${COMMON[@]}" >/dev/null
for slot in 0 1 2; do
	start_node "$slot" "node-$((slot + 1))"
done

if wants forward; then
	pair=$(create_event "cluster forward $$")
	read -r EVENT TICKET_TYPE <<<"$pair"
	OWNER=$(owner_slot "$EVENT")
	OTHER=$(((OWNER + 1) % 3))
	log "forwarding: event $EVENT is owned by ${NODE_IDS[$OWNER]}; forwarded through ${NODE_IDS[$OTHER]}"
	note "forwarding: owner ${NODE_IDS[$OWNER]} (${NODE_URLS[$OWNER]}), forwarded through ${NODE_IDS[$OTHER]} (${NODE_URLS[$OTHER]}), $CONNECTIONS connections, $DURATION windows"
	cpu=(--cpu loadgen=self --cpu "owner=${NODE_PIDS[$OWNER]}" --cpu "forwarder=${NODE_PIDS[$OTHER]}")
	[[ -n $POSTMASTER_PID ]] && cpu+=(--cpu "postgres=tree:$POSTMASTER_PID")
	suffixes=("")
	[[ $KEYS == 1 ]] && suffixes+=(-keys)
	for suffix in "${suffixes[@]}"; do
		keys=()
		[[ -n $suffix ]] && keys=(--idempotency-keys)
		for via in direct forwarded; do
			slot=$OWNER
			[[ $via == forwarded ]] && slot=$OTHER
			run_phase "forward-$via$suffix" "$LOADGEN" reserve --url "${NODE_URLS[$slot]}" \
				--check-url "${NODE_URLS[$OWNER]}" --event-id "$EVENT" --ticket-type-id "$TICKET_TYPE" \
				--connections "$CONNECTIONS" --duration "$DURATION" --phase "forward-$via$suffix" \
				"${keys[@]}" "${cpu[@]}" --json
		done
	done
	now=$(owner_slot "$EVENT" || echo none)
	if [[ $now != "$OWNER" ]]; then
		log "the event changed owner during the forwarding windows (now: $now): figures mixed"
		note "WARNING: the event's owner changed during the forwarding windows"
		STATUS=1
	fi
fi

if wants fanout; then
	echo
	fanout_ok=1
	if ((SUBSCRIBERS_PER_SERVER + 1000 > MAX_CONNECTIONS)); then
		log "fan-out: $SUBSCRIBERS_PER_SERVER subscribers per server do not fit a server's open-file limit ($HARD_NOFILE, \`ulimit -Hn\`); lower SUBSCRIBERS_PER_SERVER or raise the hard limit"
		fanout_ok=0
	fi
	if ((SUBSCRIBERS_PER_PROCESS + 64 > HARD_NOFILE)); then
		log "fan-out: $SUBSCRIBERS_PER_PROCESS subscribers per load-generator process do not fit the open-file limit ($HARD_NOFILE); lower SUBSCRIBERS_PER_PROCESS"
		fanout_ok=0
	fi
	if ((FANOUT_TOTAL > SOURCE_ADDRESSES * PORTS_PER_ADDRESS * 9 / 10)); then
		log "fan-out: $FANOUT_TOTAL subscribers need more than $SOURCE_ADDRESSES source addresses of $PORTS_PER_ADDRESS ports; raise SOURCE_ADDRESSES"
		fanout_ok=0
	fi
	if [[ $fanout_ok == 1 ]]; then
		subscriber_urls=()
		for slot in 0 1 2; do
			subscriber_urls+=(--subscriber-url "${NODE_URLS[$slot]}")
		done
		run_phase "fanout: 3 × $SUBSCRIBERS_PER_SERVER subscribers" "$LOADGEN" fanout \
			--url "${NODE_URLS[0]}" "${subscriber_urls[@]}" --subscribers "$FANOUT_TOTAL" \
			--source-addresses "$SOURCE_ADDRESSES" --subscribers-per-process "$SUBSCRIBERS_PER_PROCESS" \
			--reservations "$RESERVATIONS" --rate "$RATE" --max-duration 60s \
			--admin-email "$ADMIN_EMAIL" --admin-password "$ADMIN_PASSWORD" --json
		fanout_event=$(jq -r 'select(.tool == "loadgen fanout") | .event_id' "$JSON_OUT" | tail -n 1)
		if [[ -n $fanout_event ]] && owner=$(owner_slot "$fanout_event"); then
			note "fan-out: reservations through ${NODE_IDS[0]}, the event owned by ${NODE_IDS[$owner]}; $SOURCE_ADDRESSES source addresses, at most $SUBSCRIBERS_PER_PROCESS subscribers per process"
		fi
	else
		STATUS=1
	fi
fi

if wants takeover; then
	pair=$(create_event "cluster takeover $$")
	read -r EVENT TICKET_TYPE <<<"$pair"
	for kill in $(seq 1 "$KILLS"); do
		if ! OWNER=$(owner_slot "$EVENT"); then
			STATUS=1
			break
		fi
		survivors=()
		for slot in 0 1 2; do
			[[ $slot != "$OWNER" ]] && survivors+=(--url "${NODE_URLS[$slot]}")
		done
		killed_pid=${NODE_PIDS[$OWNER]}
		run_phase "takeover $kill/$KILLS: SIGKILL ${NODE_IDS[$OWNER]} (pid $killed_pid)" \
			"$LOADGEN" takeover "${survivors[@]}" --check-url "${NODE_URLS[$OWNER]}" \
			--event-id "$EVENT" --ticket-type-id "$TICKET_TYPE" --kill-pid "$killed_pid" \
			--connections "$TAKEOVER_CONNECTIONS" --phase "takeover-$kill" --json
		if kill -0 "$killed_pid" 2>/dev/null; then
			log "${NODE_IDS[$OWNER]} still runs (the kill did not happen): stopping the kills"
			STATUS=1
			break
		fi
		if ! start_node "$OWNER" "node-$((OWNER + 1))-r$kill"; then
			STATUS=1
			break
		fi
	done
fi

echo
echo "== summary ($MODE, $(date -u '+%F %T') UTC, $(nproc) CPUs; shared machine: figures are noisy) =="
"$LOADGEN" cluster-summary --input "$JSON_OUT"

if [[ -n $RESULTS_MD ]]; then
	label="$(date -u '+%F %H:%M') UTC, $MODE, $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
	{
		echo
		"$LOADGEN" cluster-summary --input "$JSON_OUT" --markdown --label "$label"
	} >>"$RESULTS_MD"
	log "section appended to $RESULTS_MD"
fi
exit "$STATUS"
