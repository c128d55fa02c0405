/* The token bucket and the log limiter, driven by tables of times: each
 * row is one call at one time and what it must answer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>

#include <cmocka.h>

#include "macro.h"
#include "ratelimit.h"

#define S USEC_PER_SEC

typedef enum Op {
        TAKE,   /* ratelimit_take: expect 1 (taken) or 0 */
        READY,  /* ratelimit_ready_at: expect the time */
        CHARGE, /* ratelimit_charge: no answer */
} Op;

typedef struct Step {
        Op op;
        uint64_t now;
        uint64_t expect;
} Step;

typedef struct Case {
        const char *name;
        unsigned burst, rate;
        uint64_t start;
        Step steps[16];
        size_t n_steps;
} Case;

#define STEPS(...) .steps = {__VA_ARGS__}, .n_steps = ELEMENTSOF(((Step[]){__VA_ARGS__}))

static const Case bucket_cases[] = {
        {"burst then one a second", 2, 1, 1000,
         STEPS({TAKE, 1000, 1}, {TAKE, 1000, 1}, {TAKE, 1000, 0}, {READY, 1000, 1000 + S},
               {TAKE, 1000 + S - 1, 0}, {TAKE, 1000 + S, 1}, {READY, 1000 + S, 1000 + 2 * S},
               {READY, 1000 + S + S / 2, 1000 + 2 * S})},
        {"a long pause refills to the burst only", 2, 1, 0,
         STEPS({TAKE, 0, 1}, {TAKE, 0, 1}, {TAKE, 100000 * S, 1}, {TAKE, 100000 * S, 1},
               {TAKE, 100000 * S, 0})},
        {"the hint bucket: 4 at once, then 8 a second", 4, 8, 0,
         STEPS({TAKE, 5 * S, 1}, {TAKE, 5 * S, 1}, {TAKE, 5 * S, 1}, {TAKE, 5 * S, 1}, {TAKE, 5 * S, 0},
               {READY, 5 * S, 5 * S + S / 8}, {TAKE, 5 * S + S / 8, 1},
               {READY, 5 * S + S / 8, 5 * S + S / 4})},
        {"a charge without a token is a debt", 4, 8, 0,
         STEPS({TAKE, S, 1}, {TAKE, S, 1}, {TAKE, S, 1}, {TAKE, S, 1}, {CHARGE, S, 0}, {READY, S, S + S / 4},
               {TAKE, S + S / 4 - 1, 0}, {TAKE, S + S / 4, 1})},
        {"a charge with a token is a take", 2, 1, 0, STEPS({CHARGE, 0, 0}, {TAKE, 0, 1}, {TAKE, 0, 0})},
        {"a rate that does not divide a second rounds up", 1, 3, 0,
         STEPS({TAKE, 0, 1}, {READY, 0, 333334}, {TAKE, 333333, 0}, {TAKE, 333334, 1})},
        {"time that goes back refills nothing", 1, 1, 10 * S,
         STEPS({TAKE, 10 * S, 1}, {TAKE, 5 * S, 0}, {READY, 5 * S, 11 * S}, {TAKE, 11 * S, 1})},
        {"the notify buckets: 40, then 20 a second", 40, 20, 0,
         STEPS({READY, 0, 0}, {READY, UINT64_MAX / 2, UINT64_MAX / 2}, {TAKE, UINT64_MAX / 2, 1})},
};

static void test_bucket_table(void **st) {
        for (size_t i = 0; i < ELEMENTSOF(bucket_cases); i++) {
                const Case *c = &bucket_cases[i];
                RateLimit rl = ratelimit_init(c->burst, c->rate, c->start);

                for (size_t j = 0; j < c->n_steps; j++) {
                        const Step *s = &c->steps[j];
                        uint64_t got = 0;

                        if (s->op == TAKE)
                                got = ratelimit_take(&rl, s->now);
                        else if (s->op == READY)
                                got = ratelimit_ready_at(&rl, s->now);
                        else
                                ratelimit_charge(&rl, s->now);
                        if (got != s->expect)
                                fail_msg("%s, step %zu: got %" PRIu64 ", expected %" PRIu64, c->name, j, got,
                                         s->expect);
                }
        }
}

/* A full bucket of burst tokens takes exactly burst, at any rate. */
static void test_bucket_burst(void **st) {
        for (unsigned burst = 0; burst < 50; burst++) {
                RateLimit rl = ratelimit_init(burst, 7, 123);
                unsigned n = 0;

                while (ratelimit_take(&rl, 123))
                        n++;
                assert_int_equal(n, burst);
        }
}

typedef struct LogStep {
        uint64_t now;
        bool ok;
        uint64_t suppressed;
} LogStep;

static void test_ratelog_table(void **st) {
        /* 2 lines per 10 us window; the first window starts at 0. */
        static const LogStep steps[] = {
                {0, true, 0},   {1, true, 0},   {2, false, 0}, {3, false, 0}, {10, true, 2},
                {11, true, 0},  {12, false, 0}, {25, true, 1}, {40, true, 0}, {41, true, 0},
                {49, false, 0}, {49, false, 0}, {50, true, 2},
        };
        RateLog rl = ratelog_init(10, 2);

        for (size_t i = 0; i < ELEMENTSOF(steps); i++) {
                uint64_t suppressed = 99;
                bool ok = ratelog_check(&rl, steps[i].now, &suppressed);

                if (ok != steps[i].ok || suppressed != steps[i].suppressed)
                        fail_msg("step %zu (t=%" PRIu64 "): got %d/%" PRIu64 ", expected %d/%" PRIu64, i,
                                 steps[i].now, ok, suppressed, steps[i].ok, steps[i].suppressed);
        }
}

static void test_table_per_key(void **state) {
        RateLimitTable t = ratelimit_table_init(2, 1);
        RateLimit *a = ratelimit_table_get(&t, "10.0.0.1", 0);

        assert_true(ratelimit_take(a, 0));
        assert_true(ratelimit_take(a, 0));
        assert_false(ratelimit_take(ratelimit_table_get(&t, "10.0.0.1", 1), 1));
        /* Another key has its own, full bucket. */
        assert_true(ratelimit_take(ratelimit_table_get(&t, "10.0.0.2", 2), 2));
        assert_true(ratelimit_take(ratelimit_table_get(&t, "10.0.0.2", 2), 2));
        assert_int_equal(t.n, 2);
        /* A full table evicts the entry used least recently, never the one asked for. */
        for (unsigned i = 0; i < RATELIMIT_TABLE_MAX + 5; i++) {
                char key[32];
                snprintf(key, sizeof(key), "k%u", i);
                (void) ratelimit_table_get(&t, key, 10 + i);
                (void) ratelimit_table_get(&t, "10.0.0.1", 10 + i); /* kept in use */
        }
        assert_int_equal(t.n, RATELIMIT_TABLE_MAX);
        a = ratelimit_table_get(&t, "10.0.0.1", 100);
        assert_false(ratelimit_take(a, 10)); /* still the drained bucket, not a fresh one */
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_bucket_table),
                cmocka_unit_test(test_bucket_burst),
                cmocka_unit_test(test_ratelog_table),
                cmocka_unit_test(test_table_per_key),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
