"""M3-IPC for Python programs on dvs.

The DVK's calls (bind, send, receive, sendrec, reply, notify, vcopy, ...) over the C library
libm3ipc, loaded with ctypes: no compiler and no download at install time. The library is
found through ``$M3IPC_LIB`` (a path), else as ``libm3ipc`` on the system's library path
(``scripts/install-clib.sh`` installs it there).

A binding belongs to the thread that made it, as in C: each Python thread may bind its own
endpoint. Calls release the GIL while they wait. Errors raise a subclass of
:class:`M3IPCError`, one per ``EDVS*`` code (``except m3ipc.EDVSTIMEDOUT:``).

    import m3ipc
    m3ipc.bind(0, m3ipc.SELF)           # the endpoint `dvs run` assigned
    req = m3ipc.receive(m3ipc.ANY)
    m3ipc.reply(req.m_source, m3ipc.Message(m_type=2))
"""

import ctypes
import ctypes.util
import os

__all__ = [
    "ANY", "NONE", "SELF", "TIMEOUT_FOREVER", "TIMEOUT_NOWAIT", "NOTIFY_MTYPE", "Message",
    "M3IPCError", "CODES", "open", "bind", "bind_at", "unbind", "getep", "where", "send",
    "receive", "sendrec", "reply", "notify", "vcopy", "vcopy_to", "vcopy_from", "wait4bind",
    "wait_for_bind", "strerror", "address_of", "library_path",
]

ANY = 0x7ACE
NONE = 0x6ACE
SELF = 0x8ACE
TIMEOUT_FOREVER = -1
TIMEOUT_NOWAIT = 0
NOTIFY_MTYPE = 0x1000
M3_STRING = 40
PAYLOAD = 56

# name -> value, as in m3ipc.h (a test compares it with the Rust side).
CODES = {
    "EDVSGENERIC": -99, "EDVSPERM": -1, "EDVSIO": -5, "EDVS2BIG": -7,
    "EDVSAGAIN": -11, "EDVSFAULT": -14, "EDVSBUSY": -16, "EDVSINVAL": -22,
    "EDVSNOSPC": -28, "EDVSDEADLK": -35, "EDVSTIMEDOUT": -61, "EDVSSHUTDOWN": -65,
    "EDVSNOTBIND": -310, "EDVSENDPOINT": -306, "EDVSBADSRCDST": -103, "EDVSBADDCID": -302,
    "EDVSOTHERDC": -360, "EDVSNODCNODE": -319, "EDVSSLOTUSED": -337, "EDVSBOUND": -361,
    "EDVSDSTDIED": -109, "EDVSSRCDIED": -108, "EDVSNOTREPLY": -362, "EDVSNOPROXY": -307,
    "EDVSSELFSEND": -363,
}


class M3IPCError(Exception):
    """A failed call; ``code`` is the negative EDVS* value, ``name`` its name."""

    code = 0
    name = "?"

    def __init__(self, call, detail=""):
        self.call = call
        self.detail = detail
        text = strerror(self.code)
        super().__init__(f"{call}: {self.name} ({text})" + (f": {detail}" if detail else ""))


_BY_CODE = {}
for _name, _value in CODES.items():
    _cls = type(_name, (M3IPCError,), {"code": _value, "name": _name,
                                       "__doc__": f"The call failed with {_name}."})
    globals()[_name] = _cls
    __all__.append(_name)
    _BY_CODE[_value] = _cls


# ---- the message ------------------------------------------------------------------------

_c = ctypes
_p = _c.c_void_p


class _M1(_c.Structure):
    _fields_ = [("m1i1", _c.c_int), ("m1i2", _c.c_int), ("m1i3", _c.c_int),
                ("m1p1", _p), ("m1p2", _p), ("m1p3", _p)]


class _M2(_c.Structure):
    _fields_ = [("m2i1", _c.c_int), ("m2i2", _c.c_int), ("m2i3", _c.c_int),
                ("m2l1", _c.c_long), ("m2l2", _c.c_long), ("m2p1", _p)]


class _M3(_c.Structure):
    _fields_ = [("m3i1", _c.c_int), ("m3i2", _c.c_int), ("m3p1", _p),
                ("m3ca1", _c.c_char * M3_STRING)]


class _M4(_c.Structure):
    _fields_ = [(f"m4l{i}", _c.c_long) for i in range(1, 6)]


class _M5(_c.Structure):
    _fields_ = [("m5c1", _c.c_short), ("m5c2", _c.c_short), ("m5i1", _c.c_int),
                ("m5i2", _c.c_int), ("m5l1", _c.c_long), ("m5l2", _c.c_long),
                ("m5l3", _c.c_long)]


class _M7(_c.Structure):
    _fields_ = [(f"m7i{i}", _c.c_int) for i in range(1, 6)] + [("m7p1", _p), ("m7p2", _p)]


