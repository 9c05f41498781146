/*
 * m3ipc.h: M3-IPC for C programs on dvs (libm3ipc).
 *
 * The DVK's calls, names and conventions, so that a DVK program ports by recompiling:
 *
 *   - every call returns >= 0 on success and a negative EDVS* code on failure
 *     (dvk_strerror gives its text, dvs_last_error the details of the last failure);
 *   - timeouts are in milliseconds: TIMEOUT_FOREVER (-1) waits, TIMEOUT_NOWAIT (0) fails
 *     with EDVSTIMEDOUT unless the call completes at once, N > 0 waits at most N ms;
 *   - a binding belongs to the thread that made it (each thread may bind its own endpoint;
 *     a thread's calls use its own binding and its own connection to the node kernel);
 *   - a null pointer, a negative size or a vcopy address outside mapped memory is an error
 *     code (EDVSFAULT, EDVSINVAL), never a crash; an internal failure is EDVSGENERIC.
 *
 * Build: cc prog.c $(pkg-config --cflags --libs m3ipc)   (after scripts/install-clib.sh)
 *
 * The message is 64 bytes: m_source, m_type and a 56-byte payload, the same bytes as the
 * Rust library's Message, so C, Rust and Python programs talk to each other. The payload
 * can be read as the MINIX-style layouts (m1_i1, m1_p1, ...) or as seven 64-bit
 * little-endian words (m_word[0..6], which are Message::word(0..6) in Rust).
 */
#ifndef M3IPC_H
#define M3IPC_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- constants ---------------------------------------------------------------------- */

#ifndef OK
#define OK 0
#endif
/* receive from any sender */
#define ANY 0x7ace
/* no endpoint */
#define NONE 0x6ace
/* the calling thread's own endpoint */
#define SELF 0x8ace

#define TIMEOUT_FOREVER (-1L)
#define TIMEOUT_NOWAIT 0L

/* m_type of the message receive returns for a pending notification (value in m_word[0]) */
#define NOTIFY_MTYPE 0x1000

/* bytes of payload in a message, and the length of m3_ca1 */
#define M3IPC_PAYLOAD 56
#define M3_STRING 40

/* ---- error codes (negative) ----------------------------------------------------------- */

#define EDVSGENERIC   (-99) /* internal error in the library (a caught panic) */
#define EDVSPERM      (-1) /* permission denied */
#define EDVSIO        (-5) /* the connection to the node kernel failed */
#define EDVS2BIG      (-7) /* request too large (vcopy above 16 MiB) */
#define EDVSAGAIN     (-11) /* the directory did not answer a bind (etcd down); try again */
#define EDVSFAULT     (-14) /* bad address: null pointer, or vcopy outside mapped memory */
#define EDVSBUSY      (-16) /* endpoint busy (a vcopy party not blocked in IPC) */
#define EDVSINVAL     (-22) /* invalid argument */
#define EDVSNOSPC     (-28) /* the destination already queues the DC's max_queue messages */
#define EDVSDEADLK    (-35) /* the call would deadlock */
#define EDVSTIMEDOUT  (-61) /* timed out */
#define EDVSSHUTDOWN  (-65) /* node kernel shutting down: never returned, see below */
#define EDVSNOTBIND   (-310) /* the caller is not bound to an endpoint */
#define EDVSENDPOINT  (-306) /* no such endpoint */
#define EDVSBADSRCDST (-103) /* endpoint number out of range for the DC */
#define EDVSBADDCID   (-302) /* no such DC */
#define EDVSOTHERDC   (-360) /* the number is bound in another DC (on the caller's node) */
#define EDVSNODCNODE    (-319) /* this node is not part of the DC */
#define EDVSSLOTUSED  (-337) /* endpoint already bound */
#define EDVSBOUND     (-361) /* this thread is already bound */
#define EDVSDSTDIED   (-109) /* destination died */
#define EDVSSRCDIED   (-108) /* source died */
#define EDVSNOTREPLY  (-362) /* reply to an endpoint not waiting for one from the caller */
#define EDVSNOPROXY   (-307) /* the peer's node is unreachable */
#define EDVSSELFSEND  (-363) /* an endpoint cannot send to itself */

/* Codes kept for DVK programs that test them, but which no call returns with this node
 * kernel: EDVSSHUTDOWN (a node kernel that shuts down closes its endpoints' connections, so
 * their calls fail with EDVSIO, and it answers no call with a shutdown error). EDVSGENERIC
 * only ever means a bug in the library. EDVSOTHERDC is returned where the caller's node
 * knows the number as another DC's endpoint (it is bound there, or known there from the
 * directory); elsewhere the same call gets EDVSENDPOINT. */

