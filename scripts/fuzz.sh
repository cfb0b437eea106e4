#!/usr/bin/env bash
# Runs every cargo-fuzz (libFuzzer) target of the rdbss workspace for a fixed time each and
# prints libFuzzer's final figures per target. Not part of the main CI (too slow).
#
# Usage:
#   scripts/fuzz.sh                        # every target, 60 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh       # every target, 300 s each
#   scripts/fuzz.sh interrupt_table mi_calls   # only these targets
#
# Needs: a nightly toolchain (`rustup toolchain install nightly --profile minimal`) and
# cargo-fuzz (`cargo install cargo-fuzz`). Builds once (release, debug assertions, AddressSanitizer:
# cargo-fuzz's defaults), then runs each target with `-max_total_time=$FUZZ_SECONDS` on one core.
#
# Targets (fuzz/fuzz_targets/, checks in fuzz/harness/):
#   context_calls    core API call sequences on an Rdbss instance (BugCheckPolicy::Record)
#   interrupt_table  the FUSE interrupt layer: ids, interrupts before requests, settles, replies
#   mi_calls         rdbss::mi: start / cancel / close / register_cancel / post / get_result
#   resmon_calls     rdbss::resmon: create / online / offline / cancel / terminate / workers / clock
#
# Corpora grow in fuzz/corpus/<target>/ (git-ignored); each run also starts from
# fuzz/regressions/<target>/ (inputs that once found a bug; kept in git, replayed by
# `cargo test --test fuzz_regressions`). Logs go to fuzz/logs/<target>.log.
#
# Exit status: 0 if no target found a crash; 1 if any did (the crashing input is kept in
# fuzz/artifacts/<target>/, named in the summary; minimise it with
# `cargo +nightly fuzz tmin <target> <artifact>`, then copy it to fuzz/regressions/<target>/);
# 2 on a setup or build error.
#
# Extra libFuzzer flags can be passed with FUZZ_ARGS, e.g. FUZZ_ARGS="-max_len=512".

set -uo pipefail

seconds="${FUZZ_SECONDS:-60}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
all_targets=(context_calls interrupt_table mi_calls resmon_calls)

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    targets=("${all_targets[@]}")
fi

if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [[ "$seconds" -eq 0 ]]; then
    echo "fuzz.sh: FUZZ_SECONDS must be a positive integer (got '$seconds')" >&2
    exit 2
fi
if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs cargo-fuzz and the $toolchain toolchain:" >&2
    echo "  rustup toolchain install $toolchain --profile minimal && cargo install cargo-fuzz" >&2
    exit 2
fi

cd "$fuzz_dir" || exit 2
mkdir -p logs

echo "== building ${targets[*]} (cargo +$toolchain fuzz build)"
for target in "${targets[@]}"; do
    if ! cargo "+$toolchain" fuzz build "$target" >"logs/build-$target.log" 2>&1; then
        echo "fuzz.sh: build of $target failed, see fuzz/logs/build-$target.log" >&2
        tail -n 20 "logs/build-$target.log" >&2
        exit 2
    fi
done

failed=0
summary=()
for target in "${targets[@]}"; do
    corpus="corpus/$target"
    mkdir -p "$corpus" "artifacts/$target"
    seeds=()
    [[ -d "regressions/$target" ]] && seeds=("regressions/$target")
    log="logs/$target.log"
    echo "== $target: ${seconds}s"
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    cargo "+$toolchain" fuzz run "$target" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="artifacts/$target/" ${FUZZ_ARGS:-} >"$log" 2>&1
    status=$?

    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n 1)
    # Coverage from the last status line (DONE, or the last one before a crash).
    last=$(grep -E '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1)
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9A-Za-z]*\).*/\1/p' <<<"$last")
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)

    if [[ $status -ne 0 || -n "$artifact" ]]; then
        failed=1
        result="CRASH (exit $status) ${artifact:-see $log}"
        echo "   $target FOUND A CRASH: ${artifact:-see fuzz/$log}"
        grep -m 1 -A 4 "panicked at" "$log" | sed 's/^/   | /'
    else
        result="ok"
    fi
    line=$(printf '%-16s %6ss %11s execs %8s exec/s  cov %5s  ft %6s  corpus %-10s rss %4sMB  %s' \
        "$target" "$seconds" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" \
        "${rss:-?}" "$result")
    summary+=("$line")
    echo "   $line"
done

echo
echo "== summary (FUZZ_SECONDS=$seconds, logs in fuzz/logs/)"
printf '%s\n' "${summary[@]}"
exit "$failed"
