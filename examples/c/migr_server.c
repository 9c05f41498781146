/*
 * migr_server: the C twin of the Rust migr-server (the paper's migrating test server).
 *
 * For each request it fills a block with the pattern of the request's sequence number,
 * copies it into the client's buffer with dvk_vcopy and replies with its request counter,
 * which lives in process memory and so travels with a criu migration.
 *
 *   dvs run --dc dc0 --ep 1 -- ./migr_server [--delay-ms N]
 *   ./migr_server --socket PATH --dc 0 --ep 1          (outside dvs run)
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "m3ipc.h"
#include "migr.h"

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* Errors after which this endpoint cannot serve anymore. */
static int fatal(long rc)
{
    return rc == EDVSIO || rc == EDVSNOTBIND;
}

/* Tells a waiting client its request was not served; only a lost connection is fatal. */
static long refuse(int client, uint64_t seq)
{
    message m;
    memset(&m, 0, sizeof m);
    m.m_type = MTYPE_REFUSED;
    m.m_word[W_SEQ] = seq;
    long rc = dvk_reply_T(client, &m, TIMEOUT_FOREVER);
    if (rc < 0 && !fatal(rc))
        fprintf(stderr, "migr-server: seq %llu to ep %d: refusal: %s\n",
                (unsigned long long)seq, client, dvk_strerror((int)rc));
    return fatal(rc) ? rc : 0;
}

int main(int argc, char **argv)
{
    const char *socket = NULL;
    int dc = 0, ep = SELF;
    long delay_ms = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--socket") && i + 1 < argc)
            socket = argv[++i];
        else if (!strcmp(argv[i], "--dc") && i + 1 < argc)
            dc = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ep") && i + 1 < argc)
            ep = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--delay-ms") && i + 1 < argc)
            delay_ms = atol(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--socket PATH --dc N --ep N] [--delay-ms N]\n", argv[0]);
            return 2;
        }
    }
    /* The log is a file under dvs run: line buffering makes each line visible at once. */
    setvbuf(stdout, NULL, _IOLBF, 0);

    dvk_open();
    long rc = socket ? dvs_bind_at(socket, dc, ep) : dvk_bind(dc, ep);
    if (rc < 0) {
        fprintf(stderr, "migr-server: cannot bind: %s (%s)\n", dvk_strerror((int)rc),
                dvs_last_error());
        return 1;
    }
    int my_dc, my_ep, node;
    dvs_getep(&my_dc, &my_ep, &node);
    printf("migr-server: dc %d ep %d bound on node %d\n", my_dc, my_ep, node);

    unsigned char *block = NULL;
    size_t block_cap = 0;
    uint64_t counter = 0;
    for (;;) {
        message m;
        rc = dvk_receive_T(ANY, &m, TIMEOUT_FOREVER);
        if (rc == EDVSSHUTDOWN) {
            printf("migr-server: node kernel shutting down after %llu requests\n",
                   (unsigned long long)counter);
            return 0;
        }
        if (fatal(rc)) {
            fprintf(stderr, "migr-server: receive: %s\n", dvk_strerror((int)rc));
            return 1;
        }
        if (rc < 0) {
            fprintf(stderr, "migr-server: receive: %s\n", dvk_strerror((int)rc));
            sleep_ms(10); /* no hot loop should the error repeat */
            continue;
        }
        if (m.m_type == NOTIFY_MTYPE)
            continue;
        int client = m.m_source;
        if (m.m_type != MTYPE_REQUEST) {
            fprintf(stderr, "migr-server: ignoring message of type %#x from ep %d\n", m.m_type,
                    client);
            message no;
            memset(&no, 0, sizeof no);
            no.m_type = MTYPE_REFUSED;
            dvk_reply_T(client, &no, TIMEOUT_FOREVER);
            continue;
        }
        uint64_t seq = m.m_word[W_SEQ], addr = m.m_word[W_ADDR], size = m.m_word[W_SIZE];
        if (size > MAX_BLOCK) {
            fprintf(stderr, "migr-server: seq %llu from ep %d: block of %llu bytes refused\n",
                    (unsigned long long)seq, client, (unsigned long long)size);
            if (refuse(client, seq) < 0)
                return 1;
            continue;
        }
        if (size > block_cap) {
            unsigned char *grown = realloc(block, size);
            if (!grown) {
                fprintf(stderr, "migr-server: out of memory\n");
                return 1;
            }
            block = grown;
            block_cap = size;
        }
        fill_pattern(seq, block, size);
        /* A zero-length copy has no buffer to point at; the pattern is empty anyway. */
        if (size > 0) {
            rc = dvs_vcopy_T(SELF, block, client, (void *)(uintptr_t)addr, (long)size,
                             TIMEOUT_FOREVER);
            if (rc < 0) {
                if (fatal(rc))
                    return 1;
                fprintf(stderr, "migr-server: seq %llu from ep %d: vcopy: %s\n",
                        (unsigned long long)seq, client, dvk_strerror((int)rc));
                if (refuse(client, seq) < 0)
                    return 1;
                continue;
            }
        }
        counter++;
        if (delay_ms > 0)
            sleep_ms(delay_ms);
        message r;
        memset(&r, 0, sizeof r);
        r.m_type = MTYPE_REPLY;
        r.m_word[W_SEQ] = seq;
        r.m_word[W_COUNTER] = counter;
        r.m_word[W_SIZE] = size;
        rc = dvk_reply_T(client, &r, TIMEOUT_FOREVER);
        if (fatal(rc))
            return 1;
        if (rc < 0)
            fprintf(stderr, "migr-server: seq %llu to ep %d: reply: %s\n",
                    (unsigned long long)seq, client, dvk_strerror((int)rc));
        if (counter % 100 == 0) {
            /* Asking the node each time shows where the server runs after a migration. */
            rc = dvs_getep(NULL, NULL, &node);
            if (fatal(rc))
                return 1;
            printf("migr-server: %llu requests served (last seq %llu from ep %d, %llu bytes) "
                   "on node %d\n",
                   (unsigned long long)counter, (unsigned long long)seq, client,
                   (unsigned long long)size, node);
        }
    }
}
