#!/usr/bin/env bash
# install-criu.sh — make a working CRIU (>= 4.2) available for dvs, without touching the
# system libc. See shared/DESIGN.md §5 for why:
#   * Debian bookworm's criu 3.17 fails `criu check` on kernels >= 6.13 (vDSO layout), and
#     criu before 4.2 cannot dump TCP or UDP sockets on kernels >= 6.16;
#   * Debian forky's criu 4.2.1 works when started through forky's own dynamic loader from a
#     private prefix, so we download forky's `criu`, `libcompel1` and `libc6` with a private apt
#     state, unpack them with `dpkg -x` into PREFIX and write a wrapper PREFIX/bin/criu.
#   * the other shared libraries criu needs (libnl, libnftables, libprotobuf-c, ...) come from
#     the system's own packages, installed with apt-get if missing, when they are ABI compatible
#     (checked below by resolving every symbol eagerly). Those the system does not ship under
#     the same soname (forky's libnet9), or ships older than criu was built against (libnl-3),
#     are taken from the foreign suite into the prefix as well.
#
# Idempotent, non-interactive, run as root. Does nothing if a criu >= 4.2 that passes
# `criu check` is already on PATH or at the prefix.
#
# Environment:
#   DVS_CRIU_PREFIX   private prefix (default /opt/dvs/criu); the wrapper is PREFIX/bin/criu
#   DVS_CRIU_SUITE    Debian suite to take criu from (default forky)
#   DVS_CRIU_FORCE=1  reinstall even if a working criu is found
set -euo pipefail

PREFIX="${DVS_CRIU_PREFIX:-/opt/dvs/criu}"
SUITE="${DVS_CRIU_SUITE:-forky}"
MIN_MAJOR=4
MIN_MINOR=2
WRAPPER="$PREFIX/bin/criu"

log() { printf 'install-criu: %s\n' "$*" >&2; }
die() {
	printf 'install-criu: error: %s\n' "$*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, dpkg and criu need it)"
export DEBIAN_FRONTEND=noninteractive

# version_ok BIN: true if BIN --version reports >= MIN_MAJOR.MIN_MINOR.
version_ok() {
	local v major minor
	v="$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1)" || return 1
	[ -n "$v" ] || return 1
	major="${v%%.*}"
	minor="${v#*.}"
	minor="${minor%%.*}"
	case "$major$minor" in *[!0-9]*) return 1 ;; esac
	[ "$major" -gt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "$minor" -ge "$MIN_MINOR" ]; }
}

# criu_ok BIN: true if BIN is criu >= MIN_MAJOR.MIN_MINOR and `criu check` says "Looks good.".
criu_ok() {
	[ -x "$1" ] || return 1
	version_ok "$1" || return 1
	"$1" check 2>&1 | grep -q 'Looks good\.'
}

report() {
	local bin="$1"
	echo "criu: $bin"
	"$bin" --version
	"$bin" check 2>&1 | grep -v 'kdat cache' || true
}

# criu keeps what it probes of the kernel (vDSO layout, features: 15-30 ms of every dump and
# restore) in /run/criu.kdat, but saves it only when /run is a tmpfs, which it is not on every
# machine. There, probe once in a private mount namespace with a tmpfs /run and put the result
# where criu loads it from. Refreshed on every run, so a new kernel gets a new cache.
prime_kdat_cache() {
	local bin="$1" tmp
	[ "$(stat -f -c %T /run 2>/dev/null)" = tmpfs ] && return 0
	tmp="$(mktemp /run/.criu.kdat.XXXXXX)" || return 0
	# shellcheck disable=SC2016 # $1 is expanded by the inner shell, on purpose.
	if unshare --mount --propagation private sh -c 'mount -t tmpfs none /run && "$1" check >/dev/null 2>&1; cat /run/criu.kdat' sh "$bin" >"$tmp" 2>/dev/null && [ -s "$tmp" ]; then
		mv -f "$tmp" /run/criu.kdat
		log "primed criu's kernel-feature cache /run/criu.kdat"
	else
		rm -f "$tmp"
		log "could not prime /run/criu.kdat (criu still works, about 30 ms slower per dump or restore)"
	fi
}