/* ---- the message ---------------------------------------------------------------------- */

typedef struct { int m1i1, m1i2, m1i3; char *m1p1, *m1p2, *m1p3; } mess_1;
typedef struct { int m2i1, m2i2, m2i3; long m2l1, m2l2; char *m2p1; } mess_2;
typedef struct { int m3i1, m3i2; char *m3p1; char m3ca1[M3_STRING]; } mess_3;
typedef struct { long m4l1, m4l2, m4l3, m4l4, m4l5; } mess_4;
typedef struct { short m5c1, m5c2; int m5i1, m5i2; long m5l1, m5l2, m5l3; } mess_5;
typedef struct { int m7i1, m7i2, m7i3, m7i4, m7i5; char *m7p1, *m7p2; } mess_7;

typedef struct {
    int m_source; /* who sent it; set by the node kernel, never trusted from the sender */
    int m_type;   /* application-defined */
    union {
        mess_1 m_m1;
        mess_2 m_m2;
        mess_3 m_m3;
        mess_4 m_m4;
        mess_5 m_m5;
        mess_7 m_m7;
        uint64_t m_words[7];                 /* Message::word(i) of the Rust library */
        unsigned char m_payload[M3IPC_PAYLOAD];
    } m_u;
} message;

#define m_word m_u.m_words

#define m1_i1 m_u.m_m1.m1i1
#define m1_i2 m_u.m_m1.m1i2
#define m1_i3 m_u.m_m1.m1i3
#define m1_p1 m_u.m_m1.m1p1
#define m1_p2 m_u.m_m1.m1p2
#define m1_p3 m_u.m_m1.m1p3

#define m2_i1 m_u.m_m2.m2i1
#define m2_i2 m_u.m_m2.m2i2
#define m2_i3 m_u.m_m2.m2i3
#define m2_l1 m_u.m_m2.m2l1
#define m2_l2 m_u.m_m2.m2l2
#define m2_p1 m_u.m_m2.m2p1

#define m3_i1 m_u.m_m3.m3i1
#define m3_i2 m_u.m_m3.m3i2
#define m3_p1 m_u.m_m3.m3p1
#define m3_ca1 m_u.m_m3.m3ca1

#define m4_l1 m_u.m_m4.m4l1
#define m4_l2 m_u.m_m4.m4l2
#define m4_l3 m_u.m_m4.m4l3
#define m4_l4 m_u.m_m4.m4l4
#define m4_l5 m_u.m_m4.m4l5

#define m5_c1 m_u.m_m5.m5c1
#define m5_c2 m_u.m_m5.m5c2
#define m5_i1 m_u.m_m5.m5i1
#define m5_i2 m_u.m_m5.m5i2
#define m5_l1 m_u.m_m5.m5l1
#define m5_l2 m_u.m_m5.m5l2
#define m5_l3 m_u.m_m5.m5l3

#define m7_i1 m_u.m_m7.m7i1
#define m7_i2 m_u.m_m7.m7i2
#define m7_i3 m_u.m_m7.m7i3
#define m7_i4 m_u.m_m7.m7i4
#define m7_i5 m_u.m_m7.m7i5
#define m7_p1 m_u.m_m7.m7p1
#define m7_p2 m_u.m_m7.m7p2

/* ---- binding ------------------------------------------------------------------------ */

/* Does nothing and returns OK (the DVK opened its device here; dvs connects at bind). */
long dvk_open(void);

/* Binds endpoint `ep` of DC `dcid` to the calling thread through the node kernel whose
 * socket DVS_SOCKET names (`dvs run` sets it: the node that launched the program). With
 * ep == SELF it binds the endpoint `dvs run` assigned (DVS_DC, DVS_EP). Returns the
 * endpoint. Errors: EDVSBOUND (thread already bound), EDVSSLOTUSED, EDVSBADSRCDST,
 * EDVSBADDCID, EDVSNODCNODE, EDVSAGAIN, EDVSINVAL (no DVS_SOCKET; ANY/NONE), EDVSIO. */
long dvk_bind(int dcid, int ep);

/* dvk_bind through the node kernel listening on the Unix socket `socket`. */
long dvs_bind_at(const char *socket, int dcid, int ep);