class _Union(_c.Union):
    _fields_ = [("m_m1", _M1), ("m_m2", _M2), ("m_m3", _M3), ("m_m4", _M4), ("m_m5", _M5),
                ("m_m7", _M7), ("m_words", _c.c_uint64 * 7),
                ("m_payload", _c.c_ubyte * PAYLOAD)]


# DVK field name -> (layout member, field): m1_i1 is m_u.m_m1.m1i1, as the C macros say.
FIELDS = {}
for _member, _struct in (("m_m1", _M1), ("m_m2", _M2), ("m_m3", _M3), ("m_m4", _M4),
                         ("m_m5", _M5), ("m_m7", _M7)):
    for _f, _t in _struct._fields_:
        FIELDS[f"{_f[:2]}_{_f[2:]}"] = (_member, _f)


class Message(_c.Structure):
    """The 64-byte M3-IPC message: ``m_source``, ``m_type`` and the payload, readable as
    the DVK's fields (``m1_i1``, ``m1_p1``, ``m3_ca1``, ...) or as seven 64-bit words
    (``word(i)``/``set_word(i, v)``, the Rust library's ``Message::word``)."""

    _fields_ = [("m_source", _c.c_int), ("m_type", _c.c_int), ("m_u", _Union)]

    def __init__(self, m_type=0, **fields):
        super().__init__()
        self.m_type = m_type
        for k, v in fields.items():
            setattr(self, k, v)

    def word(self, i):
        """Payload word ``i`` (0..6)."""
        return self.m_u.m_words[i]

    def set_word(self, i, value):
        """Sets payload word ``i`` (0..6); returns the message."""
        self.m_u.m_words[i] = value & 0xFFFFFFFFFFFFFFFF
        return self

    def payload(self):
        """The 56 payload bytes."""
        return bytes(self.m_u.m_payload)

    def __repr__(self):
        return f"Message(m_source={self.m_source}, m_type={self.m_type:#x})"


def _field_property(member, field):
    def get(self):
        return getattr(getattr(self.m_u, member), field)

    def set(self, value):
        setattr(getattr(self.m_u, member), field, value)

    return property(get, set)


for _name, (_member, _f) in FIELDS.items():
    setattr(Message, _name, _field_property(_member, _f))


# ---- the library ------------------------------------------------------------------------

def library_path():
    """Where libm3ipc is taken from: ``$M3IPC_LIB``, else the system's ``libm3ipc``."""
    env = os.environ.get("M3IPC_LIB")
    if env:
        return env
    found = ctypes.util.find_library("m3ipc")
    if found:
        return found
    for d in ("/usr/local/lib", "/usr/lib"):
        p = os.path.join(d, "libm3ipc.so")
        if os.path.exists(p):
            return p
    raise OSError("libm3ipc not found: run scripts/install-clib.sh or set M3IPC_LIB")


_lib = ctypes.CDLL(library_path())
_L, _I, _MP = _c.c_long, _c.c_int, _c.POINTER(Message)
for _fn, _args in {
    "dvk_open": [], "dvk_bind": [_I, _I], "dvs_bind_at": [_c.c_char_p, _I, _I],
    "dvk_unbind": [_I, _I], "dvk_getep": [_I],
    "dvs_getep": [_c.POINTER(_I)] * 3, "dvk_send_T": [_I, _MP, _L],
    "dvk_receive_T": [_I, _MP, _L], "dvk_sendrec_T": [_I, _MP, _L],
    "dvk_reply_T": [_I, _MP, _L], "dvk_notify_X": [_I, _I, _I],
    "dvs_notify": [_I, _c.c_uint64], "dvs_vcopy_T": [_I, _p, _I, _p, _L, _L],
    "dvk_wait4bind_T": [_L], "dvs_wait4bind_T": [_I, _L],
}.items():
    getattr(_lib, _fn).argtypes = _args
    getattr(_lib, _fn).restype = _L
_lib.dvk_strerror.argtypes = [_I]
_lib.dvk_strerror.restype = _c.c_char_p
_lib.dvs_last_error.argtypes = []
_lib.dvs_last_error.restype = _c.c_char_p


def _check(call, rc):
    if rc < 0:
        detail = (_lib.dvs_last_error() or b"").decode(errors="replace")
        cls = _BY_CODE.get(rc)
        if cls is None:
            cls = type("EDVS_UNKNOWN", (M3IPCError,), {"code": rc, "name": str(rc)})
        raise cls(call, detail)
    return rc


def strerror(code):
    """The text of an error code."""
    return _lib.dvk_strerror(code).decode()


def open():  # noqa: A001 - the DVK's name
    """Does nothing (the DVK opened its device here)."""
    return _check("open", _lib.dvk_open())


def bind(dcid, ep=SELF):
    """Binds endpoint ``ep`` of DC ``dcid`` to this thread through the node that launched
    the program (``$DVS_SOCKET``); ``SELF`` binds the endpoint ``dvs run`` assigned.
    Returns the endpoint."""
    return _check("bind", _lib.dvk_bind(dcid, ep))


