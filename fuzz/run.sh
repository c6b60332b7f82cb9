#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 60), keeping the
# corpus in fuzz/corpus/<target>. Needs cargo-fuzz and a nightly toolchain (or
# RUSTC_BOOTSTRAP=1 with stable). A crash leaves its input in fuzz/artifacts/<target>;
# turn it into a regression test before fixing it.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-60}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-+nightly}
for target in jsonrpc longpoll import; do
	mkdir -p "corpus/$target"
	echo "fuzz: $target for ${SECONDS_EACH}s" >&2
	cargo "$TOOLCHAIN" fuzz run "$target" "corpus/$target" -- \
		-max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 -timeout=30
done
