#!/usr/bin/env bash
# The main job, from a fresh Debian machine: builds dvs, makes criu work when running as root
# (else the demo uses the cooperative backend), and runs `dvs demo`: a local 3-node cluster,
# the paper's migration scenarios and a rollback, with a table beside the paper's figures.
# The demo's directory is the embedded one: no service to start. Building needs protoc (for
# the etcd client), which is installed if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain (stable) first, e.g. with rustup" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    scripts/install-etcd.sh --protoc-only >/dev/null
    scripts/install-criu.sh >/dev/null || echo "criu could not be installed; the demo will use the cooperative backend" >&2
elif ! command -v protoc >/dev/null 2>&1; then
    echo "protoc not found: building dvs needs it; run scripts/install-etcd.sh --protoc-only as root" >&2
    exit 1
fi
cargo build --release --workspace --quiet
exec target/release/dvs demo "$@"
