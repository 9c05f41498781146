/*
 * m3ipc_test: exercises every call of libm3ipc against a real cluster, from threads that
 * each bind their own endpoint (a binding belongs to its thread).
 *
 *   m3ipc_test calls SOCK_CLIENT SOCK_SERVER DC BASE   every call and most error codes
 *   m3ipc_test badinput SOCK DC EP                     bad input: codes, never a crash
 *   m3ipc_test bind SOCK DC EP                         prints "bind RC"
 *   m3ipc_test block SOCK DC EP                        prints "bound", then "receive RC"
 *   m3ipc_test send SOCK DC EP DST                     prints "send RC"
 *   m3ipc_test queuefull SOCK SOCK_REMOTE DC BASE N    EDVSNOSPC, local and remote, once
 *                                                      N senders fill BASE's queue
 *                                                      (the DC's max_queue must be N)
 *
 * Each check prints "ok NAME" or "FAIL NAME: why"; the exit status is 0 only if none failed.
 * Nothing here depends on timing: where a step needs a peer blocked in IPC, it polls with
 * dvk_vcopy, which answers EDVSBUSY until the peer is blocked.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "m3ipc.h"
#include "migr.h"

#define LONG_WAIT 20000L /* an upper bound against hangs, never reached when things work */

enum { T_ECHO = 1, T_VCOPY_TO, T_VCOPY_FROM, T_NOTIFIED, T_PING_BACK, T_CHECK, T_DEADLOCK,
       T_STOP };

static int failures;
static const char *scope = "";

static void check(const char *name, int cond, const char *why)
{
    if (cond) {
        printf("ok %s%s\n", scope, name);
    } else {
        failures++;
        printf("FAIL %s%s: %s\n", scope, name, why);
    }
    fflush(stdout);
}

