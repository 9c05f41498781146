#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (a C
# compiler and python3 for the tests of libm3ipc and its Python package; a working criu for
# the migration tests; etcd for the etcd-directory tests, which start their own
# servers, and protoc, which building the etcd client needs), then checks formatting and lints
# and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain (stable) first, e.g. with rustup" >&2
    exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "the test suite needs root: criu checkpoints processes and the node kernel copies between address spaces" >&2
    exit 1
fi

log "system packages"
missing=()
for cmd in unshare setsid nsenter; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=(util-linux)
done
# The C library's tests compile C programs with the system's compiler. The Python package's
# tests run python3 (ctypes only: no Python package is needed beyond the standard library)
# and pip-install the package into a fresh venv, which Debian's python3 makes only with
# python3-venv (it brings pip into the venv; the package's build backend is its own, so
# neither setuptools nor wheel is needed).
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
scripts/install-criu.sh
scripts/install-etcd.sh

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "build"
cargo build --workspace --all-targets --quiet

log "tests"
# Every test binary runs even when one fails, so that one run shows every failure.
status=0
cargo test --workspace --quiet --no-fail-fast 2>&1 | tee target/test-output.txt || status=$?
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' target/test-output.txt
exit "$status"
