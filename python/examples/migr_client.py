"""migr_client.py: the Python twin of migr-client (the paper's checking client).

    dvs run --dc dc0 --ep 2 --wait -- python3 migr_client.py --server 1 --iterations 1000 \
        --block-size 65536 [--json]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import m3ipc  # noqa: E402
from migr_common import (MTYPE_REFUSED, MTYPE_REPLY, MTYPE_REQUEST, W_ADDR,  # noqa: E402
                         W_COUNTER, W_SEQ, W_SIZE, pattern)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", type=int, required=True)
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--block-size", type=int, required=True)
    p.add_argument("--timeout-ms", type=int, default=m3ipc.TIMEOUT_FOREVER)
    p.add_argument("--wait-ms", type=int, default=30000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    m3ipc.bind(0, m3ipc.SELF)
    m3ipc.wait_for_bind(a.server, a.wait_ms)
    t = dict(ok=0, corrupt=0, lost=0, duplicated=0)
    first = last = None
    max_stall = 0.0
    start = time.monotonic()
    for seq in range(1, a.iterations + 1):
        # A fresh buffer every time: the server must fill memory this process never touched.
        buf = bytearray(a.block_size)
        addr, _ = m3ipc.address_of(buf) if a.block_size else (0, 0)
        req = m3ipc.Message(MTYPE_REQUEST)
        req.set_word(W_SEQ, seq).set_word(W_ADDR, addr).set_word(W_SIZE, a.block_size)
        t0 = time.monotonic()
        try:
            rep = m3ipc.sendrec(a.server, req, a.timeout_ms)
        except m3ipc.M3IPCError as e:
            t["lost"] += 1
            print(f"migr-client: lost: seq {seq}: sendrec: {e}", file=sys.stderr)
            if isinstance(e, (m3ipc.EDVSIO, m3ipc.EDVSNOTBIND, m3ipc.EDVSSHUTDOWN)):
                t["lost"] += a.iterations - seq
                break
            continue
        finally:
            max_stall = max(max_stall, time.monotonic() - t0)
        counter = rep.word(W_COUNTER)
        if rep.m_type == MTYPE_REFUSED:
            t["lost"] += 1
        elif rep.m_type != MTYPE_REPLY:
            t["corrupt"] += 1
        elif last is not None and counter <= last:
            t["duplicated"] += 1
            print(f"migr-client: duplicated: counter {counter} after {last}", file=sys.stderr)
        else:
            first = counter if first is None else first
            last = counter
            good = (rep.word(W_SEQ) == seq and rep.word(W_SIZE) == a.block_size
                    and bytes(buf) == pattern(seq, a.block_size))
            t["ok" if good else "corrupt"] += 1
            if not good:
                print(f"migr-client: corrupt: seq {seq}", file=sys.stderr)
    elapsed = time.monotonic() - start
    m3ipc.unbind(0)
    if a.json:
        print(json.dumps(dict(t, seconds=elapsed, max_stall_ms=max_stall * 1e3,
                              first_counter=first, last_counter=last)))
    else:
        counters = f"{first}..{last}" if first is not None else "none"
        print(f"{t['ok']} ok, {t['corrupt']} corrupt, {t['lost']} lost, {t['duplicated']} "
              f"duplicated in {elapsed:.2f} s (max stall {max_stall * 1e3:.1f} ms, "
              f"server counter {counters})")
    return 0 if t["ok"] == a.iterations else 1


if __name__ == "__main__":
    sys.exit(main())