static void expect(const char *name, long got, long want)
{
    char why[256];
    snprintf(why, sizeof why, "got %ld (%s), want %ld (%s) [%s]", got, dvk_strerror((int)got),
             want, dvk_strerror((int)want), got < 0 ? dvs_last_error() : "");
    check(name, got == want, why);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Polls until endpoint `ep` is blocked in IPC (a 1-byte vcopy from `addr` in its process
 * stops failing with EDVSBUSY); returns the last code. At most ~20 s. */
static long wait_blocked(int ep, const void *addr)
{
    char probe;
    long rc = EDVSBUSY;
    for (int i = 0; i < 4000 && rc == EDVSBUSY; i++) {
        rc = dvk_vcopy(ep, addr, SELF, &probe, 1);
        if (rc == EDVSBUSY)
            sleep_ms(5);
    }
    return rc;
}

/* ---- the server thread ---------------------------------------------------------------- */

struct server {
    const char *socket;
    int dc, ep, client;
    long bind_rc;
    unsigned char buf[1 << 20];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int bound;
};

static void serve(struct server *s)
{
    uint64_t notified = 0;
    int notified_by = NONE;
    for (;;) {
        message m;
        long rc = dvk_receive_T(ANY, &m, LONG_WAIT);
        if (rc < 0) {
            printf("FAIL server receive: %s\n", dvk_strerror((int)rc));
            failures++;
            return;
        }
        if (m.m_type == NOTIFY_MTYPE) {
            notified = m.m_word[0];
            notified_by = m.m_source;
            continue;
        }
        int from = m.m_source;
        message r = m;
        r.m_type = m.m_type + 100;
        switch (m.m_type) {
        case T_ECHO:
            /* Everything back, and where the server's buffer is, for the client's vcopy. */
            r.m_word[5] = (uint64_t)(uintptr_t)s->buf;
            break;
        case T_VCOPY_TO: /* fill the client's buffer: seq, addr, size */
            fill_pattern(m.m_word[0], s->buf, m.m_word[2]);
            r.m_word[0] = (uint64_t)dvs_vcopy_T(SELF, s->buf, from,
                                                (void *)(uintptr_t)m.m_word[1],
                                                (long)m.m_word[2], LONG_WAIT);
            break;
        case T_VCOPY_FROM: /* pull the client's buffer and check it */
            memset(s->buf, 0, m.m_word[2]);
            r.m_word[0] = (uint64_t)dvs_vcopy_T(from, (void *)(uintptr_t)m.m_word[1], SELF,
                                                s->buf, (long)m.m_word[2], LONG_WAIT);
            r.m_word[1] = (uint64_t)check_pattern(m.m_word[0], s->buf, m.m_word[2]);
            break;
        case T_CHECK: /* check what the client copied into this buffer */
            r.m_word[1] = (uint64_t)check_pattern(m.m_word[0], s->buf, m.m_word[2]);
            break;
        case T_NOTIFIED:
            r.m_word[0] = notified;
            r.m_word[1] = (uint64_t)notified_by;
            break;
        default:
            break;
        }
        if (m.m_type == NOTIFY_MTYPE + 1) /* a plain send: nothing to reply */
            continue;
        rc = dvk_reply_T(from, &r, TIMEOUT_FOREVER);
        if (rc < 0) {
            printf("FAIL server reply: %s\n", dvk_strerror((int)rc));
            failures++;
        }
        if (m.m_type == T_PING_BACK || m.m_type == T_DEADLOCK) {
            /* Then a send of its own, which the client takes with receive. */
            message p;
            memset(&p, 0, sizeof p);
            p.m_type = 0x77;
            rc = dvk_send_T(from, &p, LONG_WAIT);
            if (rc < 0) {
                printf("FAIL server send back: %s\n", dvk_strerror((int)rc));
                failures++;
            }
        }
        if (m.m_type == T_STOP)
            return;
    }
}

static void *server_main(void *arg)
{
    struct server *s = arg;
    s->bind_rc = dvs_bind_at(s->socket, s->dc, s->ep);
    if (s->bind_rc >= 0) {
        serve(s);
        dvk_unbind(s->dc, SELF);
    }
    return NULL;
}

/* ---- helper threads: bound and idle, or bound and dying at the right moment ---------- */

struct helper {
    const char *socket;
    int dc, ep;
    int victim;           /* endpoint to wait for (blocked in IPC) before unbinding */
    const void *victim_addr;
    long rc, wait_rc;
    int go;               /* idle helper: set to 1 to make it unbind and end */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int bound;
};

static void helper_bound(struct helper *h)
{
    pthread_mutex_lock(&h->mu);
    h->bound = 1;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

/* Binds, then either waits for `go` (idle, never in IPC) or unbinds once the victim is
 * blocked in IPC (so that the victim's call fails because this endpoint went away). */
static void *helper_main(void *arg)
{
    struct helper *h = arg;
    h->rc = dvs_bind_at(h->socket, h->dc, h->ep);
    helper_bound(h);
    if (h->rc < 0)
        return NULL;
    if (h->victim != NONE) {
        h->wait_rc = wait_blocked(h->victim, h->victim_addr);
    } else {
        pthread_mutex_lock(&h->mu);
        while (!h->go)
            pthread_cond_wait(&h->cv, &h->mu);
        pthread_mutex_unlock(&h->mu);
    }
    dvk_unbind(h->dc, SELF);
    return NULL;
}

static void start_helper(struct helper *h, pthread_t *t, const char *socket, int dc, int ep,
                         int victim, const void *victim_addr)
{
    memset(h, 0, sizeof *h);
    h->socket = socket;
    h->dc = dc;
    h->ep = ep;
    h->victim = victim;
    h->victim_addr = victim_addr;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    pthread_create(t, NULL, helper_main, h);
    pthread_mutex_lock(&h->mu);
    while (!h->bound)
        pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
}

static void stop_idle_helper(struct helper *h, pthread_t t)
{
    pthread_mutex_lock(&h->mu);
    h->go = 1;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(t, NULL);
}

/* A fresh thread's attempt to bind {dc, ep} at `socket`. */
struct try_bind { const char *socket; int dc, ep; long rc; };

static void *try_bind_main(void *arg)
{
    struct try_bind *b = arg;
    b->rc = dvs_bind_at(b->socket, b->dc, b->ep);
    if (b->rc >= 0)
        dvk_unbind(b->dc, SELF);
    return NULL;
}

static long bind_in_thread(const char *socket, int dc, int ep)
{
    struct try_bind b = {socket, dc, ep, 0};
    pthread_t t;
    pthread_create(&t, NULL, try_bind_main, &b);
    pthread_join(t, NULL);
    return b.rc;
}

/* ---- calls ---------------------------------------------------------------------------- */

static message request(int type)
{
    message m;
    memset(&m, 0, sizeof m);
    m.m_type = type;
    return m;
}

static void vcopy_sizes(int server)
{
    static const long sizes[] = {1, 64 << 10, 1 << 20};
    for (size_t i = 0; i < 3; i++) {
        long n = sizes[i];
        char name[64];
        /* server → client buffer */
        unsigned char *buf = calloc(1, (size_t)n);
        message m = request(T_VCOPY_TO);
        m.m_word[0] = 1000 + i;
        m.m_word[1] = (uint64_t)(uintptr_t)buf;
        m.m_word[2] = (uint64_t)n;
        long rc = dvk_sendrec_T(server, &m, LONG_WAIT);
        snprintf(name, sizeof name, "vcopy %ld bytes server to client", n);
        check(name, rc == 0 && (long)m.m_word[0] == 0 && check_pattern(1000 + i, buf, n) < 0,
              "block not copied or corrupt");
        /* client buffer → server (the server pulls) */
        fill_pattern(2000 + i, buf, (size_t)n);
        m = request(T_VCOPY_FROM);
        m.m_word[0] = 2000 + i;
        m.m_word[1] = (uint64_t)(uintptr_t)buf;
        m.m_word[2] = (uint64_t)n;
        rc = dvk_sendrec_T(server, &m, LONG_WAIT);
        snprintf(name, sizeof name, "vcopy %ld bytes client to server", n);
        check(name, rc == 0 && (long)m.m_word[0] == 0 && (long)m.m_word[1] == -1,
              "block not pulled or corrupt");
        free(buf);
    }
}

static void calls(const char *sock_client, const char *sock_server, int dc, int base)
{
    int me = base, server = base + 1;
    message m = request(T_ECHO);

    expect("dvk_open", dvk_open(), OK);
    expect("EDVSNOTBIND before bind", dvk_send_T(server, &m, LONG_WAIT), EDVSNOTBIND);
    expect("dvk_wait4bind_T outside dvs run", dvk_wait4bind_T(100), EDVSNOTBIND);
    expect("dvs_bind_at", dvs_bind_at(sock_client, dc, me), me);
    expect("EDVSBOUND", dvs_bind_at(sock_client, dc, me + 50), EDVSBOUND);
    expect("dvk_wait4bind_T once bound", dvk_wait4bind_T(TIMEOUT_NOWAIT), me);
    expect("EDVSBADDCID", bind_in_thread(sock_client, 99, me + 50), EDVSBADDCID);
    expect("EDVSSLOTUSED", bind_in_thread(sock_client, dc, me), EDVSSLOTUSED);

    struct server *s = calloc(1, sizeof *s);
    s->socket = sock_server;
    s->dc = dc;
    s->ep = server;
    pthread_t st;
    pthread_create(&st, NULL, server_main, s);
    expect("dvs_wait4bind_T", dvs_wait4bind_T(server, LONG_WAIT), OK);
    expect("dvs_wait4bind_T timeout", dvs_wait4bind_T(base + 9, 50), EDVSTIMEDOUT);
    expect("dvk_getep", dvk_getep(0), me);
    int gdc = -1, gep = -1, gnode = -1;
    expect("dvs_getep", dvs_getep(&gdc, &gep, &gnode), OK);
    check("dvs_getep values", gdc == dc && gep == me && gnode >= 0, "wrong dc, ep or node");

    /* sendrec: every payload layout comes back, m_source is the server */
    m = request(T_ECHO);
    m.m1_i1 = -5;
    m.m1_i2 = 6;
    m.m1_p3 = (char *)&m;
    m.m_word[6] = 0x0102030405060708ull;
    strcpy(m.m3_ca1 + 8, "dvs");
    message sent = m;
    expect("dvk_sendrec_T", dvk_sendrec_T(server, &m, LONG_WAIT), OK);
    check("sendrec reply", m.m_type == T_ECHO + 100 && m.m_source == server && m.m1_i1 == -5 &&
          m.m1_i2 == 6 && m.m1_p3 == sent.m1_p3 && m.m_word[6] == sent.m_word[6] &&
          !strcmp(m.m3_ca1 + 8, "dvs"), "reply fields differ");
    void *server_buf = (void *)(uintptr_t)m.m_word[5];

    vcopy_sizes(server);

    /* the client copies into the server's memory while the server waits in receive */
    unsigned char *blk = malloc(4096);
    fill_pattern(77, blk, 4096);
    /* The server goes back to receive after its reply: wait until it is there. */
    expect("server back in receive", wait_blocked(server, server_buf), OK);
    expect("dvk_vcopy client to server's buffer", dvk_vcopy(SELF, blk, server, server_buf, 4096),
           OK);
    m = request(T_CHECK);
    m.m_word[0] = 77;
    m.m_word[2] = 4096;
    dvk_sendrec_T(server, &m, LONG_WAIT);
    check("server saw the client's vcopy", (long)m.m_word[1] == -1, "block differs");
    expect("server back in receive again", wait_blocked(server, server_buf), OK);
    expect("EDVSFAULT vcopy from outside the caller's memory",
           dvk_vcopy(SELF, (void *)16, server, server_buf, 64), EDVSFAULT);
    expect("EDVSFAULT vcopy into outside the caller's memory",
           dvk_vcopy(server, server_buf, SELF, (void *)16, 64), EDVSFAULT);
    expect("EDVSFAULT vcopy outside the server's memory",
           dvk_vcopy(SELF, blk, server, (void *)16, 64), EDVSFAULT);
    expect("EDVS2BIG vcopy above 16 MiB",
           dvs_vcopy_T(SELF, blk, server, server_buf, (17L << 20), LONG_WAIT), EDVS2BIG);
    free(blk);

    /* notify: the value arrives in m_word[0], from the caller */
    expect("dvk_notify_X", dvk_notify_X(SELF, server, 77), OK);
    m = request(T_NOTIFIED);
    dvk_sendrec_T(server, &m, LONG_WAIT);
    check("notify delivered", m.m_word[0] == 77 && (int)m.m_word[1] == me, "value or source");
    expect("dvs_notify", dvs_notify(server, 1ull << 40), OK);
    m = request(T_NOTIFIED);
    dvk_sendrec_T(server, &m, LONG_WAIT);
    check("64-bit notify delivered", m.m_word[0] == 1ull << 40, "value");
    expect("EDVSPERM notify as another endpoint", dvk_notify_X(server, server, 1), EDVSPERM);

    /* send (taken by the server's receive) and receive from a given endpoint */
    m = request(NOTIFY_MTYPE + 1);
    expect("dvk_send_T", dvk_send_T(server, &m, LONG_WAIT), OK);
    m = request(T_PING_BACK);
    expect("sendrec before the server's send", dvk_sendrec_T(server, &m, LONG_WAIT), OK);
    expect("dvk_receive_T from the server", dvk_receive_T(server, &m, LONG_WAIT), OK);
    check("received the server's send", m.m_type == 0x77 && m.m_source == server, "type/source");

    expect("EDVSTIMEDOUT receive no-wait", dvk_receive_T(ANY, &m, TIMEOUT_NOWAIT), EDVSTIMEDOUT);
    expect("EDVSTIMEDOUT receive 50 ms", dvk_receive_T(ANY, &m, 50), EDVSTIMEDOUT);
    m = request(T_ECHO);
    expect("EDVSSELFSEND", dvk_send_T(SELF, &m, LONG_WAIT), EDVSSELFSEND);
    expect("EDVSNOTREPLY", dvk_reply_T(server, &m, TIMEOUT_FOREVER), EDVSNOTREPLY);
    expect("EDVSBADSRCDST", dvk_send_T(100000, &m, LONG_WAIT), EDVSBADSRCDST);
    expect("EDVSENDPOINT", dvk_send_T(base + 8, &m, LONG_WAIT), EDVSENDPOINT);
    expect("EDVSINVAL timeout", dvk_send_T(server, &m, -2), EDVSINVAL);
    expect("EDVSINVAL send to ANY", dvk_send_T(ANY, &m, LONG_WAIT), EDVSINVAL);
    expect("EDVSPERM unbind another endpoint", dvk_unbind(dc, server), EDVSPERM);

    /* deadlock: the server sends to the client, which then sends to the server (a node
     * detects it between its own endpoints only) */
    if (!strcmp(sock_client, sock_server)) {
    m = request(T_DEADLOCK);
    dvk_sendrec_T(server, &m, LONG_WAIT);
    expect("server blocked in its send", wait_blocked(server, server_buf), OK);
    m = request(T_ECHO);
    expect("EDVSDEADLK", dvk_send_T(server, &m, LONG_WAIT), EDVSDEADLK);
    expect("receive the deadlocked send", dvk_receive_T(server, &m, LONG_WAIT), OK);
    }

    /* busy: a vcopy from an endpoint that is bound but not in IPC */
    struct helper idle;
    pthread_t it;
    start_helper(&idle, &it, sock_server, dc, base + 2, NONE, NULL);
    char byte = 0;
    expect("EDVSBUSY", dvk_vcopy(base + 2, &byte, SELF, &byte, 1), EDVSBUSY);
    stop_idle_helper(&idle, it);

    /* the peer goes away while the caller waits on it */
    struct helper dying;
    pthread_t dt;
    start_helper(&dying, &dt, sock_server, dc, base + 3, me, &byte);
    m = request(T_ECHO);
    expect("EDVSDSTDIED", dvk_send_T(base + 3, &m, LONG_WAIT), EDVSDSTDIED);
    pthread_join(dt, NULL);
    start_helper(&dying, &dt, sock_server, dc, base + 4, me, &byte);
    expect("EDVSSRCDIED", dvk_receive_T(base + 4, &m, LONG_WAIT), EDVSSRCDIED);
    pthread_join(dt, NULL);

    m = request(T_STOP);
    expect("stop the server", dvk_sendrec_T(server, &m, LONG_WAIT), OK);
    pthread_join(st, NULL);
    check("server bound", s->bind_rc == server, "server bind failed");
    free(s);
    expect("dvk_unbind", dvk_unbind(dc, me), OK);
    expect("EDVSNOTBIND after unbind", dvk_getep(0), EDVSNOTBIND);
}

/* ---- a full queue ---------------------------------------------------------------------- */

/* A thread that binds, sends one message to `dst` and keeps the code. */
struct sender { const char *socket; int dc, ep, dst; long bind_rc, rc; };

static void *sender_main(void *arg)
{
    struct sender *s = arg;
    s->bind_rc = dvs_bind_at(s->socket, s->dc, s->ep);
    if (s->bind_rc < 0)
        return NULL;
    message m = request(s->ep);
    s->rc = dvk_send_T(s->dst, &m, LONG_WAIT);
    dvk_unbind(s->dc, SELF);
    return NULL;
}

/* Polls until sender `ep` has bound (a vcopy from it stops answering EDVSENDPOINT) and is
 * blocked in its send (it stops answering EDVSBUSY); returns the last code. At most ~20 s. */
static long wait_queued(int ep, const void *addr)
{
    char probe;
    long rc = EDVSENDPOINT;
    for (int i = 0; i < 4000 && (rc == EDVSBUSY || rc == EDVSENDPOINT); i++) {
        rc = dvk_vcopy(ep, addr, SELF, &probe, 1);
        if (rc == EDVSBUSY || rc == EDVSENDPOINT)
            sleep_ms(5);
    }
    return rc;
}

/* The destination: binds BASE, stays out of IPC until `go`, then receives `n` messages. */
struct sink { const char *socket; int dc, ep, n, go, bound, received; long bind_rc;
              pthread_mutex_t mu; pthread_cond_t cv; };

static void *sink_main(void *arg)
{
    struct sink *k = arg;
    k->bind_rc = dvs_bind_at(k->socket, k->dc, k->ep);
    pthread_mutex_lock(&k->mu);
    k->bound = 1;
    pthread_cond_broadcast(&k->cv);
    while (!k->go)
        pthread_cond_wait(&k->cv, &k->mu);
    pthread_mutex_unlock(&k->mu);
    if (k->bind_rc < 0)
        return NULL;
    for (int i = 0; i < k->n; i++) {
        message m;
        if (dvk_receive_T(ANY, &m, LONG_WAIT) == OK)
            k->received++;
    }
    dvk_unbind(k->dc, SELF);
    return NULL;
}

/* BASE's queue holds at most N messages (the DC's max_queue): N senders block in a send to
 * BASE, which is bound but not receiving; once each is queued (see wait_queued), one
 * more send to BASE fails with EDVSNOSPC, from this node and from SOCK_REMOTE's. Then BASE
 * receives, and every queued send and a new one complete. */
static void queuefull(const char *sock, const char *sock_remote, int dc, int base, int n)
{
    static char probe; /* an address in this process, for the vcopy probes */
    if (n < 1 || n > 16) {
        check("queuefull N", 0, "N must be 1..16");
        return;
    }
    struct sink k;
    memset(&k, 0, sizeof k);
    k.socket = sock;
    k.dc = dc;
    k.ep = base;
    k.n = n + 1;
    pthread_mutex_init(&k.mu, NULL);
    pthread_cond_init(&k.cv, NULL);
    pthread_t kt;
    pthread_create(&kt, NULL, sink_main, &k);
    pthread_mutex_lock(&k.mu);
    while (!k.bound)
        pthread_cond_wait(&k.cv, &k.mu);
    pthread_mutex_unlock(&k.mu);
    expect("destination bound", k.bind_rc, base);

    int me = base + n + 1;
    expect("prober bound", dvs_bind_at(sock, dc, me), me);
    struct sender senders[16];
    pthread_t st[16];
    for (int i = 0; i < n; i++) {
        senders[i] = (struct sender){sock, dc, base + 1 + i, base, 0, 0};
        pthread_create(&st[i], NULL, sender_main, &senders[i]);
    }
    for (int i = 0; i < n; i++) {
        char name[64];
        snprintf(name, sizeof name, "sender %d queued", i + 1);
        expect(name, wait_queued(base + 1 + i, &probe), OK);
    }
    message m = request(T_ECHO);
    expect("EDVSNOSPC local send", dvk_send_T(base, &m, LONG_WAIT), EDVSNOSPC);
    expect("EDVSNOSPC local sendrec", dvk_sendrec_T(base, &m, LONG_WAIT), EDVSNOSPC);
    struct sender remote = {sock_remote, dc, base + n + 2, base, 0, 0};
    pthread_t rt;
    pthread_create(&rt, NULL, sender_main, &remote);
    pthread_join(rt, NULL);
    expect("remote sender bound", remote.bind_rc, base + n + 2);
    expect("EDVSNOSPC remote send", remote.rc, EDVSNOSPC);

    pthread_mutex_lock(&k.mu);
    k.go = 1;
    pthread_cond_broadcast(&k.cv);
    pthread_mutex_unlock(&k.mu);
    for (int i = 0; i < n; i++) {
        char name[64];
        pthread_join(st[i], NULL);
        snprintf(name, sizeof name, "queued send %d delivered", i + 1);
        expect(name, senders[i].rc, OK);
    }
    m = request(T_ECHO);
    expect("send once the queue has room", dvk_send_T(base, &m, LONG_WAIT), OK);
    pthread_join(kt, NULL);
    check("destination received every message", k.received == n + 1, "messages missing");
    expect("prober unbound", dvk_unbind(dc, me), OK);
}

/* ---- bad input ------------------------------------------------------------------------ */

static void badinput(const char *sock, int dc, int ep)
{
    message m;
    memset(&m, 0, sizeof m);
    expect("dvs_bind_at null socket", dvs_bind_at(NULL, dc, ep), EDVSFAULT);
    expect("bind negative dc", dvs_bind_at(sock, -1, ep), EDVSINVAL);
    expect("bind ANY", dvs_bind_at(sock, dc, ANY), EDVSINVAL);
    expect("bind INT_MIN", dvs_bind_at(sock, dc, INT_MIN), EDVSBADSRCDST);
    expect("bind", dvs_bind_at(sock, dc, ep), ep);
    expect("send null", dvk_send_T(ep + 1, NULL, 100), EDVSFAULT);
    expect("receive null", dvk_receive_T(ANY, NULL, 100), EDVSFAULT);
    expect("sendrec null", dvk_sendrec_T(ep + 1, NULL, 100), EDVSFAULT);
    expect("reply null", dvk_reply_T(ep + 1, NULL, 100), EDVSFAULT);
    expect("timeout -5", dvk_receive_T(ANY, &m, -5), EDVSINVAL);
    expect("timeout LONG_MIN", dvk_receive_T(ANY, &m, LONG_MIN), EDVSINVAL);
    expect("timeout LONG_MAX", dvk_receive_T(ANY, &m, LONG_MAX), EDVSINVAL);
    char buf[16];
    expect("vcopy negative size", dvk_vcopy(SELF, buf, SELF, buf, -1), EDVSINVAL);
    expect("vcopy INT_MIN size", dvk_vcopy(SELF, buf, SELF, buf, INT_MIN), EDVSINVAL);
    expect("vcopy null source", dvk_vcopy(SELF, NULL, SELF, buf, 1), EDVSFAULT);
    expect("vcopy null destination", dvk_vcopy(SELF, buf, SELF, NULL, 1), EDVSFAULT);
    expect("vcopy outside memory", dvk_vcopy(SELF, (void *)8, SELF, buf, 8), EDVSFAULT);
    expect("vcopy unmapped high address",
           dvk_vcopy(SELF, (void *)0x7ffffffff000ul, SELF, buf, 16), EDVSFAULT);
    expect("vcopy past the end of memory",
           dvs_vcopy_T(SELF, buf, SELF, (void *)(UINTPTR_MAX - 4), 16, 100), EDVSFAULT);
    expect("vcopy 2 GiB", dvs_vcopy_T(SELF, buf, SELF, buf, INT_MAX, 100), EDVS2BIG);
    expect("vcopy from ANY", dvk_vcopy(ANY, buf, SELF, buf, 1), EDVSINVAL);
    expect("notify ANY", dvk_notify_X(SELF, ANY, 1), EDVSINVAL);
    expect("getep other pid", dvk_getep(1), EDVSINVAL);
    expect("dvs_getep nulls", dvs_getep(NULL, NULL, NULL), OK);
    check("strerror unknown", !strcmp(dvk_strerror(12345), "unknown error code"), "text");
    check("strerror ok", !strcmp(dvk_strerror(0), "success"), "text");
    expect("unbind wrong dc", dvk_unbind(dc + 1, ep), EDVSPERM);
    expect("still bound", dvk_getep(0), ep);
    expect("unbind", dvk_unbind(dc, ep), OK);
    expect("unbind twice", dvk_unbind(dc, ep), EDVSNOTBIND);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 6 && !strcmp(argv[1], "calls")) {
        int dc = atoi(argv[4]), base = atoi(argv[5]);
        calls(argv[2], argv[3], dc, base);
    } else if (argc == 7 && !strcmp(argv[1], "queuefull")) {
        queuefull(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]), atoi(argv[6]));
    } else if (argc == 5 && !strcmp(argv[1], "badinput")) {
        badinput(argv[2], atoi(argv[3]), atoi(argv[4]));
    } else if (argc == 5 && !strcmp(argv[1], "bind")) {
        printf("bind %ld\n", dvs_bind_at(argv[2], atoi(argv[3]), atoi(argv[4])));
    } else if (argc == 5 && !strcmp(argv[1], "block")) {
        long rc = dvs_bind_at(argv[2], atoi(argv[3]), atoi(argv[4]));
        printf("bound %ld\n", rc);
        if (rc < 0)
            return 1;
        message m;
        printf("receive %ld\n", dvk_receive_T(ANY, &m, TIMEOUT_FOREVER));
    } else if (argc == 6 && !strcmp(argv[1], "send")) {
        long rc = dvs_bind_at(argv[2], atoi(argv[3]), atoi(argv[4]));
        if (rc < 0) {
            printf("bind %ld\n", rc);
            return 1;
        }
        message m;
        memset(&m, 0, sizeof m);
        printf("send %ld\n", dvk_send_T(atoi(argv[5]), &m, LONG_WAIT));
    } else {
        fprintf(stderr, "usage: see the comment at the top of m3ipc_test.c\n");
        return 2;
    }
    printf("%d failed\n", failures);
    return failures ? 1 : 0;
}
