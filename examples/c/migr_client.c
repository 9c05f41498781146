/*
 * migr_client: the C twin of the Rust migr-client (the paper's checking client).
 *
 * Does --iterations sendrec calls to the server, each with a fresh zeroed buffer that the
 * server fills with vcopy, checks every reply, block and server counter, and prints the
 * same summary line (or, with --json, the same JSON object) as the Rust client. Exits 0
 * only if every iteration was ok.
 *
 *   dvs run --dc dc0 --ep 2 --wait -- ./migr_client --server 1 --iterations 1000 --block-size 64K
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "m3ipc.h"
#include "migr.h"

struct tally {
    unsigned long long ok, corrupt, lost, duplicated;
    double max_stall;               /* seconds */
    int have_counter;
    unsigned long long first_counter, last_counter;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A byte count with an optional K/M suffix (powers of 2), at most MAX_BLOCK; -1 if bad. */
static long parse_block(const char *s)
{
    char *end;
    long n = strtol(s, &end, 10);
    if (end == s || n < 0)
        return -1;
    if (*end == 'K' || *end == 'k')
        n <<= 10, end++;
    else if (*end == 'M' || *end == 'm')
        n <<= 20, end++;
    if (*end == 'i' && end[1] == 'B')
        end += 2;
    return (*end == '\0' && n <= (long)MAX_BLOCK) ? n : -1;
}

/* Classifies the reply to request `seq` whose block landed in `buf`, as the Rust Tally. */
static void judge(struct tally *t, uint64_t seq, size_t size, const message *rep,
                  const unsigned char *buf)
{
    if (rep->m_type == MTYPE_REFUSED) {
        t->lost++;
        fprintf(stderr, "migr-client: lost: server refused request %llu (sent %llu)\n",
                (unsigned long long)rep->m_word[W_SEQ], (unsigned long long)seq);
        return;
    }
    if (rep->m_type != MTYPE_REPLY) {
        t->corrupt++;
        fprintf(stderr, "migr-client: corrupt: reply of type %#x from ep %d\n", rep->m_type,
                rep->m_source);
        return;
    }
    unsigned long long counter = rep->m_word[W_COUNTER];
    /* A counter that does not move forward: a restored server served it again. */
    if (t->have_counter && counter <= t->last_counter) {
        t->duplicated++;
        fprintf(stderr, "migr-client: duplicated: server counter %llu after %llu (seq %llu)\n",
                counter, t->last_counter, (unsigned long long)seq);
        return;
    }
    if (!t->have_counter)
        t->first_counter = counter;
    t->have_counter = 1;
    t->last_counter = counter;
    long bad;
    if (rep->m_word[W_SEQ] != seq) {
        t->corrupt++;
        fprintf(stderr, "migr-client: corrupt: reply for seq %llu to request %llu\n",
                (unsigned long long)rep->m_word[W_SEQ], (unsigned long long)seq);
    } else if (rep->m_word[W_SIZE] != size) {
        t->corrupt++;
        fprintf(stderr, "migr-client: corrupt: reply for %llu bytes to a request of %zu\n",
                (unsigned long long)rep->m_word[W_SIZE], size);
    } else if ((bad = check_pattern(seq, buf, size)) >= 0) {
        t->corrupt++;
        fprintf(stderr, "migr-client: corrupt: block of seq %llu: byte %ld differs\n",
                (unsigned long long)seq, bad);
    } else {
        t->ok++;
    }
}

