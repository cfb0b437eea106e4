#!/usr/bin/env bash
# Fault soak (issue 7): the simulator in threads mode under network loss, partitions and server
# crashes, run after run with a new seed each time, for SOAK_SECONDS of wall time (default 600).
#
#   scripts/soak.sh                 # 10 minutes
#   SOAK_SECONDS=60 scripts/soak.sh # one minute
#
# Each run: 2 threads, 16 clients, SOAK_REQUESTS requests (default 400 000), 10% user cancels,
# 5 ms timeouts, exp:100us latency with jitter, 1% loss with a 2 ms retransmission timeout, two
# partitions and two server crashes during the run, and a session teardown at the end. The run's
# checker tests every invariant (exactly one completion per request: nothing lost or doubled; no
# context leaked; the server's quota back to zero; the routine at most once; no bug check). The
# script prints one line per run and a total, keeps every JSON report in target/soak/, and exits
# 1 if any run reports a violation (its seed and the request's history are in its report).
set -uo pipefail
cd "$(dirname "$0")/.."
total_seconds=${SOAK_SECONDS:-600}
requests=${SOAK_REQUESTS:-400000}
out=target/soak
mkdir -p "$out"
cargo build --release -q -p rxsim || exit 2
bin=target/release/rxsim

start=$(date +%s)
run=0
failed=0
while [ $(( $(date +%s) - start )) -lt "$total_seconds" ]; do
  run=$((run + 1))
  seed=$((1000 + run))
  report="$out/run-$seed.json"
  "$bin" run --mode threads --threads 2 --seed "$seed" --requests "$requests" \
    --cancel-rate 0.1 --timeout 5ms --latency exp:100us --jitter 50us \
    --service uniform:0..100us --loss 0.01 --rto 2ms \
    --partition 300ms+40ms --partition 1200ms+100ms --crash 700ms+60ms --crash 1800ms+30ms \
    --quiet --json "$report"
  rc=$?
  python3 - "$report" "$rc" "$run" <<'PY' || failed=1
import json, sys
path, rc, run = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = json.load(open(path))
held = {i["invariant"]: i["violations"] for i in r["invariants"]}
c = r["cancels"]
print(f"run {run} seed {r['config']['seed']}: {r['requests']['completed']} completed, "
      f"lost/doubled {held.get('exactly_once', '?')}, leaked {held.get('no_leak', '?')}, "
      f"quota {held.get('quota_returned', '?')}, bug checks {r['bug_checks']}, "
      f"retransmits {r['network'].get('retransmits', '?')}, crashes {r['server'].get('crashes', '?')}, "
      f"{round(r['throughput']['requests_per_sec'])} req/s; rxsim exit {rc}")
sys.exit(0 if rc == 0 and r["violations_total"] == 0 else 1)
PY
done
python3 - "$out" "$run" <<'PY'
import glob, json, sys
out, runs = sys.argv[1], int(sys.argv[2])
reports = sorted(glob.glob(f"{out}/run-*.json"))[-runs:] if runs else []
rs = [json.load(open(p)) for p in reports]
completed = sum(r["requests"]["completed"] for r in rs)
violations = sum(r["violations_total"] for r in rs)
print(f"soak: {len(rs)} runs, {completed} requests completed, {violations} violations "
      f"(lost, doubled, leaked, quota, routine, bug checks)")
PY
if [ "$failed" -ne 0 ]; then echo "soak: FAILED (see the reports in $out)"; exit 1; fi
echo "soak: every invariant held in every run"
