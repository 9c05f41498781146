/*
 * What migr_server.c and migr_client.c share with the Rust migr-server and migr-client
 * (crates/dvs-examples/src/lib.rs), so that each C program works with the other language's
 * peer: message types, payload words and the block pattern.
 */
#ifndef MIGR_H
#define MIGR_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MTYPE_REQUEST 0x4d01
#define MTYPE_REPLY 0x4d02
#define MTYPE_REFUSED 0x4d03

/* payload words (m_word[i]) */
#define W_SEQ 0
#define W_ADDR 1 /* request: address of the client's buffer */
#define W_SIZE 2
#define W_COUNTER 1 /* reply: the server's count of requests served */

#define MAX_BLOCK (16u << 20)

/* Word `index` of the block of sequence number `seq` (seq + 1: seq 0 is not mostly zeros). */
static inline uint64_t pattern_word(uint64_t seq, uint64_t index)
{
    return (seq + 1) * 0x9E3779B97F4A7C15ull ^ index;
}

/* Fills `block` with the little-endian pattern words of `seq` (the last one truncated). */
static inline void fill_pattern(uint64_t seq, unsigned char *block, size_t len)
{
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w = pattern_word(seq, i / 8);
        memcpy(block + i, &w, 8);
    }
    if (i < len) {
        uint64_t w = pattern_word(seq, i / 8);
        memcpy(block + i, &w, len - i);
    }
}

/* The offset of the first byte of `block` that differs from the pattern of `seq`, or -1. */
static inline long check_pattern(uint64_t seq, const unsigned char *block, size_t len)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t w = pattern_word(seq, i / 8);
        size_t n = len - i < 8 ? len - i : 8;
        if (memcmp(block + i, &w, n) != 0) {
            for (size_t j = 0; j < n; j++)
                if (block[i + j] != ((unsigned char *)&w)[j])
                    return (long)(i + j);
        }
    }
    return -1;
}

#endif
