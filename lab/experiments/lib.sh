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