if [ "${DVS_CRIU_FORCE:-0}" != 1 ]; then
	for cand in "$WRAPPER" "$(command -v criu 2>/dev/null || true)"; do
		[ -n "$cand" ] || continue
		if criu_ok "$cand"; then
			log "a working criu is already available; nothing to install"
			prime_kdat_cache "$cand"
			report "$cand"
			exit 0
		fi
	done
fi

# Serialise concurrent runs (e.g. two test jobs) on the same prefix.
mkdir -p "$(dirname "$PREFIX")"
exec 9>"$PREFIX.lock"
flock 9

# --- find the Debian mirror the system already uses -----------------------------------------
# Never hard-code a mirror: take the URI of the system's main Debian archive (the stanza or
# line whose suite is the system's codename, not -security) from its own apt sources.
codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release | tr -d '"' | head -n1)"
[ -n "$codename" ] || die "cannot read VERSION_CODENAME from /etc/os-release"

find_mirror() {
	local f
	# deb822 *.sources: fields are grouped in stanzas separated by blank lines.
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -r "$f" ] || continue
		awk -v cn="$codename" '
			function flush() {
				if (uris != "" && types ~ /(^|[ \t])deb([ \t]|$)/ && enabled !~ /^[ \t]*no/ &&
				    (" " suites " ") ~ (" " cn "([ \t]|-updates|$)") && (" " suites " ") !~ /-security/) {
					split(uris, u, /[ \t]+/); for (i in u) if (u[i] != "") { print u[i] "\t" signed; break }
				}
				uris = ""; types = ""; suites = ""; enabled = ""; signed = ""
			}
			/^[ \t]*#/ { next }
			/^[ \t]*$/ { flush(); next }
			tolower($1) == "uris:"      { sub(/^[^:]*:[ \t]*/, ""); uris = $0; next }
			tolower($1) == "types:"     { sub(/^[^:]*:[ \t]*/, ""); types = $0; next }
			tolower($1) == "suites:"    { sub(/^[^:]*:[ \t]*/, ""); suites = " " $0 " "; next }
			tolower($1) == "enabled:"   { sub(/^[^:]*:[ \t]*/, ""); enabled = tolower($0); next }
			tolower($1) == "signed-by:" { sub(/^[^:]*:[ \t]*/, ""); signed = $0; next }
			END { flush() }
		' "$f"
	done
	# one-line format: deb [opts] URI SUITE COMPONENT...
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -r "$f" ] || continue
		awk -v cn="$codename" '
			/^[ \t]*deb[ \t]/ {
				i = 2; signed = ""
				if ($2 ~ /^\[/) {
					while (i <= NF) {
						if ($i ~ /^\[?signed-by=/) { signed = $i; sub(/^\[?signed-by=/, "", signed); sub(/\]$/, "", signed) }
						if ($i ~ /\]$/) { i++; break }
						i++
					}
				}
				uri = $i; suite = $(i + 1)
				if (suite == cn || suite == cn "-updates") print uri "\t" signed
			}
		' "$f"
	done
}

mirror_line="$(find_mirror | head -n1)"
[ -n "$mirror_line" ] || die "no Debian '$codename' source found in /etc/apt/sources.list{,.d/*} to derive a mirror from"
MIRROR="${mirror_line%%$'\t'*}"
SIGNED_BY="${mirror_line#*$'\t'}"
# Signed-By may be an inline key block in deb822; only reuse it when it is a keyring file.
if [ -z "$SIGNED_BY" ] || [ ! -f "$SIGNED_BY" ]; then
	SIGNED_BY=/usr/share/keyrings/debian-archive-keyring.gpg
fi
log "using mirror $MIRROR (from the system's apt sources), suite $SUITE, keyring $SIGNED_BY"

# --- private apt state for the foreign suite ------------------------------------------------
WORK="$(mktemp -d /tmp/dvs-criu-install.XXXXXX)"
STAGE=""
cleanup() {
	rm -rf "$WORK"
	[ -z "$STAGE" ] || rm -rf "$STAGE"
}
trap cleanup EXIT
# apt drops privileges to _apt for downloads: let it reach the work dir.
chmod 755 "$WORK"
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs"
if id _apt >/dev/null 2>&1; then chown _apt "$WORK/debs" "$WORK/lists/partial" "$WORK/cache/archives/partial"; fi
echo "deb [signed-by=$SIGNED_BY] $MIRROR $SUITE main" >"$WORK/sources.list"

