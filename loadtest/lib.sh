# Shell functions shared by the load-test scripts. Source it after defining `log`; the
# functions use the caller's `SERVER_PID`, `JSON_OUT` and `STATUS`.

# Stops the server started by the script: SIGTERM, then SIGKILL after 10 s.
stop_server() {
	if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
		log "stopping the server (SIGTERM)…"
		kill -TERM "$SERVER_PID" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$SERVER_PID" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$SERVER_PID" 2>/dev/null; then
			log "the server did not stop within 10 s: SIGKILL"
			kill -KILL "$SERVER_PID" 2>/dev/null || true
		fi
		wait "$SERVER_PID" 2>/dev/null || true
	fi
	SERVER_PID=
}

# A free TCP port on the loopback interface.
random_port() {
	if command -v python3 >/dev/null; then
		python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
	else
		shuf -i 20000-60999 -n 1
	fi
}

# Exits 2 unless PGHOST and REDIS_URL name loopback addresses: load goes nowhere else.
require_loopback_services() {
	case "$PGHOST" in
	127.* | localhost | ::1) ;;
	*)
		log "PGHOST=$PGHOST is not a loopback address"
		exit 2
		;;
	esac
	case "$REDIS_URL" in
	redis://127.* | redis://localhost* | redis://\[::1\]*) ;;
	*)
		log "REDIS_URL=$REDIS_URL is not a loopback address"
		exit 2
		;;
	esac
}

# run_phase NAME COMMAND…: runs one load generator command; keeps its JSON line (appended to
# JSON_OUT), shows the rest, and records a failure in STATUS (the run goes on).
run_phase() {
	local name=$1
	shift
	echo
	echo "-- $name --"
	local output code
	set +e
	output=$("$@")
	code=$?
	set -e
	printf '%s\n' "$output" | grep -v '^{' || true
	printf '%s\n' "$output" | grep '^{' | tail -n 1 >>"$JSON_OUT" || true
	if [[ $code -ne 0 ]]; then
		log "$name failed (exit $code)"
		STATUS=1
	fi
}
