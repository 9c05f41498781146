/*
 * bench_client: the C side of `dvs bench ipc --lang c`. Binds EP of DC at SOCKET, does
 * WARMUP then N sendrec round trips to SERVER (the bench server echoes type 0x6201) and
 * prints each measured round trip in nanoseconds, one per line.
 *
 *   bench_client SOCKET DC EP SERVER WARMUP N
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "m3ipc.h"

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s SOCKET DC EP SERVER WARMUP N\n", argv[0]);
        return 2;
    }
    int dc = atoi(argv[2]), ep = atoi(argv[3]), server = atoi(argv[4]);
    long warmup = atol(argv[5]), n = atol(argv[6]);
    long rc = dvs_bind_at(argv[1], dc, ep);
    if (rc < 0) {
        fprintf(stderr, "bench_client: bind: %s (%s)\n", dvk_strerror((int)rc), dvs_last_error());
        return 1;
    }
    long long *ns = malloc(sizeof *ns * (size_t)(n > 0 ? n : 1));
    message m;
    for (long i = 0; i < warmup + n; i++) {
        memset(&m, 0, sizeof m);
        m.m_type = 0x6201;
        m.m_word[0] = (uint64_t)i;
        long long t0 = now_ns();
        rc = dvk_sendrec_T(server, &m, 5000);
        long long t1 = now_ns();
        if (rc < 0 || m.m_word[0] != (uint64_t)i) {
            fprintf(stderr, "bench_client: sendrec %ld: %s\n", i, dvk_strerror((int)rc));
            return 1;
        }
        if (i >= warmup)
            ns[i - warmup] = t1 - t0;
    }
    dvk_unbind(dc, SELF);
    for (long i = 0; i < n; i++)
        printf("%lld\n", ns[i]);
    return 0;
}