# Everything private: sources, lists, caches, pinning. Nothing of the system's apt state changes.
APT_OPTS=(
	-o "Dir::Etc::SourceList=$WORK/sources.list"
	-o "Dir::Etc::SourceParts=/nonexistent"
	-o "Dir::State::Lists=$WORK/lists"
	-o "Dir::Cache=$WORK/cache"
	-o "Dir::Etc::Preferences=/dev/null"
	-o "Dir::Etc::PreferencesParts=/nonexistent"
	-o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
	-o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
	-o "Acquire::Check-Valid-Until=false"
	-o "APT::Get::List-Cleanup=false"
)

apt_private_update() { apt-get "${APT_OPTS[@]}" -q update >"$WORK/update.log" 2>&1; }
if ! apt_private_update || grep -q '^[WE]:.*\(NO_PUBKEY\|not signed\|signature\)' "$WORK/update.log"; then
	# An old keyring may lack the newer release's keys: refresh it from the system's suite.
	log "apt update for $SUITE failed; refreshing debian-archive-keyring and retrying"
	apt-get -q update >/dev/null 2>&1 || true
	apt-get -y -q install debian-archive-keyring >/dev/null 2>&1 || true
	apt_private_update || {
		cat "$WORK/update.log" >&2
		die "apt-get update for $SUITE from $MIRROR failed"
	}
fi

log "downloading criu libcompel1 libc6 from $SUITE"
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -q download criu libcompel1 libc6 >"$WORK/download.log" 2>&1) || {
	cat "$WORK/download.log" >&2
	die "apt-get download of $SUITE criu/libcompel1/libc6 failed"
}

# --- unpack into a staging copy of the prefix, then swap it in ------------------------------
STAGE="$PREFIX.new.$$"
rm -rf "$STAGE"
mkdir -p "$STAGE"
for deb in "$WORK"/debs/*.deb; do
	dpkg -x "$deb" "$STAGE"
done

# The multiarch triplet and loader name come from what libc6 actually shipped.
libc_path="$(find "$STAGE/usr/lib" -maxdepth 2 -name libc.so.6 | head -n1)"
[ -n "$libc_path" ] || die "libc.so.6 not found in the unpacked $SUITE libc6"
TRIPLET="$(basename "$(dirname "$libc_path")")"
LOADER_NAME="$(find "$STAGE/usr/lib/$TRIPLET" -maxdepth 1 -name 'ld-linux*.so.*' -printf '%f\n' | head -n1)"
[ -n "$LOADER_NAME" ] || die "dynamic loader not found in $STAGE/usr/lib/$TRIPLET"
[ -x "$STAGE/usr/sbin/criu" ] || die "criu binary not found in the unpacked $SUITE criu package"

write_wrapper() { # $1 = prefix baked into the wrapper, $2 = file to write
	mkdir -p "$(dirname "$2")"
	cat >"$2" <<EOF
#!/bin/sh
# Generated by dvs scripts/install-criu.sh: run $SUITE's criu through $SUITE's own dynamic
# loader so that the system libc stays untouched (shared/DESIGN.md §5).
exec "$1/usr/lib/$TRIPLET/$LOADER_NAME" --library-path "$1/usr/lib/$TRIPLET:/lib/$TRIPLET:/usr/lib/$TRIPLET" "$1/usr/sbin/criu" "\$@"
EOF
	chmod 755 "$2"
}
write_wrapper "$STAGE" "$STAGE/bin/criu"

# --- system (bookworm) libraries criu needs -------------------------------------------------
# Take criu's Depends from the foreign suite, drop what the prefix carries, and map the t64
# transition names back (libgnutls30t64 -> libgnutls30): same sonames.
mapfile -t deps < <(apt-cache "${APT_OPTS[@]}" depends criu 2>/dev/null |
	sed -n 's/^ *Depends: *//p' | tr -d '<>' | sed 's/t64$//' | sort -u |
	grep -v -x -e libc6 -e libcompel1 || true)
if [ "${#deps[@]}" -eq 0 ]; then
	# apt-cache gave nothing: fall back to what criu 4.2.1 was found to need.
	deps=(libbsd0 libgnutls30 libnet9 libnftables1 libnl-3-200 libprotobuf-c1 libuuid1)
