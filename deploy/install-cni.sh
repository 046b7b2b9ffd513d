#!/bin/sh
# Installs tproxy's CNI plugin on a Kubernetes node: the init container of
# the tproxy DaemonSet runs it (deploy/kubernetes/daemonset.yaml).
#
#   install-cni.sh [install]   copy tproxy-cni into the CNI bin dir, chain it
#                              after the pod network's plugins
#   install-cni.sh uninstall   take the tproxy-cni entry out again (the
#                              binary stays: a pod being torn down may call
#                              it for DEL)
#
# The pod network's config is the file the runtime uses: the first of
# *.conf, *.conflist, *.json in the net dir in byte order (libcni's rule),
# or $CNI_CONF_NAME. It must be a conflist (a "plugins" list). The entry is
# appended to that list once (a second run changes nothing), the original
# is kept beside it as NAME.tproxy-orig (a name the runtime ignores) and
# the new file replaces the old one by rename(2), so the runtime never
# reads half a file.
#
# POSIX sh and awk only (busybox, dash, mawk): the image has no jq and no
# python. The awk below is a small JSON scanner: it tracks strings (with
# escapes) and nesting, so brackets or keys inside strings, or a "plugins"
# key nested in a plugin's own config, do not confuse it.
#
# Environment (the defaults are the DaemonSet's host mounts):
#   CNI_BIN_DIR=/host/opt/cni/bin  CNI_NET_DIR=/host/etc/cni/net.d
#   CNI_CONF_NAME (a file name in CNI_NET_DIR)  TPROXY_CNI_BIN=/usr/local/bin/tproxy-cni
#   The entry's node-wide defaults (each pod's tproxy.io/* annotations win):
#   TPROXY_AGENT_SOCKET=/run/tproxy/agent.sock TPROXY_PORTS=8000
#   TPROXY_PROXY_PORT=15006 TPROXY_PROXY_MARK=1337 TPROXY_ACCEL=true
#   TPROXY_CGROUP (unset: no "cgroup" key): the pod's cgroup for runtimes
#   that do not pass cgroupPath, ${NAME} standing for a CNI_ARGS value
#   (/kubepods/pod${K8S_POD_UID})
set -eu

CNI_BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
CNI_NET_DIR=${CNI_NET_DIR:-/host/etc/cni/net.d}
TPROXY_CNI_BIN=${TPROXY_CNI_BIN:-/usr/local/bin/tproxy-cni}
TPROXY_AGENT_SOCKET=${TPROXY_AGENT_SOCKET:-/run/tproxy/agent.sock}
TPROXY_PORTS=${TPROXY_PORTS:-8000}
TPROXY_PROXY_PORT=${TPROXY_PROXY_PORT:-15006}
TPROXY_PROXY_MARK=${TPROXY_PROXY_MARK:-1337}
TPROXY_ACCEL=${TPROXY_ACCEL:-true}
TPROXY_CGROUP=${TPROXY_CGROUP:-}

die() {
	echo "install-cni: $*" >&2
	exit 1
}

