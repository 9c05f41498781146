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
# it; otherwise (a venv, pyenv, ...) it goes into that interpreter. Nothing is downloaded:
# pip builds the package with the setuptools already installed (--no-build-isolation), and
# where that cannot build a wheel the pure-Python package is copied into site-packages.
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

if [ "$python" = yes ]; then
    py=${PYTHON:-python3}
    managed=$("$py" -c 'import sys, sysconfig, os; print(int(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
    if [ "$managed" = 1 ]; then
        venv="$prefix/lib/m3ipc/venv"
        "$py" -m venv --system-site-packages "$venv"
        py="$venv/bin/python"
        echo "the system's Python is externally managed (PEP 668): using the venv $venv"
    fi
    # pip needs setuptools with bdist_wheel (setuptools >= 70.1, or the wheel package) to
    # build without downloading; the package is pure Python, so without them it is copied.
    if ! "$py" -m pip install --quiet --no-build-isolation --no-index ./python 2>/dev/null; then
        site=$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
        rm -rf "$site/m3ipc"
        cp -r python/m3ipc "$site/m3ipc"
        echo "pip could not build offline here (no wheel support in setuptools): copied the package into $site"
    fi
    echo "installed the Python package m3ipc for $py (set M3IPC_LIB=$prefix/lib/libm3ipc.so if $prefix/lib is not on the library path)"
fi