fi
missing=()
foreign=()
for p in "${deps[@]}"; do
	if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		continue
	fi
	# A library whose soname the system's suite does not ship (e.g. forky's libnet9 where
	# bookworm has libnet1) comes from the foreign suite into the prefix, like libc6.
	if apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: (none)' || [ -z "$(apt-cache policy "$p" 2>/dev/null)" ]; then
		foreign+=("$p")
	else
		missing+=("$p")
	fi
done
# take_from_suite WHY PKG...: downloads PKGs from the foreign suite and unpacks them into the
# staged prefix, whose libraries come first on criu's library path.
take_from_suite() {
	local why="$1" p deb
	shift
	log "taking $* from $SUITE into the prefix ($why)"
	(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -q download "$@" >"$WORK/download-more.log" 2>&1) || {
		cat "$WORK/download-more.log" >&2
		die "apt-get download of $SUITE $* failed"
	}
	for p in "$@"; do
		for deb in "$WORK"/debs/"$p"_*.deb; do dpkg -x "$deb" "$STAGE"; done
	done
}
if [ "${#foreign[@]}" -gt 0 ]; then
	take_from_suite "not in the system's suite" "${foreign[@]}"
fi
if [ "${#missing[@]}" -gt 0 ]; then
	log "installing system packages criu needs: ${missing[*]}"
	if ! apt-get -y -q install --no-install-recommends "${missing[@]}" >"$WORK/install.log" 2>&1; then
		# Fresh machine: the system's package lists may be missing or stale.
		apt-get -q update >/dev/null 2>&1 || true
		apt-get -y -q install --no-install-recommends "${missing[@]}" >"$WORK/install.log" 2>&1 || {
			cat "$WORK/install.log" >&2
			die "apt-get install ${missing[*]} failed"
		}
	fi
fi

# A system library older than the one criu was built against loads, but the loader warns
# ("no version information available") on every run: take those from the foreign suite too.
mapfile -t stale_libs < <(LD_BIND_NOW=1 "$STAGE/bin/criu" --version 2>&1 >/dev/null |
	sed -n 's/^.*: \(\/[^:]*\): no version information available.*$/\1/p' | sort -u)
stale_pkgs=()
for lib in "${stale_libs[@]}"; do
	pkg="$(dpkg -S "$lib" 2>/dev/null | head -n1 | cut -d: -f1)" || true
	[ -z "$pkg" ] || stale_pkgs+=("$pkg")
done
if [ "${#stale_pkgs[@]}" -gt 0 ]; then
	take_from_suite "the system's copy is older than criu's" "${stale_pkgs[@]}"
fi

# Resolve every symbol now (LD_BIND_NOW) so an ABI gap between the foreign criu and a system
# library shows up here, not in the middle of a migration.
if ! out="$(LD_BIND_NOW=1 "$STAGE/bin/criu" --version 2>&1)"; then
	"$STAGE/usr/lib/$TRIPLET/$LOADER_NAME" --library-path "$STAGE/usr/lib/$TRIPLET:/lib/$TRIPLET:/usr/lib/$TRIPLET" --list "$STAGE/usr/sbin/criu" >&2 || true
	die "the unpacked criu does not load: $out"
fi

# Swap the staged prefix in, then rewrite the wrapper with the final paths.
if [ -e "$PREFIX" ]; then
	rm -rf "$PREFIX.old"
	mv "$PREFIX" "$PREFIX.old"
fi
mv "$STAGE" "$PREFIX"
STAGE=""
rm -rf "$PREFIX.old"
write_wrapper "$PREFIX" "$WRAPPER"

version_ok "$WRAPPER" || die "$WRAPPER --version does not report >= $MIN_MAJOR.$MIN_MINOR: $("$WRAPPER" --version 2>&1)"
check_out="$("$WRAPPER" check 2>&1 || true)"
if ! grep -q 'Looks good\.' <<<"$check_out"; then
	printf '%s\n' "$check_out" >&2
	die "$WRAPPER check did not say 'Looks good.'"
fi
log "installed"
prime_kdat_cache "$WRAPPER"
report "$WRAPPER"
