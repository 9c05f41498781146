#!/usr/bin/env bash
# Builds and installs libm3ipc (M3-IPC for C) into a prefix:
#   PREFIX/lib/libm3ipc.so, PREFIX/lib/libm3ipc.a, PREFIX/include/m3ipc.h,
#   PREFIX/lib/pkgconfig/m3ipc.pc
# and, with --python, the Python package m3ipc (ctypes over PREFIX/lib/libm3ipc.so).
#
#   scripts/install-clib.sh [--prefix DIR] [--python]      (default prefix /usr/local)
#   cc prog.c $(pkg-config --cflags --libs m3ipc)           (PKG_CONFIG_PATH=DIR/lib/pkgconfig
#                                                             for a prefix pkg-config does not search)
#
# Python and PEP 668: when the interpreter is "externally managed" (Debian's python3), the
# package goes into a virtual environment PREFIX/lib/m3ipc/venv (with the system's site
# packages visible) instead of the system's site-packages, and the script says how to use
# it; otherwise (a venv, pyenv, ...) it goes into that interpreter. The package is installed
# with `python -m pip install --no-index ./python`: its build backend is its own and needs
# only the standard library, so nothing is downloaded. What Debian's python3 lacks for that
# (python3-venv to make the venv, python3-pip) is installed with apt-get when the script runs
# as root, and named otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
python=no
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --python) python=yes; shift ;;
        *) echo "usage: $0 [--prefix DIR] [--python]" >&2; exit 2 ;;
    esac
done

cargo build --release -p m3ipc-c --quiet
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
out="$target_dir/release"

install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$out/libm3ipc_c.so" "$prefix/lib/libm3ipc.so"
install -m 0644 "$out/libm3ipc_c.a" "$prefix/lib/libm3ipc.a"
install -m 0644 crates/m3ipc-c/include/m3ipc.h "$prefix/include/m3ipc.h"
# What a static link needs besides the library (rustc's list for this target).
cat > "$prefix/lib/pkgconfig/m3ipc.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: m3ipc
Description: M3-IPC for C programs on dvs (the DVK's calls)
Version: 0.1.0
Cflags: -I\${includedir}
Libs: -L\${libdir} -lm3ipc
Libs.private: -lpthread -ldl -lm -lrt -lutil
PC
if [ "$(id -u)" -eq 0 ] && command -v ldconfig >/dev/null 2>&1; then
    ldconfig "$prefix/lib" 2>/dev/null || true
fi
echo "installed libm3ipc, m3ipc.h and m3ipc.pc into $prefix"

# Installs Debian packages (as root, non-interactive; a no-op for those already installed),
# or says which to install.
system_packages() {
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing $* with apt-get"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
        fi
    else
        echo "install the packages $* first (e.g. sudo apt-get install $*)" >&2
        exit 1
    fi
}

if [ "$python" = yes ]; then
    py=${PYTHON:-python3}
    command -v "$py" >/dev/null 2>&1 || system_packages python3
    managed=$("$py" -c 'import sys, sysconfig, os; print(int(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
    if [ "$managed" = 1 ]; then
        # Debian's python3 makes venvs (with pip in them) only with python3-venv.
        "$py" -c 'import ensurepip, venv' 2>/dev/null || system_packages python3-venv
        venv="$prefix/lib/m3ipc/venv"
        "$py" -m venv --system-site-packages "$venv"
        py="$venv/bin/python"
        echo "the system's Python is externally managed (PEP 668): using the venv $venv"
    fi
    "$py" -m pip --version >/dev/null 2>&1 || system_packages python3-pip
    if ! "$py" -m pip --version >/dev/null 2>&1; then
        echo "$py has no pip: install pip for it, then run this script again" >&2
        exit 1
    fi
    # --force-reinstall: running the script again installs the repository's current files.
    "$py" -m pip install --quiet --no-index --force-reinstall ./python
    echo "installed the Python package m3ipc for $py (set M3IPC_LIB=$prefix/lib/libm3ipc.so if $prefix/lib is not on the library path)"
fi
