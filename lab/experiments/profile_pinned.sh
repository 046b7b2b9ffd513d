#!/bin/bash
# Where each vCPU's time goes at one iperf3 write size, with and without
# acceleration, placed like `cargo xtask bench --pin`: the client on CPU 0;
# Envoy's threads and the app (iperf3 -s) on CPU 1. perf record -a for 3 s
# in the middle of a 6 s run, then per CPU how busy it was and, for CPU 1,
# what its samples were.
#
#   cargo xtask lab up            # Envoy
#   REPS=3 SZ=64K lab/experiments/profile_pinned.sh
#   cargo xtask lab down
#
# The lab's tproxy is stopped first; tproxy is started per run (as
# ab_iperf.sh does). Leaves its perf data in $OUT (default /tmp/tproxy-profile).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
T=${TPROXY:-$REPO/target/release/tproxy}
SZ=${SZ:-64K}; REPS=${REPS:-3}; OUT=${OUT:-/tmp/tproxy-profile}
mkdir -p "$OUT"
[ -e /run/netns/tproxy-lab-server ] || { echo "the lab is not up: cargo xtask lab up" >&2; exit 1; }
. "$REPO/lab/experiments/lib.sh"
EP=$(lab_pid envoy)
AP=$(lab_pid iperf3)
[ -n "$EP" ] && [ -n "$AP" ] || { echo "the lab runs no Envoy or no iperf3: cargo xtask lab down; cargo xtask lab up" >&2; exit 1; }
for t in /proc/"$EP"/task/*; do taskset -pc 1 "${t##*/}" >/dev/null; done
taskset -pc 1 "$AP" >/dev/null
old=$(lab_pid tproxy)
if [ -n "$old" ]; then stop_proc "$old"; fi
TP=
trap '[ -n "$TP" ] && kill -TERM $TP 2>/dev/null; wait' EXIT
for r in $(seq "$REPS"); do
  for mode in noaccel accel; do
    flags=; [ $mode = noaccel ] && flags=--no-accel
    # shellcheck disable=SC2086
    nsenter --net=/run/netns/tproxy-lab-server "$T" -i eth0 -ports 8000,5201,11111 \
      --cgroup /sys/fs/cgroup/unified/tproxy-lab --drain-timeout 0 $flags >/dev/null 2>&1 & TP=$!
    sleep 0.7
    ip netns exec tproxy-lab-client taskset -c 0 iperf3 -c 192.168.178.10 -p 5201 -l "$SZ" -t 6 -J \
      > "$OUT/$mode-$r.json" &
    IP=$!
    sleep 1.5
    perf record -q -a -g -o "$OUT/$mode-$r.data" -- sleep 3 2>/dev/null
    wait $IP
    c=$(nsenter --net=/run/netns/tproxy-lab-server "$T" stats --json | python3 -c "import json,sys
d=json.load(sys.stdin)[0]['counters']
print(*(f'{k}={d.get(k,0)}' for k in ['msg_redirected','msg_passthrough','accel_fallbacks','accel_resumed','accel_left']))")
    kill -TERM $TP; wait $TP || true; TP=
    echo "$r $mode counters: $c"
    python3 - "$OUT" "$mode" "$r" <<'PY'
import collections, json, subprocess, sys
out, mode, r = sys.argv[1:]
gbps = json.load(open(f'{out}/{mode}-{r}.json'))['end']['sum_received']['bits_per_second'] / 1e9
text = subprocess.run(['perf', 'script', '-i', f'{out}/{mode}-{r}.data', '-F', 'comm,cpu,ip,sym'],
                      capture_output=True, text=True).stdout
busy = collections.Counter(); what = collections.Counter(); cpu1 = 0
for block in text.split('\n\n'):
    lines = [l.strip() for l in block.strip().split('\n') if l.strip()]
    if not lines:
        continue
    head = lines[0].split()
    cpu = next(p for p in head if p.startswith('['))
    comm = ' '.join(head[:head.index(cpu)])
    if not comm.startswith('swapper'):
        busy[cpu] += 1
    if cpu != '[001]':
        continue
    cpu1 += 1
    syms = [l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else '' for l in lines[1:]]
    leaf, stack = (syms[0] if syms else ''), ' '.join(syms)
    who = 'Envoy' if comm.startswith('wrk') else 'app' if comm == 'iperf3' else 'other'
    if 'copy_to_iter' in leaf or 'copy_from_iter' in leaf or 'copy_page_' in leaf:
        k = 'copies'
    elif 'unlock_irq' in leaf:
        k = 'irq enable (wake-up IPIs)'
    elif 'finish_task_switch' in leaf:
        k = 'context switch'
    elif 'tcp_bpf' in stack or 'sk_msg' in stack or 'bpf_prog' in stack or 'sk_psock' in stack:
        k = 'sockmap path and eBPF'
    elif any(x in stack for x in ('ip_finish_output', '__dev_queue_xmit', 'tcp_v4_rcv', 'net_rx_action',
                                  'tcp_ack', '__tcp_transmit_skb', 'tcp_write_xmit', 'tcp_rcv_established')):
        k = 'TCP/IP stack'
    elif leaf.startswith('0x') or '[unknown]' in leaf:
        k = 'user space'
    else:
        k = 'other kernel'
    what[(who, k)] += 1
# perf's default 4000 Hz for 3 s: 12,000 samples is a CPU busy throughout.
print(f'{r} {mode} {gbps:.2f} Gbit/s; busy: CPU 0 {busy["[000]"] / 120:.0f} %, '
      f'CPU 1 {busy["[001]"] / 120:.0f} %')
for (who, k), v in sorted(what.items(), key=lambda x: -x[1]):
    if v >= 120:
        print(f'    CPU 1 {who:6s} {k:28s} {v / 120:4.0f} % of the CPU')
PY
  done
done
