/* Token bucket and rate-limited logging: see ratelimit.h. */
#include "ratelimit.h"

#include <stdio.h>
#include <string.h>

#define MICRO ((int64_t) 1000000)

RateLimit ratelimit_init(unsigned burst, unsigned rate, uint64_t now) {
        return (RateLimit){
                .burst = burst,
                .rate = rate > 0 ? rate : 1,
                .micro = (int64_t) burst * MICRO,
                .usec = now,
        };
}

/* Adds what flowed in since the last refill, up to burst. Compares the
 * time against what fills the bucket first, so that a long pause cannot
 * overflow the product. */
static void refill(RateLimit *rl, uint64_t now) {
        int64_t cap = (int64_t) rl->burst * MICRO;
        uint64_t elapsed;

        if (now <= rl->usec)
                return;
        elapsed = now - rl->usec;
        rl->usec = now;
        if (rl->micro >= cap)
                return;
        if (elapsed >= (uint64_t) (cap - rl->micro) / rl->rate + 1)
                rl->micro = cap;
        else {
                rl->micro += (int64_t) elapsed * rl->rate;
                if (rl->micro > cap)
                        rl->micro = cap;
        }
}

uint64_t ratelimit_ready_at(RateLimit *rl, uint64_t now) {
        uint64_t missing;

        refill(rl, now);
        if (rl->micro >= MICRO)
                return now;
        /* Counted from the last refill, should now lie before it. */
        missing = (uint64_t) (MICRO - rl->micro);
        return (now > rl->usec ? now : rl->usec) + (missing + rl->rate - 1) / rl->rate;
}

bool ratelimit_take(RateLimit *rl, uint64_t now) {
        if (ratelimit_ready_at(rl, now) > now)
                return false;
        rl->micro -= MICRO;
        return true;
}

void ratelimit_charge(RateLimit *rl, uint64_t now) {
        refill(rl, now);
        rl->micro -= MICRO;
}

RateLog ratelog_init(uint64_t interval, unsigned burst) {
        return (RateLog){.interval = interval, .burst = burst};
}

bool ratelog_check(RateLog *rl, uint64_t now, uint64_t *ret_suppressed) {
        *ret_suppressed = 0;
        if (now - rl->window_start >= rl->interval) {
                *ret_suppressed = rl->suppressed;
                rl->window_start = now;
                rl->lines = 0;
                rl->suppressed = 0;
        }
        if (rl->lines >= rl->burst) {
                rl->suppressed++;
                return false;
        }
        rl->lines++;
        return true;
}

RateLimitTable ratelimit_table_init(unsigned burst, unsigned rate) {
        return (RateLimitTable){.burst = burst, .rate = rate};
}

RateLimit *ratelimit_table_get(RateLimitTable *t, const char *key, uint64_t now) {
        RateLimitEntry *e = NULL;

        for (size_t i = 0; i < t->n; i++)
                if (strncmp(t->entries[i].key, key, RATELIMIT_KEY_MAX) == 0) {
                        e = &t->entries[i];
                        break;
                }
        if (!e) {
                if (t->n < RATELIMIT_TABLE_MAX)
                        e = &t->entries[t->n++];
                else {
                        e = &t->entries[0];
                        for (size_t i = 1; i < t->n; i++)
                                if (t->entries[i].used < e->used)
                                        e = &t->entries[i];
                }
                snprintf(e->key, sizeof(e->key), "%s", key);
                e->bucket = ratelimit_init(t->burst, t->rate, now);
        }
        e->used = now;
        return &e->bucket;
}
