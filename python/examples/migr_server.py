"""migr_server.py: the Python twin of migr-server (the paper's migrating test server).

Copies a pattern block into each client's buffer with vcopy and replies with its request
counter, which lives in the process and travels with a criu migration.

    dvs run --dc dc0 --ep 1 -- python3 migr_server.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import m3ipc  # noqa: E402
from migr_common import (MAX_BLOCK, MTYPE_REFUSED, MTYPE_REPLY, MTYPE_REQUEST,  # noqa: E402
                         W_ADDR, W_COUNTER, W_SEQ, W_SIZE, pattern)


def refuse(client, seq):
    try:
        m3ipc.reply(client, m3ipc.Message(MTYPE_REFUSED).set_word(W_SEQ, seq))
    except (m3ipc.EDVSIO, m3ipc.EDVSNOTBIND):
        raise
    except m3ipc.M3IPCError as e:
        print(f"migr-server: seq {seq} to ep {client}: refusal: {e}", file=sys.stderr)


def main():
    m3ipc.bind(0, m3ipc.SELF)
    dc, ep, node = m3ipc.where()
    print(f"migr-server: dc {dc} ep {ep} bound on node {node}", flush=True)
    counter = 0
    while True:
        try:
            msg = m3ipc.receive(m3ipc.ANY)
        except m3ipc.EDVSSHUTDOWN:
            print(f"migr-server: node kernel shutting down after {counter} requests")
            return 0
        if msg.m_type == m3ipc.NOTIFY_MTYPE:
            continue
        client = msg.m_source
        if msg.m_type != MTYPE_REQUEST:
            m3ipc.reply(client, m3ipc.Message(MTYPE_REFUSED))
            continue
        seq, addr, size = msg.word(W_SEQ), msg.word(W_ADDR), msg.word(W_SIZE)
        if size > MAX_BLOCK:
            refuse(client, seq)
            continue
        try:
            m3ipc.vcopy_to(client, addr, pattern(seq, size))
        except (m3ipc.EDVSIO, m3ipc.EDVSNOTBIND):
            raise
        except m3ipc.M3IPCError as e:
            print(f"migr-server: seq {seq} from ep {client}: vcopy: {e}", file=sys.stderr)
            refuse(client, seq)
            continue
        counter += 1
        rep = m3ipc.Message(MTYPE_REPLY)
        rep.set_word(W_SEQ, seq).set_word(W_COUNTER, counter).set_word(W_SIZE, size)
        m3ipc.reply(client, rep)
        if counter % 100 == 0:
            node = m3ipc.where()[2]
            print(f"migr-server: {counter} requests served (last seq {seq} from ep {client}, "
                  f"{size} bytes) on node {node}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
