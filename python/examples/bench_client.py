"""The Python side of `dvs bench ipc --lang python`: like examples/c/bench_client.c.

    bench_client.py SOCKET DC EP SERVER WARMUP N
"""

import sys
import time

import m3ipc


def main():
    sock, dc, ep, server, warmup, n = sys.argv[1], *map(int, sys.argv[2:])
    m3ipc.bind_at(sock, dc, ep)
    out = []
    m = m3ipc.Message(0x6201)
    clock = time.perf_counter_ns
    for i in range(warmup + n):
        m.set_word(0, i)
        t0 = clock()
        rep = m3ipc.sendrec(server, m, 5000)
        t1 = clock()
        if rep.word(0) != i:
            sys.exit(f"bench_client.py: reply {rep.word(0)} to request {i}")
        if i >= warmup:
            out.append(t1 - t0)
    m3ipc.unbind(dc)
    sys.stdout.write("".join(f"{v}\n" for v in out))


if __name__ == "__main__":
    main()
