"""Exercises the Python package against a real cluster (run by crates/dvs-cli/tests/python.rs).

    check_calls.py layout                       prints the message layout and the codes (JSON)
    check_calls.py calls SOCK_CLIENT SOCK_SERVER DC BASE

Each check prints "ok NAME" or "FAIL NAME: why"; the exit status is 0 only if none failed.
"""

import ctypes
import json
import sys
import threading

import m3ipc

failures = 0
WAIT = 20000  # an upper bound against hangs, never reached when things work


def check(name, cond, why=""):
    global failures
    if cond:
        print(f"ok {name}", flush=True)
    else:
        failures += 1
        print(f"FAIL {name}: {why}", flush=True)


def raises(name, exc, fn, *args):
    try:
        fn(*args)
    except exc:
        check(name, True)
    except m3ipc.M3IPCError as e:
        check(name, False, f"raised {e!r}")
    else:
        check(name, False, "no exception")


def layout():
    fields = {"m_source": [m3ipc.Message.m_source.offset, 4],
              "m_type": [m3ipc.Message.m_type.offset, 4]}
    base = m3ipc.Message.m_u.offset
    for name, (member, field) in m3ipc.FIELDS.items():
        in_union = getattr(m3ipc._Union, member).offset
        f = getattr(dict(m3ipc._Union._fields_)[member], field)
        fields[name] = [base + in_union + f.offset, f.size]
    print(json.dumps({"size": ctypes.sizeof(m3ipc.Message), "fields": fields,
                      "codes": m3ipc.CODES,
                      "consts": {"ANY": m3ipc.ANY, "NONE": m3ipc.NONE, "SELF": m3ipc.SELF,
                                 "NOTIFY_MTYPE": m3ipc.NOTIFY_MTYPE}}))


def server(sock, dc, ep, ready):
    m3ipc.bind_at(sock, dc, ep)
    store = bytearray(1 << 20)
    ready.set()
    while True:
        m = m3ipc.receive(m3ipc.ANY, WAIT)
        if m.m_type == m3ipc.NOTIFY_MTYPE:
            continue
        r = m3ipc.Message(m.m_type + 100)
        if m.m_type == 1:    # echo
            r.m1_i1, r.m1_i2 = m.m1_i1, m.m1_i2
        elif m.m_type == 2:  # fill the client's buffer with bytes b
            n, b = m.word(1), m.word(2)
            m3ipc.vcopy_to(m.m_source, m.word(0), bytes([b]) * n)
        elif m.m_type == 3:  # pull the client's buffer; reply its sum
            n = m.word(1)
            view = memoryview(store)[:n]
            m3ipc.vcopy_from(m.m_source, m.word(0), view)
            r.set_word(0, sum(view))
        m3ipc.reply(m.m_source, r)
        if m.m_type == 9:
            m3ipc.unbind(dc)
            return


def calls(sock_c, sock_s, dc, base):
    me, srv = base, base + 1
    raises("EDVSNOTBIND before bind", m3ipc.EDVSNOTBIND, m3ipc.getep)
    check("bind_at", m3ipc.bind_at(sock_c, dc, me) == me)
    raises("EDVSBOUND", m3ipc.EDVSBOUND, m3ipc.bind_at, sock_c, dc, me + 50)
    ready = threading.Event()
    t = threading.Thread(target=server, args=(sock_s, dc, srv, ready))
    t.start()
    m3ipc.wait_for_bind(srv, WAIT)
    check("wait_for_bind", True)
    check("where", m3ipc.where()[:2] == (dc, me))
    rep = m3ipc.sendrec(srv, m3ipc.Message(1, m1_i1=-3, m1_i2=4), WAIT)
    check("sendrec", rep.m_type == 101 and rep.m1_i1 == -3 and rep.m1_i2 == 4
          and rep.m_source == srv)
    for n in (1, 64 << 10, 1 << 20):
        buf = bytearray(n)
        addr, _ = m3ipc.address_of(buf)
        m = m3ipc.Message(2).set_word(0, addr).set_word(1, n).set_word(2, 0x5A)
        m3ipc.sendrec(srv, m, WAIT)
        check(f"vcopy_to {n} bytes into a bytearray", buf == bytes([0x5A]) * n)
        src = bytearray([3]) * n
        addr, _ = m3ipc.address_of(src)
        rep = m3ipc.sendrec(srv, m3ipc.Message(3).set_word(0, addr).set_word(1, n), WAIT)
        check(f"vcopy_from {n} bytes out of a bytearray", rep.word(0) == 3 * n)
    m3ipc.notify(srv, 5)
    check("notify", True)
    raises("EDVSTIMEDOUT", m3ipc.EDVSTIMEDOUT, m3ipc.receive, m3ipc.ANY, 50)
    raises("EDVSSELFSEND", m3ipc.EDVSSELFSEND, m3ipc.send, me, m3ipc.Message(1), WAIT)
    raises("EDVSNOTREPLY", m3ipc.EDVSNOTREPLY, m3ipc.reply, srv, m3ipc.Message(1))
    raises("EDVSBADSRCDST", m3ipc.EDVSBADSRCDST, m3ipc.send, 100000, m3ipc.Message(1), WAIT)
    raises("EDVSINVAL", m3ipc.EDVSINVAL, m3ipc.receive, m3ipc.ANY, -2)
    raises("EDVSFAULT", m3ipc.EDVSFAULT, m3ipc.vcopy, m3ipc.SELF, 16, srv, 16, 8)
    raises("vcopy_from needs a writable buffer", TypeError, m3ipc.vcopy_from, srv, 16, b"ro")
    check("exceptions are M3IPCError", issubclass(m3ipc.EDVSIO, m3ipc.M3IPCError))
    m3ipc.sendrec(srv, m3ipc.Message(9), WAIT)
    t.join(30)
    check("server ended", not t.is_alive())
    m3ipc.unbind(dc)
    raises("EDVSNOTBIND after unbind", m3ipc.EDVSNOTBIND, m3ipc.getep)


if __name__ == "__main__":
    if sys.argv[1] == "layout":
        layout()
    else:
        calls(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        print(f"{failures} failed")
    sys.exit(1 if failures else 0)
