#!/bin/bash
# Pod to pod on one node, through the server pod's Envoy: base (no proxy) /
# Envoy (steered, no acceleration) / Envoy + accel on the proxy->app leg /
# Envoy + accel on both legs (client pod a target too), interleaved reps.
# iperf3 throughput by write size and sockperf ping-pong latency.
#
#   cargo build --release -p tproxy-cli --example attach-pods
#   REPS=3 DUR=3 lab/experiments/pod_to_pod.sh
#
# Two pod namespaces (S: iperf3 5201, sockperf 11111, Envoy 15006; C: the
# clients) on a bridge in a third, each pod in a child cgroup of its own;
# everything is removed on exit. One line per run, then the medians.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ATTACH=${ATTACH:-$REPO/target/release/examples/attach-pods}
ENVOY=${ENVOY:-$(command -v envoy || echo /opt/tproxy/envoy/envoy)}
REPS=${REPS:-3}; DUR=${DUR:-3}
SIZES=${SIZES:-"64 1448 16K 64K 1M"}
P=tpx-p2p-$$
CGR=$(awk '$3=="cgroup2"{print $2; exit}' /proc/self/mounts)
S_IP=10.78.0.10
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for pod in s c; do
    [ -d "$CGR/$P-$pod" ] && { for q in $(cat "$CGR/$P-$pod/cgroup.procs"); do kill -KILL "$q" 2>/dev/null || true; done; sleep 0.2; rmdir "$CGR/$P-$pod" || true; }
  done
  for ns in s c node; do ip netns del "$P-$ns" 2>/dev/null || true; done
}
trap cleanup EXIT
ip netns add "$P-node"
ip -n "$P-node" link add br0 type bridge; ip -n "$P-node" link set br0 up
for pod in s c; do
  ip netns add "$P-$pod"; ip -n "$P-$pod" link set lo up
  ip -n "$P-$pod" link add eth0 type veth peer name "v$pod" netns "$P-node"
  ip -n "$P-node" link set "v$pod" master br0 up
  ip -n "$P-$pod" link set eth0 up
  mkdir "$CGR/$P-$pod"
done
ip -n "$P-s" addr add $S_IP/24 dev eth0
ip -n "$P-c" addr add 10.78.0.20/24 dev eth0
# A command in a pod: its namespace and its cgroup.
in_pod() { local pod=$1; shift; bash -c 'echo $$ > "$0/cgroup.procs"; ns=$1; shift; exec nsenter --net="$ns" "$@"' "$CGR/$P-$pod" "/run/netns/$P-$pod" "$@"; }
in_pod s iperf3 -s -p 5201 >/dev/null 2>&1 & PIDS+=($!)
in_pod s sockperf sr --tcp -i 0.0.0.0 -p 11111 >/dev/null 2>&1 & PIDS+=($!)
in_pod s "$ENVOY" -c "$REPO/examples/envoy/envoy.yaml" --concurrency 1 --disable-hot-restart -l error >/dev/null 2>&1 & PIDS+=($!)
sleep 2
declare -A figs
spec_s="/run/netns/$P-s:$CGR/$P-s:5201,11111"
spec_c="/run/netns/$P-c:$CGR/$P-c:5201"
for r in $(seq "$REPS"); do
  for mode in base envoy accel-app accel-both; do
    case $mode in
      base) specs=() ;;
      envoy) specs=("$spec_s:noaccel") ;;
      accel-app) specs=("$spec_s:accel") ;;
      accel-both) specs=("$spec_s:accel" "$spec_c:accel") ;;
    esac
    AP=
    if [ ${#specs[@]} -gt 0 ]; then
      coproc ATT { exec "$ATTACH" "${specs[@]}"; }
      AP=$ATT_PID
      read -r line <&"${ATT[0]}"; [ "$line" = attached ] || { echo "attach-pods: $line" >&2; exit 1; }
    fi
    line="$r $mode"
    for sz in $SIZES; do
      g=$(in_pod c iperf3 -c $S_IP -p 5201 -l "$sz" -t "$DUR" -J |
        python3 -c "import json,sys;print(round(json.load(sys.stdin)['end']['sum_received']['bits_per_second']/1e9,2))")
      line="$line $sz=${g}G"; figs["$mode iperf $sz"]="${figs["$mode iperf $sz"]:-} $g"
    done
    lat=$(in_pod c sockperf pp --tcp -i $S_IP -p 11111 -m 64 -t "$DUR" 2>&1 | python3 -c "
import re,sys
t=sys.stdin.read()
def p(n):
    m=re.search(r'percentile '+re.escape(n)+r'\s*=\s*([0-9.]+)',t); return m.group(1) if m else 'nan'
print(p('50.000'),p('99.000'),p('99.900'))")
    read -r p50 p99 p999 <<<"$lat"
    line="$line p50=${p50}us p99=${p99}us p99.9=${p999}us"
    figs["$mode p50"]="${figs["$mode p50"]:-} $p50"; figs["$mode p99"]="${figs["$mode p99"]:-} $p99"; figs["$mode p99.9"]="${figs["$mode p99.9"]:-} $p999"
    if [ -n "$AP" ]; then exec {ATT[1]}>&-; wait "$AP" || true; fi
    echo "$line"
  done
done
echo "medians over $REPS reps (iperf3 Gbit/s; sockperf one-way µs):"
printf '%-11s' mode; for sz in $SIZES; do printf '%9s' "$sz"; done; printf '%9s%9s%9s\n' p50 p99 p99.9
med() { python3 -c "import statistics,sys;v=[float(x) for x in sys.argv[1:]];print(round(statistics.median(v),2))" $1; }
for mode in base envoy accel-app accel-both; do
  printf '%-11s' $mode
  for sz in $SIZES; do printf '%9s' "$(med "${figs["$mode iperf $sz"]}")"; done
  for q in p50 p99 p99.9; do printf '%9s' "$(med "${figs["$mode $q"]}")"; done; echo
done
b=$(med "${figs[base p50]}"); a=$(med "${figs[accel-both p50]}")
python3 -c "import sys;b,a=float(sys.argv[1]),float(sys.argv[2]);print(f'p50 both legs / base = {a/b:.2f} (target <= 1.5)')" "$b" "$a"