int main(int argc, char **argv)
{
    const char *socket = NULL;
    int dc = 0, ep = SELF, server = -1, json = 0;
    long long iterations = -1, progress = 0;
    long block = -1, timeout_ms = TIMEOUT_FOREVER, wait_ms = 30000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--json")) {
            json = 1;
            continue;
        }
        if (!v)
            goto usage;
        i++;
        if (!strcmp(a, "--server"))
            server = atoi(v);
        else if (!strcmp(a, "--iterations"))
            iterations = atoll(v);
        else if (!strcmp(a, "--block-size"))
            block = parse_block(v);
        else if (!strcmp(a, "--timeout-ms"))
            timeout_ms = atol(v);
        else if (!strcmp(a, "--wait-ms"))
            wait_ms = atol(v);
        else if (!strcmp(a, "--progress"))
            progress = atoll(v);
        else if (!strcmp(a, "--socket"))
            socket = v;
        else if (!strcmp(a, "--dc"))
            dc = atoi(v);
        else if (!strcmp(a, "--ep"))
            ep = atoi(v);
        else
            goto usage;
    }
    if (server < 0 || iterations < 0 || block < 0)
        goto usage;

    long rc = socket ? dvs_bind_at(socket, dc, ep) : dvk_bind(dc, ep);
    if (rc < 0) {
        fprintf(stderr, "migr-client: cannot bind: %s (%s)\n", dvk_strerror((int)rc),
                dvs_last_error());
        return 1;
    }
    rc = dvs_wait4bind_T(server, wait_ms);
    if (rc < 0) {
        fprintf(stderr, "migr-client: server ep %d not bound: %s\n", server,
                dvk_strerror((int)rc));
        return 1;
    }
    struct tally t;
    memset(&t, 0, sizeof t);
    double start = now();
    long long done = 0;
    while (done < iterations) {
        uint64_t seq = (uint64_t)done + 1;
        done++;
        /* A fresh buffer every time: the server must fill pages this process never touched. */
        unsigned char *buf = calloc(1, block ? (size_t)block : 1);
        if (!buf) {
            fprintf(stderr, "migr-client: out of memory\n");
            return 1;
        }
        message m;
        memset(&m, 0, sizeof m);
        m.m_type = MTYPE_REQUEST;
        m.m_word[W_SEQ] = seq;
        m.m_word[W_ADDR] = (uint64_t)(uintptr_t)buf;
        m.m_word[W_SIZE] = (uint64_t)block;
        double t0 = now();
        rc = dvk_sendrec_T(server, &m, timeout_ms);
        double stall = now() - t0;
        if (stall > t.max_stall)
            t.max_stall = stall;
        if (rc == 0) {
            judge(&t, seq, (size_t)block, &m, buf);
        } else {
            t.lost++;
            fprintf(stderr, "migr-client: lost: seq %llu: sendrec: %s\n",
                    (unsigned long long)seq, dvk_strerror((int)rc));
            if (rc == EDVSIO || rc == EDVSNOTBIND || rc == EDVSSHUTDOWN) {
                /* Nothing more can be sent: the rest of the run is lost too. */
                long long rest = iterations - done;
                t.lost += (unsigned long long)rest;
                fprintf(stderr, "migr-client: giving up, %lld iterations not attempted\n", rest);
                free(buf);
                break;
            }
        }
        free(buf);
        if (progress > 0 && done % progress == 0)
            fprintf(stderr, "migr-client: %lld iterations done\n", done);
    }
    double elapsed = now() - start;
    dvk_unbind(dc, SELF);
    char counters[64] = "none";
    if (t.have_counter)
        snprintf(counters, sizeof counters, "%llu..%llu", t.first_counter, t.last_counter);
    if (json) {
        char first[24] = "null", last[24] = "null";
        if (t.have_counter) {
            snprintf(first, sizeof first, "%llu", t.first_counter);
            snprintf(last, sizeof last, "%llu", t.last_counter);
        }
        printf("{\"corrupt\":%llu,\"duplicated\":%llu,\"first_counter\":%s,\"last_counter\":%s,"
               "\"lost\":%llu,\"max_stall_ms\":%.3f,\"ok\":%llu,\"seconds\":%.6f}\n",
               t.corrupt, t.duplicated, first, last, t.lost, t.max_stall * 1e3, t.ok, elapsed);
    } else {
        printf("%llu ok, %llu corrupt, %llu lost, %llu duplicated in %.2f s (max stall %.1f ms, "
               "server counter %s)\n",
               t.ok, t.corrupt, t.lost, t.duplicated, elapsed, t.max_stall * 1e3, counters);
    }
    return t.ok == (unsigned long long)iterations ? 0 : 1;

usage:
    fprintf(stderr,
            "usage: %s --server EP --iterations N --block-size BYTES [--timeout-ms N] "
            "[--wait-ms N] [--json] [--progress N] [--socket PATH --dc N --ep N]\n",
            argv[0]);
    return 2;
}