# The values go into JSON unquoted or quoted as they are: only accept what
# cannot break it.
check_env() {
	case $TPROXY_PORTS in '' | *[!0-9,-]*) die "TPROXY_PORTS=$TPROXY_PORTS: want ports and ranges like 8000,9000-9010" ;; esac
	case $TPROXY_PROXY_PORT in '' | *[!0-9]*) die "TPROXY_PROXY_PORT=$TPROXY_PROXY_PORT: want a port number" ;; esac
	case $TPROXY_PROXY_MARK in '' | *[!0-9]*) die "TPROXY_PROXY_MARK=$TPROXY_PROXY_MARK: want a decimal number" ;; esac
	case $TPROXY_ACCEL in true | false) ;; *) die "TPROXY_ACCEL=$TPROXY_ACCEL: want true or false" ;; esac
	case $TPROXY_AGENT_SOCKET in /*) ;; *) die "TPROXY_AGENT_SOCKET=$TPROXY_AGENT_SOCKET: want an absolute path" ;; esac
	case $TPROXY_AGENT_SOCKET in *[\"\\]*) die "TPROXY_AGENT_SOCKET: no quotes or backslashes" ;; esac
	case $TPROXY_CGROUP in *[!A-Za-z0-9_./\$\{\}-]*) die "TPROXY_CGROUP=$TPROXY_CGROUP: want a cgroup path like /kubepods/pod\${K8S_POD_UID}" ;; esac
}

# The runtime's config file: libcni loads *.conf, *.conflist and *.json in
# byte order and uses the first.
find_conf() {
	if [ -n "${CNI_CONF_NAME:-}" ]; then
		[ -f "$CNI_NET_DIR/$CNI_CONF_NAME" ] || die "CNI_CONF_NAME=$CNI_CONF_NAME: no such file in $CNI_NET_DIR"
		echo "$CNI_NET_DIR/$CNI_CONF_NAME"
		return
	fi
	first=$(cd "$CNI_NET_DIR" && for f in *.conf *.conflist *.json; do
		[ -f "$f" ] && echo "$f"
	done | LC_ALL=C sort | head -n 1)
	[ -n "$first" ] || die "no CNI config (*.conf, *.conflist, *.json) in $CNI_NET_DIR: install the pod network first; this container is retried"
	echo "$CNI_NET_DIR/$first"
}

# scan MODE FILE: the JSON scanner. MODE "find" prints "present" or
# "absent" (a plugin whose "type" is "tproxy-cni" in the top-level
# "plugins" list); "add" prints the file with ENTRY appended to that list;
# "del" prints it without the tproxy-cni plugin. Exit 3: no plugins list.
scan() {
	awk -v mode="$1" -v entry="${ENTRY:-}" '
	{ text = text $0 "\n" }
	END {
		n = length(text); depth = 0; instr = 0; esc = 0; last = ""
		key1 = ""; key3 = ""; inpl = 0; opn = 0; cls = 0
		elem_start = 0; elem_end = 0; last_sig_pos = 0; found_start = 0; found_end = 0
		for (i = 1; i <= n; i++) {
			c = substr(text, i, 1)
			if (instr) {
				if (esc) { esc = 0; s = s c; continue }
				if (c == "\\") { esc = 1; s = s c; continue }
				if (c != "\"") { s = s c; continue }
				instr = 0
				# A string after ":" is a value, else a key.
				if (last == ":") {
					if (inpl && depth == 3 && key3 == "type" && s == "tproxy-cni") istproxy = 1
				} else {
					if (depth == 1) key1 = s
					if (depth == 3) key3 = s
				}
				last = "\""; last_sig_pos = i
				continue
			}
			if (c == " " || c == "\t" || c == "\r" || c == "\n") continue
			if (c == "\"") { instr = 1; s = ""; continue }
			if (c == "{" || c == "[") {
				if (c == "[" && depth == 1 && last == ":" && key1 == "plugins" && !opn) {
					inpl = 1; opn = i
				}
				depth++
				if (inpl && depth == 3 && c == "{") { elem_start = i; istproxy = 0; key3 = "" }
			} else if (c == "}" || c == "]") {
				if (inpl && depth == 3 && c == "}" && istproxy && !found_start) {
					found_start = elem_start; found_end = i
				}
				depth--
				if (inpl && depth == 1) { inpl = 0; cls = i; before_close = last_sig_pos }
			}
			last = c; last_sig_pos = i
		}
		if (!opn || !cls) exit 3
		if (mode == "find") { print (found_start ? "present" : "absent"); exit 0 }
		if (mode == "add") {
			# After the last element (or right after "[" when empty).
			sep = (before_close == opn) ? "" : ","
			printf "%s", substr(text, 1, before_close) sep "\n    " entry "\n  " substr(text, cls)
			exit 0
		}
		if (mode == "del") {
			if (!found_start) { printf "%s", text; exit 0 }
			# Take out the element and one comma next to it.
			from = found_start; to = found_end
			p = from - 1
			while (p > opn && substr(text, p, 1) ~ /[ \t\r\n]/) p--
			if (substr(text, p, 1) == ",") {
				from = p
			} else {
				q = to + 1
				while (q < cls && substr(text, q, 1) ~ /[ \t\r\n]/) q++
				if (substr(text, q, 1) == ",") to = q
			}
			printf "%s", substr(text, 1, from - 1) substr(text, to + 1)
			exit 0
		}
	}' "$2"
}

# replace FILE MODE: FILE rewritten by scan MODE, through a temp file in
# the same directory (same mode) and rename(2).
replace() {
	tmp="$(dirname "$1")/.$(basename "$1").tproxy-tmp"
	cp -p "$1" "$tmp"
	if ! scan "$2" "$1" >"$tmp"; then
		rm -f "$tmp"
		die "$1: cannot rewrite it"
	fi
	mv -f "$tmp" "$1"
}

install_binary() {
	[ -f "$TPROXY_CNI_BIN" ] || die "$TPROXY_CNI_BIN: no such file (the image's tproxy-cni)"
	[ -d "$CNI_BIN_DIR" ] || die "$CNI_BIN_DIR: no such directory (the host's /opt/cni/bin mount)"
	# Rename over the old binary: a copy onto it would fail (ETXTBSY) or
	# corrupt it while the runtime executes it.
	tmp="$CNI_BIN_DIR/.tproxy-cni.tmp"
	cp "$TPROXY_CNI_BIN" "$tmp"
	chmod 0755 "$tmp"
	mv -f "$tmp" "$CNI_BIN_DIR/tproxy-cni"
	echo "install-cni: installed $CNI_BIN_DIR/tproxy-cni"
}

conf_state() {
	state=$(scan find "$1") || {
		rc=$?
		[ "$rc" -eq 3 ] && die "$1 is not a conflist (no \"plugins\" list): tproxy-cni can only be chained in a conflist; convert it or set CNI_CONF_NAME"
		die "$1: cannot parse it"
	}
	echo "$state"
}

do_install() {
	check_env
	install_binary
	conf=$(find_conf)
	# An assignment, not a test: set -e must see a failure.
	state=$(conf_state "$conf")
	if [ "$state" = present ]; then
		echo "install-cni: $conf already chains tproxy-cni: unchanged"
		return
	fi
	cgroup=
	[ -z "$TPROXY_CGROUP" ] || cgroup=", \"cgroup\": \"$TPROXY_CGROUP\""
	ENTRY="{\"type\": \"tproxy-cni\", \"agentSocket\": \"$TPROXY_AGENT_SOCKET\", \"ports\": \"$TPROXY_PORTS\", \"proxyPort\": $TPROXY_PROXY_PORT, \"proxyMark\": $TPROXY_PROXY_MARK, \"accel\": $TPROXY_ACCEL$cgroup, \"capabilities\": {\"io.kubernetes.cri.pod-annotations\": true, \"cgroupPath\": true}}"
	export ENTRY
	# The pod network's own file, once: a later run must not overwrite it
	# with one that already has our entry.
	[ -e "$conf.tproxy-orig" ] || cp -p "$conf" "$conf.tproxy-orig"
	replace "$conf" add
	echo "install-cni: chained tproxy-cni in $conf (original: $conf.tproxy-orig)"
}

do_uninstall() {
	conf=$(find_conf)
	state=$(conf_state "$conf")
	if [ "$state" = absent ]; then
		echo "install-cni: $conf does not chain tproxy-cni: unchanged"
		return
	fi
	replace "$conf" del
	echo "install-cni: removed tproxy-cni from $conf"
}

case ${1:-install} in
install) do_install ;;
uninstall) do_uninstall ;;
*) die "usage: install-cni.sh [install|uninstall]" ;;
esac
