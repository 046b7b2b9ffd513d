# Sourced by the lab experiments.

# The PID of the lab's process NAME if that process still runs, else
# nothing. `cargo xtask lab up` records each process's start time (field
# 22 of /proc/PID/stat) beside its PID: by the time an experiment runs, a
# process the lab started may have exited and its PID gone to another
# (pid_max is 32768 on some hosts), which must not be signalled or pinned.
lab_pid() {
  local pid start now
  read -r pid start < <(awk -v w="$1" '$1==w{print $2, $3}' /run/tproxy-lab/pids 2>/dev/null) || true
  [ -n "${pid:-}" ] && [ -n "${start:-}" ] || return 0
  now=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f20) || true
  [ "$now" = "$start" ] && echo "$pid"
  return 0
}

# Stops a process the way `cargo xtask lab down` does: SIGTERM, and a
# second one that skips tproxy's drain; waits until it is gone (up to
# 10 s), so that the next tproxy finds the interface free.
stop_proc() {
  local p=$1 i
  kill -TERM "$p" 2>/dev/null || return 0
  sleep 0.2
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 100); do [ -e "/proc/$p" ] || return 0; sleep 0.1; done
  echo "pid $p did not exit" >&2; return 1
}

# Fails the experiment with the log if the tproxy just started ($1: PID,
# $2: its log) is not running (another instance on the interface, say).
check_running() {
  kill -0 "$1" 2>/dev/null && return 0
  echo "tproxy exited at start:" >&2; tail -5 "$2" >&2; exit 1
}
