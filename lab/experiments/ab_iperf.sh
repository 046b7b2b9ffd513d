#!/bin/bash
# Side-by-side iperf3 through the lab's proxy, tproxy restarted per run with
# other flags or another binary, interleaved; the figures in the closing
# notes and docs/benchmarks.md ("What limits each figure") came from this.
#
#   cargo xtask lab up            # Envoy by default
#   REPS=8 SZ=64K lab/experiments/ab_iperf.sh \
#       "noaccel:--no-accel" "accel:" "forced-tcp:--accel-max-queued 1" \
#       "old:@/tmp/tproxy-old"    # @PATH: that binary, default flags
#   cargo xtask lab down
#
# PIN=1 places things as `cargo xtask bench --pin`: the client on CPU 0;
# the proxy's threads and the app on the last CPU.
#
# One line per run: rep, label, size, Gbit/s, the fast-path counters; then
# every label's figures in run order (take the median). Stops the lab's own
# tproxy first (lab down still cleans up after it).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
T=${TPROXY:-$REPO/target/release/tproxy}
CG=/sys/fs/cgroup/unified/tproxy-lab
SRV=/run/netns/tproxy-lab-server
SZ=${SZ:-64K}; REPS=${REPS:-3}; DUR=${DUR:-3}; PIN=${PIN:-0}
[ -e "$SRV" ] || { echo "the lab is not up: cargo xtask lab up" >&2; exit 1; }
. "$REPO/lab/experiments/lib.sh"
# Without PIN the servers get every CPU back (a PIN=1 run leaves them pinned).
last=$(( $(nproc) - 1 )); WRAP=(); cpus=0-$last
[ "$PIN" = 1 ] && { WRAP=(taskset -c 0); cpus=$last; }
for who in envoy haproxy ours iperf3; do
  p=$(lab_pid $who)
  if [ -n "$p" ]; then taskset -a -pc "$cpus" "$p" >/dev/null; fi
done
old=$(lab_pid tproxy)
if [ -n "$old" ]; then stop_proc "$old"; fi
TP=
trap '[ -n "$TP" ] && kill -TERM $TP 2>/dev/null; wait' EXIT
declare -A figs
for r in $(seq "$REPS"); do
  for spec in "$@"; do
    label=${spec%%:*}; flags=${spec#*:}; bin=$T
    if [[ $flags == @* ]]; then bin=${flags%% *}; bin=${bin#@}; [[ $flags == *" "* ]] && flags=${flags#* } || flags=""; fi
    # shellcheck disable=SC2086
    nsenter --net=$SRV "$bin" -i eth0 -ports 8000,5201,11111 --cgroup $CG --drain-timeout 0 $flags \
      >/tmp/ab_iperf-tproxy.log 2>&1 & TP=$!
    sleep 0.7
    check_running $TP /tmp/ab_iperf-tproxy.log
    bps=$(ip netns exec tproxy-lab-client "${WRAP[@]}" iperf3 -c 192.168.178.10 -p 5201 -l "$SZ" -t "$DUR" -J |
      python3 -c "import json,sys;d=json.load(sys.stdin)
sys.exit('iperf3: '+d['error']) if 'error' in d else print(round(d['end']['sum_received']['bits_per_second']/1e9,3))")
    # The run's own binary reads its maps (their layout follows the build).
    c=$(nsenter --net=$SRV "$bin" stats --json | python3 -c "import json,sys
d=json.load(sys.stdin)[0]['counters']
print(*(f'{k}={d.get(k,0)}' for k in ['msg_redirected','msg_passthrough','accel_fallbacks','accel_left','accel_small_messages']))")
    kill -TERM $TP; wait $TP || true; TP=
    echo "$r $label $SZ $bps $c"
    figs[$label]="${figs[$label]:-} $bps"
  done
done
for l in "${!figs[@]}"; do echo "$l:${figs[$l]}"; done