/* Gives up the calling thread's endpoint {dcid, ep} (ep may be SELF) and closes its
 * connection. Errors: EDVSNOTBIND, EDVSPERM (not the thread's endpoint). */
long dvk_unbind(int dcid, int ep);

/* Waits until the calling thread is bound and returns its endpoint; a thread started by
 * `dvs run` and not bound yet binds the endpoint it was assigned. EDVSNOTBIND without that
 * environment (nothing else can bind a dvs thread). */
long dvk_wait4bind_T(long timeout_ms);

/* Waits until endpoint `ep` of the caller's DC is bound somewhere in the cluster.
 * Errors: EDVSTIMEDOUT, EDVSBADSRCDST, EDVSNOTBIND. */
long dvs_wait4bind_T(int ep, long timeout_ms);

/* The endpoint of the calling thread (pid 0, SELF, getpid() or gettid(); others:
 * EDVSINVAL). It asks the node kernel, so it also checks that the binding works. */
long dvk_getep(int pid);

/* The calling thread's DC, endpoint and the node it runs on now (a migration changes it).
 * Null pointers are skipped. */
long dvs_getep(int *dcid, int *ep, int *node);

/* ---- IPC ---------------------------------------------------------------------------- */

/* Rendezvous send of *m to `dst`: returns when dst has taken it (also on another node).
 * Errors: EDVSTIMEDOUT, EDVSENDPOINT, EDVSDSTDIED, EDVSSELFSEND, EDVSDEADLK, EDVSNOSPC,
 * EDVSNOPROXY, EDVSOTHERDC, EDVSBADSRCDST, EDVSNOTBIND, EDVSFAULT (m null), EDVSIO. */
long dvk_send_T(int dst, const message *m, long timeout_ms);

/* Receives into *m from `src` or ANY: pending notifications first (m_type NOTIFY_MTYPE),
 * then queued senders; blocks otherwise. m->m_source tells the sender. */
long dvk_receive_T(int src, message *m, long timeout_ms);

/* Sends *m to `dst` and waits for its reply, which overwrites *m, as one call.
 * Errors: those of dvk_send_T; EDVSDSTDIED also if dst goes away before it replies. */
long dvk_sendrec_T(int dst, message *m, long timeout_ms);

/* Replies *m to `dst`, which must be waiting in sendrec on the caller (else EDVSNOTREPLY).
 * Never blocks; timeout_ms is only checked. */
long dvk_reply_T(int dst, const message *m, long timeout_ms);

/* Sets a pending notification from `src` (SELF or the caller's endpoint, else EDVSPERM)
 * at `dst`; notifications from one sender coalesce. `value` arrives in m_word[0]. */
long dvk_notify_X(int src, int dst, int value);

/* dvk_notify_X from the caller with a 64-bit value. */
long dvs_notify(int dst, uint64_t value);

/* Copies `bytes` bytes from `src_addr` in the process of `src_ep` to `dst_addr` in the
 * process of `dst_ep` (SELF: the caller). Every party other than the caller must be
 * blocked in IPC (typically a client inside sendrec), else EDVSBUSY. At most 16 MiB
 * (EDVS2BIG); a negative size is EDVSINVAL; a null address, or a range not mapped in the
 * process, is EDVSFAULT. */
long dvk_vcopy(int src_ep, const void *src_addr, int dst_ep, void *dst_addr, int bytes);

/* dvk_vcopy with a long size and a timeout. */
long dvs_vcopy_T(int src_ep, const void *src_addr, int dst_ep, void *dst_addr, long bytes,
                 long timeout_ms);

/* ---- errors ------------------------------------------------------------------------- */

/* The text of an error code (a static string). */
const char *dvk_strerror(int code);

/* Details of the calling thread's last failure (valid until its next failing call). */
const char *dvs_last_error(void);

/* ---- the DVK's short forms ------------------------------------------------------------ */

#define dvk_send(dst, m) dvk_send_T((dst), (m), TIMEOUT_FOREVER)
#define dvk_receive(src, m) dvk_receive_T((src), (m), TIMEOUT_FOREVER)
#define dvk_sendrec(dst, m) dvk_sendrec_T((dst), (m), TIMEOUT_FOREVER)
#define dvk_reply(dst, m) dvk_reply_T((dst), (m), TIMEOUT_FOREVER)
#define dvk_notify(dst) dvk_notify_X(SELF, (dst), 0)
#define dvk_wait4bind() dvk_wait4bind_T(TIMEOUT_FOREVER)

#ifdef __cplusplus
}
#endif

#endif /* M3IPC_H */
