#!/bin/bash
# Side-by-side HTTP through the lab's Envoy or HAProxy (wrk, as the bench
# runs it), with tproxy AND the proxy restarted per run, interleaved.
#
# Why Envoy too: its upstream HTTP connection pool outlives a tproxy
# restart, so restarting tproxy alone (as ab_iperf.sh does, which is right
# for iperf3's fresh connections) lets one run reuse connections the
# previous run's tproxy accelerated or not. Here each run's Envoy starts
# after its tproxy, so every upstream connection is made under it; the
# counters printed per run show what was redirected.
#
#   cargo xtask lab up            # Envoy (the default), or --proxy haproxy
#   REPS=8 PIN=1 lab/experiments/ab_http.sh "noaccel:--no-accel" "accel:"
#   cargo xtask lab down
#
# PIN=1 places things as `cargo xtask bench --pin`: wrk on CPU 0; Envoy
# and the app on the last CPU. One line per run: rep, label, req/s, p50,
# p99, p99.9 (µs), errors, counters; then every label's figures in run
# order and their medians. Stops the lab's own tproxy and Envoy first
# (lab down still cleans up after the rest).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
T=${TPROXY:-$REPO/target/release/tproxy}
CG=/sys/fs/cgroup/unified/tproxy-lab
SRV=/run/netns/tproxy-lab-server
REPS=${REPS:-5}; DUR=${DUR:-3}; CONNS=${CONNS:-16}; PIN=${PIN:-0}
[ -e "$SRV" ] || { echo "the lab is not up: cargo xtask lab up" >&2; exit 1; }
pids=/run/tproxy-lab/pids
. "$REPO/lab/experiments/lib.sh"
# The lab's proxy command (xtask/src/lab.rs); WORKERS as the bench's
# --envoy-workers. HAProxy (tcp mode) keeps no pool, but is restarted
# all the same, so that both proxies are measured alike.
if grep -q '^envoy ' $pids; then
  PROXY=envoy
  ENVOY=${ENVOY:-$(command -v envoy || echo /opt/tproxy/envoy/envoy)}
  PROXY_CMD="$ENVOY -c $REPO/examples/envoy/envoy.yaml --concurrency ${WORKERS:-2} --disable-hot-restart -l warning"
  READY="curl -sf 127.0.0.1:15000/ready"
elif grep -q '^haproxy ' $pids; then
  PROXY=haproxy
  PROXY_CMD="haproxy -db -f $REPO/examples/haproxy/haproxy.cfg"
  READY="ss -Hltn 'sport = :15006' | grep -q ."
else
  echo "the lab runs neither Envoy nor HAProxy: cargo xtask lab up [--proxy haproxy]" >&2; exit 1
fi
LAST=$(( $(nproc) - 1 ))
WRAP=(); [ "$PIN" = 1 ] && WRAP=(taskset -c 0)
# The app's threads (tokio's workers too) with the proxy, or every CPU back.
cpus=0-$LAST; [ "$PIN" = 1 ] && cpus=$LAST
p=$(lab_pid lab-app)
if [ -n "$p" ]; then taskset -a -pc "$cpus" "$p" >/dev/null; fi
for who in tproxy $PROXY; do
  p=$(lab_pid $who)
  if [ -n "$p" ]; then stop_proc "$p"; fi
done
TP=; EV=; LUA=
# (HAProxy exits 143 on SIGTERM: its status must not end the script.)
stop() { for p in $EV $TP; do kill -TERM "$p" 2>/dev/null && { wait "$p" 2>/dev/null || true; }; done; EV=; TP=; }
trap 'stop; [ -n "$LUA" ] && rm -f "$LUA"' EXIT
LUA=$(mktemp --suffix .lua); cp "$REPO/xtask/src/bench/wrk-percentiles.lua" "$LUA"
declare -A figs
for r in $(seq "$REPS"); do
  for spec in "$@"; do
    label=${spec%%:*}; flags=${spec#*:}
    # shellcheck disable=SC2086
    nsenter --net=$SRV "$T" -i eth0 -ports 8000,5201,11111 --cgroup $CG --drain-timeout 0 $flags \
      >/tmp/ab_http-tproxy.log 2>&1 & TP=$!
    sleep 0.7
    check_running $TP /tmp/ab_http-tproxy.log
    pin=""; [ "$PIN" = 1 ] && pin="taskset -c $LAST"
    # shellcheck disable=SC2086
    nsenter --net=$SRV sh -c "echo \$\$ > $CG/cgroup.procs; exec $pin $PROXY_CMD" \
      >/tmp/ab_http-proxy.log 2>&1 & EV=$!
    ready=
    for _ in $(seq 100); do
      if nsenter --net=$SRV sh -c "$READY" >/dev/null 2>&1; then ready=1; break; fi
      sleep 0.1
    done
    [ -n "$ready" ] || { echo "$PROXY not ready in 10 s:" >&2; tail -5 /tmp/ab_http-proxy.log >&2; exit 1; }
    all=$(ip netns exec tproxy-lab-client "${WRAP[@]}" wrk -t1 -c"$CONNS" -d"${DUR}s" --latency \
      -s "$LUA" http://192.168.178.10:8000/ 2>&1) || true
    out=$(grep tproxy-bench: <<<"$all") || { echo "run $r $label: wrk: $all" >&2; exit 1; }
    c=$(nsenter --net=$SRV "$T" stats --json | python3 -c "import json,sys
d=json.load(sys.stdin)[0]['counters']
print(*(f'{k}={d.get(k,0)}' for k in ['msg_redirected','msg_passthrough','accel_fallbacks','accel_left']))")
    stop
    read -r rps p50 p99 p999 err < <(python3 -c "import sys
f=dict(kv.split('=') for kv in sys.argv[1].split()[1:])
print(round(int(f['requests'])*1e6/int(f['duration_us'])), f['p50'], f['p99'], f['p99.9'], f['errors'])" "$out")
    echo "$r $label rps=$rps p50=$p50 p99=$p99 p99.9=$p999 errors=$err $c"
    figs[$label]="${figs[$label]:-} $rps/$p50/$p99/$p999"
  done
done
for l in "${!figs[@]}"; do
  python3 -c "import statistics,sys
runs=[list(map(int,x.split('/'))) for x in sys.argv[2:]]
m=[statistics.median(c) for c in zip(*runs)]
print(f'{sys.argv[1]}: req/s {[r[0] for r in runs]} median {m[0]:.0f}; p50 {m[1]:.0f} p99 {m[2]:.0f} p99.9 {m[3]:.0f} µs (medians)')" "$l" ${figs[$l]}
done
