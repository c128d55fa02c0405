/* Rate limits as pure arithmetic: a token bucket, and a counter that lets
 * at most so many log lines through per interval. The caller passes the
 * time in (CLOCK_MONOTONIC microseconds); nothing here reads a clock, logs
 * or allocates, so unit tests drive both with tables of times. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A token bucket: at most burst tokens, refilled at rate tokens per
 * second. Tokens are kept in millionths, so the arithmetic is exact in
 * integers. */
typedef struct RateLimit {
        unsigned burst;
        unsigned rate; /* tokens per second, at least 1 */
        int64_t micro; /* tokens x 1000000; below 0: in debt (ratelimit_charge) */
        uint64_t usec; /* when it was last refilled */
} RateLimit;

/* A full bucket as of now. */
RateLimit ratelimit_init(unsigned burst, unsigned rate, uint64_t now);

/* When the next token is there: now when one is, else the first
 * microsecond at which it will be. A time before the last one passed in
 * refills nothing, and the wait is counted from the last one. */
uint64_t ratelimit_ready_at(RateLimit *rl, uint64_t now);

/* Takes one token when one is there; false (and nothing taken) when not. */
bool ratelimit_take(RateLimit *rl, uint64_t now);

/* Takes one token whether or not it is there, for a use that happened
 * anyway: the bucket may go into debt, which the refill repays before the
 * next token is there. */
void ratelimit_charge(RateLimit *rl, uint64_t now);

/* Rate-limited logging: at most burst lines per window of interval
 * microseconds; the lines over that are counted, and the count is handed
 * back once, by the first call after their window ended. */
typedef struct RateLog {
        uint64_t interval;
        unsigned burst;
        uint64_t window_start;
        unsigned lines;      /* logged in the current window */
        uint64_t suppressed; /* not logged in the current window */
} RateLog;

/* The first window starts at time 0. */
RateLog ratelog_init(uint64_t interval, unsigned burst);

/* Counts one line at now: true when it may be logged. *ret_suppressed is
 * the number of lines suppressed in the window this call ended (to be
 * reported once, before this line), else 0. */
bool ratelog_check(RateLog *rl, uint64_t now, uint64_t *ret_suppressed);

/* Token buckets per key (a peer address): a fixed table, so a flood of
 * keys costs no memory. A key not in the table gets a full bucket; when
 * the table is full, the entry used least recently makes room. */
#define RATELIMIT_KEY_MAX   48
#define RATELIMIT_TABLE_MAX 64u

typedef struct RateLimitEntry {
        char key[RATELIMIT_KEY_MAX];
        uint64_t used; /* last lookup, for the eviction */
        RateLimit bucket;
} RateLimitEntry;

typedef struct RateLimitTable {
        unsigned burst, rate;
        RateLimitEntry entries[RATELIMIT_TABLE_MAX];
        size_t n;
} RateLimitTable;

RateLimitTable ratelimit_table_init(unsigned burst, unsigned rate);
/* The bucket of key (created full at now when missing); never NULL. */
RateLimit *ratelimit_table_get(RateLimitTable *t, const char *key, uint64_t now);
