#!/usr/bin/env bash
# Runs every fuzz target (or those named as arguments) for a bounded time, FUZZ_SECONDS
# each (default 60), growing the corpus in fuzz/corpus/<target> and minimising it
# afterwards (`cargo fuzz cmin`), so what is committed stays small.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). The instrumented build needs
# nightly compiler flags: with a nightly toolchain installed set FUZZ_TOOLCHAIN=+nightly;
# otherwise the default (stable) toolchain is used with RUSTC_BOOTSTRAP=1.
#
# Builds are release with debug assertions (overflow checks) and AddressSanitizer.
# Exits non-zero if any target found a crash, panic, timeout or out-of-memory; its input
# is in fuzz/artifacts/<target>/ — turn it into a regression test in the crate before
# fixing it. Reproduce with `cargo fuzz run -a <target> fuzz/artifacts/<target>/<file>`.
set -uo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-60}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-}
if [[ -z $TOOLCHAIN ]]; then
	export RUSTC_BOOTSTRAP=1
fi
if [[ $# -gt 0 ]]; then
	targets=("$@")
else
	targets=(jsonrpc longpoll import)
fi
# An empty toolchain must not become an empty argument.
cargo_fuzz=(cargo ${TOOLCHAIN:+"$TOOLCHAIN"} fuzz)

failed=()
for target in "${targets[@]}"; do
	mkdir -p "corpus/$target"
	echo "fuzz: $target for ${SECONDS_EACH}s" >&2
	# -timeout: one input may take 10 s (a login hashes a password); -rss_limit_mb: the
	# whole server lives in the process.
	if ! "${cargo_fuzz[@]}" run -a "$target" "corpus/$target" -- \
		-max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 \
		-print_final_stats=1; then
		failed+=("$target")
		continue
	fi
	before=$(find "corpus/$target" -type f | wc -l)
	"${cargo_fuzz[@]}" cmin -a "$target" "corpus/$target" >/dev/null 2>&1 ||
		echo "fuzz: $target: cmin failed, corpus kept as it is" >&2
	after=$(find "corpus/$target" -type f | wc -l)
	echo "fuzz: $target: corpus $before -> $after inputs after cmin" >&2
done
if [[ ${#failed[@]} -gt 0 ]]; then
	echo "fuzz: findings in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
	exit 1
fi
echo "fuzz: no findings" >&2
