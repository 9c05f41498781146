#!/usr/bin/env bash
# install-etcd.sh — make `etcd` (the server the etcd-directory tests start themselves) and
# `protoc` (which the etcd-client crate needs at build time) available, from Debian's own
# packages `etcd-server` and `protobuf-compiler`, through the system's apt sources. protoc also
# needs the well-known types (google/protobuf/descriptor.proto, which etcd's protos import):
# they are in `libprotobuf-dev`, only a Recommends of protobuf-compiler.
#
# The package's own etcd service is never left running: the tests start their own servers on
# free loopback ports with private data dirs, and a system etcd on 2379 would only be a
# stray process that outlives the run. While installing, a policy-rc.d refuses every service
# start (unless one is already in place, as in Docker-style images); if the service runs
# anyway afterwards (systemd ignores policy-rc.d on some setups), it is stopped and disabled.
#
# Idempotent, non-interactive, run as root. Does nothing if both commands already work.
#
#   scripts/install-etcd.sh                 etcd and protoc (the test command)
#   scripts/install-etcd.sh --protoc-only   protoc alone: what building dvs needs (the demo)
#
# Environment:
#   DVS_ETCD_FORCE=1   reinstall even if both commands are found
set -euo pipefail

log() { printf 'install-etcd: %s\n' "$*" >&2; }
die() {
	printf 'install-etcd: error: %s\n' "$*" >&2
	exit 1
}

protoc_only=0
case "${1:-}" in
"") ;;
--protoc-only) protoc_only=1 ;;
*) die "unknown argument ${1} (usage: install-etcd.sh [--protoc-only])" ;;
esac

export DEBIAN_FRONTEND=noninteractive

report() {
	[ "$protoc_only" -eq 1 ] || echo "etcd: $(command -v etcd) ($(etcd --version 2>/dev/null | head -n1))"
	echo "protoc: $(command -v protoc) ($(protoc --version 2>/dev/null))"
}

# protoc_ok: protoc runs and finds the well-known types etcd-client's build imports.
protoc_ok() {
	command -v protoc >/dev/null 2>&1 || return 1
	local d rc
	d="$(mktemp -d /tmp/dvs-protoc-check.XXXXXX)" || return 1
	printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nimport "google/protobuf/struct.proto";\n' >"$d/check.proto"
	protoc --proto_path="$d" --descriptor_set_out=/dev/null "$d/check.proto" >/dev/null 2>&1
	rc=$?
	rm -rf "$d"
	return "$rc"
}

have_all() {
	{ [ "$protoc_only" -eq 1 ] || { command -v etcd >/dev/null 2>&1 && etcd --version >/dev/null 2>&1; }; } && protoc_ok
}

if [ "${DVS_ETCD_FORCE:-0}" != 1 ] && have_all; then
	log "what was asked for is already available; nothing to install"
	report
	exit 0
fi
[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get needs it)"

# Serialise concurrent runs (two test jobs) around apt, which locks itself but fails rather
# than waits when another apt holds the lock.
mkdir -p /run/lock
exec 9>/run/lock/dvs-install-etcd.lock
flock 9

pkgs=(protobuf-compiler libprotobuf-dev)
[ "$protoc_only" -eq 1 ] || pkgs=(etcd-server "${pkgs[@]}")
[ "${DVS_ETCD_FORCE:-0}" = 1 ] && reinstall=(--reinstall) || reinstall=()

# Forbid service starts for the duration of the install, and only then: remove our
# policy-rc.d (and only ours) on every way out.
POLICY=/usr/sbin/policy-rc.d
own_policy=0
WORK="$(mktemp -d /tmp/dvs-etcd-install.XXXXXX)"
cleanup() {
	[ "$own_policy" -eq 0 ] || rm -f "$POLICY"
	rm -rf "$WORK"
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
	printf '#!/bin/sh\n# written by dvs scripts/install-etcd.sh for one apt-get run\nexit 101\n' >"$POLICY"
	chmod 755 "$POLICY"
	own_policy=1
fi

log "installing ${pkgs[*]} with apt-get"
if ! apt-get -y -q install --no-install-recommends "${reinstall[@]}" "${pkgs[@]}" >"$WORK/install.log" 2>&1; then
	# Fresh machine: the system's package lists may be missing or stale.
	log "apt-get install failed; running apt-get update and retrying"
	apt-get -q update >"$WORK/update.log" 2>&1 || {
		cat "$WORK/update.log" >&2
		die "apt-get update failed"
	}
	apt-get -y -q install --no-install-recommends "${reinstall[@]}" "${pkgs[@]}" >"$WORK/install.log" 2>&1 || {
		cat "$WORK/install.log" >&2
		die "apt-get install ${pkgs[*]} failed"
	}
fi

# The package's service must not run: stop and disable it wherever an init system would have
# started it despite the policy. Only the service is addressed, never etcd processes by name,
# so a test's own etcd is never touched.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
	if systemctl is-active --quiet etcd 2>/dev/null; then
		log "the package started the etcd service; stopping it"
		systemctl stop etcd || true
	fi
	systemctl disable --quiet etcd 2>/dev/null || true
elif [ -x /etc/init.d/etcd ] && /etc/init.d/etcd status >/dev/null 2>&1; then
	log "the package started the etcd service; stopping it"
	/etc/init.d/etcd stop >/dev/null 2>&1 || true
fi

have_all || die "after installing ${pkgs[*]}: etcd does not run, or protoc cannot find google/protobuf/descriptor.proto"
log "installed"
report