def bind_at(socket, dcid, ep):
    """Binds through the node kernel listening on the Unix socket ``socket``."""
    return _check("bind_at", _lib.dvs_bind_at(os.fsencode(socket), dcid, ep))


def unbind(dcid, ep=SELF):
    """Gives up this thread's endpoint."""
    return _check("unbind", _lib.dvk_unbind(dcid, ep))


def getep():
    """This thread's endpoint (asks the node kernel)."""
    return _check("getep", _lib.dvk_getep(0))


def where():
    """(dc, ep, node) of this thread's endpoint; the node changes after a migration."""
    dc, ep, node = _c.c_int(), _c.c_int(), _c.c_int()
    _check("where", _lib.dvs_getep(_c.byref(dc), _c.byref(ep), _c.byref(node)))
    return dc.value, ep.value, node.value


def send(dst, msg, timeout=TIMEOUT_FOREVER):
    """Rendezvous send: returns when ``dst`` has taken ``msg``."""
    _check("send", _lib.dvk_send_T(dst, _c.byref(msg), timeout))


def receive(src=ANY, timeout=TIMEOUT_FOREVER):
    """Receives from ``src`` or ``ANY`` (notifications first); returns a new Message."""
    m = Message()
    _check("receive", _lib.dvk_receive_T(src, _c.byref(m), timeout))
    return m


def sendrec(dst, msg, timeout=TIMEOUT_FOREVER):
    """Sends ``msg`` to ``dst`` and returns its reply (``msg`` is left unchanged)."""
    m = Message()
    _c.pointer(m)[0] = msg
    _check("sendrec", _lib.dvk_sendrec_T(dst, _c.byref(m), timeout))
    return m


def reply(dst, msg):
    """Replies to ``dst``, which must wait in sendrec on this endpoint. Never blocks."""
    _check("reply", _lib.dvk_reply_T(dst, _c.byref(msg), TIMEOUT_FOREVER))


def notify(dst, value=0):
    """Sets a pending notification at ``dst`` with a 64-bit ``value``. Never blocks."""
    _check("notify", _lib.dvs_notify(dst, value & 0xFFFFFFFFFFFFFFFF))


def vcopy(src_ep, src_addr, dst_ep, dst_addr, nbytes, timeout=TIMEOUT_FOREVER):
    """Copies ``nbytes`` between two endpoints' address spaces (addresses as ints)."""
    _check("vcopy", _lib.dvs_vcopy_T(src_ep, src_addr, dst_ep, dst_addr, nbytes, timeout))


def address_of(buf):
    """(address, length) of a writable buffer object's memory (bytearray, memoryview,
    array, ctypes array, ...), e.g. to put in a message for a peer's vcopy. The object must
    stay alive, and unresized, while the address is in use."""
    view = memoryview(buf)
    if view.readonly or not view.contiguous:
        raise ValueError("address_of needs a writable, contiguous buffer")
    if view.nbytes == 0:
        return 0, 0
    carr = (_c.c_char * view.nbytes).from_buffer(view)
    return _c.addressof(carr), view.nbytes


def vcopy_to(dst_ep, dst_addr, data, timeout=TIMEOUT_FOREVER):
    """Copies ``data`` (any bytes-like object) into ``dst_ep``'s memory at ``dst_addr``."""
    view = memoryview(data)
    if view.nbytes == 0:
        return
    if view.readonly or not view.contiguous:
        # A private copy gives a stable address for the node kernel to read.
        staging = (_c.c_char * view.nbytes).from_buffer_copy(view.tobytes())
    else:
        staging = (_c.c_char * view.nbytes).from_buffer(view)
    vcopy(SELF, _c.addressof(staging), dst_ep, dst_addr, view.nbytes, timeout)


def vcopy_from(src_ep, src_addr, buf, timeout=TIMEOUT_FOREVER):
    """Fills the writable buffer ``buf`` (bytearray, memoryview, ...) from ``src_ep``'s
    memory at ``src_addr``."""
    view = memoryview(buf)
    if view.readonly:
        raise TypeError("vcopy_from needs a writable buffer")
    if view.nbytes == 0:
        return
    target = (_c.c_char * view.nbytes).from_buffer(view)
    vcopy(src_ep, src_addr, SELF, _c.addressof(target), view.nbytes, timeout)


def wait4bind(timeout=TIMEOUT_FOREVER):
    """Waits until this thread is bound (binding the endpoint ``dvs run`` assigned)."""
    return _check("wait4bind", _lib.dvk_wait4bind_T(timeout))


def wait_for_bind(ep, timeout=TIMEOUT_FOREVER):
    """Waits until endpoint ``ep`` of this thread's DC is bound somewhere."""
    _check("wait_for_bind", _lib.dvs_wait4bind_T(ep, timeout))
