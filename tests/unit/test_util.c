/* The shared helpers: backoff arithmetic, the replaceable random source,
 * argv vectors, URL inspection through libcurl's parser. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "macro.h"
#include "util.h"

static void test_backoff(void **st) {
        const usec_t s = USEC_PER_SEC;

        assert_int_equal(backoff_usec(60 * s, 3600 * s, 0), 0);
        assert_int_equal(backoff_usec(60 * s, 3600 * s, 1), 60 * s);
        assert_int_equal(backoff_usec(60 * s, 3600 * s, 2), 120 * s);
        assert_int_equal(backoff_usec(60 * s, 3600 * s, 6), 1920 * s);
        assert_int_equal(backoff_usec(60 * s, 3600 * s, 7), 3600 * s);
        assert_int_equal(backoff_usec(60 * s, 3600 * s, 4000000000u), 3600 * s);
        assert_int_equal(backoff_next(0, 500, 30000), 500);
        assert_int_equal(backoff_next(500, 500, 30000), 1000);
        assert_int_equal(backoff_next(16000, 500, 30000), 30000);
        assert_int_equal(backoff_next(30000, 500, 30000), 30000);
        /* No overflow near the top of the range. */
        assert_int_equal(backoff_next(UINT64_MAX - 1, 1, UINT64_MAX), UINT64_MAX);
}

static uint64_t counting_source(void *userdata) {
        uint64_t *n = userdata;
        return (*n)++ << 11;
}

static void test_random_source(void **st) {
        uint64_t n = 0;

        random_set_source(counting_source, &n);
        assert_int_equal(random_u64(), 0);
        assert_int_equal(random_u64(), 1 << 11);
        assert_true(random_unit() < 1e-12);
        /* jitter 0 is exact; jitter 0.5 stays within +-50 %. */
        assert_int_equal(jittered(1000, 0.0), 1000);
        random_set_source(NULL, NULL);
        for (int i = 0; i < 1000; i++) {
                usec_t j = jittered(1000000, 0.5);
                assert_true(j >= 500000 && j <= 1500000);
                double u = random_unit();
                assert_true(u >= 0.0 && u < 1.0);
        }
}

static void test_strv(void **st) {
        char *v[] = {"a", "bc", NULL};
        char **c = strv_copy(v);

        assert_non_null(c);
        assert_string_equal(c[0], "a");
        assert_string_equal(c[1], "bc");
        assert_null(c[2]);
        assert_null(strv_free(c));
        assert_null(strv_copy(NULL));
        assert_null(strv_free(NULL));
}

static void test_url(void **st) {
        UrlInfo u;

        assert_int_equal(url_inspect("https://P1.Example:8443/x", &u), 0);
        assert_true(u.https);
        assert_false(u.has_userinfo);
        assert_int_equal(u.port, 8443);
        assert_string_equal(u.host, "p1.example");
        assert_int_equal(url_inspect("HTTP://h", &u), 0);
        assert_false(u.https);
        assert_int_equal(u.port, 80);
        assert_int_equal(url_inspect("https://[fd00::1]:5/", &u), 0);
        assert_string_equal(u.host, "fd00::1");
        assert_int_equal(url_inspect("http://agent:pw@host", &u), 0);
        assert_true(u.has_userinfo);
        assert_int_equal(url_inspect("http://agent@host", &u), 0);
        assert_true(u.has_userinfo);
        assert_int_equal(url_inspect("ftp://host", &u), -EINVAL);
        assert_int_equal(url_inspect("host:80", &u), -EINVAL);
        assert_int_equal(url_inspect("https://", &u), -EINVAL);
        assert_int_equal(url_inspect(NULL, &u), -EINVAL);

        assert_true(url_same_origin("https://a:443/x", "HTTPS://A/y"));
        assert_false(url_same_origin("https://a/x", "http://a/x"));
        assert_false(url_same_origin("https://a:8443/", "https://a/"));
        assert_true(url_is_plain_http("Http://a"));
        assert_false(url_is_plain_http("https://a"));
        assert_false(url_is_plain_http("nonsense"));
}

/* splitmix64: a seeded, reproducible source for the draws below. */
static uint64_t seeded_source(void *userdata) {
        uint64_t *x = userdata, z = (*x += 0x9e3779b97f4a7c15ULL);

        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
}

static uint64_t all_ones_source(void *userdata) {
        return UINT64_MAX;
}

static void test_full_jitter(void **st) {
        const usec_t first = 250 * USEC_PER_MSEC, max = 30 * USEC_PER_SEC;
        uint64_t seed = 14, zero = 0;

        /* The ends of the range: the lowest draw is 0, the highest the ceiling. */
        random_set_source(counting_source, &zero);
        assert_int_equal(backoff_full_jitter(first, max, 3), 0);
        random_set_source(all_ones_source, NULL);
        assert_int_equal(backoff_full_jitter(first, max, 3), 4 * first);
        assert_int_equal(backoff_full_jitter(first, max, 100), max);
        assert_int_equal(random_usec(0), 0);
        /* No overflow at the top (where doubles step by 2^11). */
        assert_true(random_usec(UINT64_MAX) >= UINT64_MAX - 4096);
        assert_int_equal(backoff_full_jitter(first, max, 0), 0);

        /* Over many seeded draws: within [0, ceiling], reaching both ends,
         * the mean near half the ceiling (uniform, not clustered). */
        random_set_source(seeded_source, &seed);
        for (unsigned failures = 1; failures <= 12; failures++) {
                usec_t ceiling = backoff_usec(first, max, failures), lo = UINT64_MAX, hi = 0;
                double sum = 0;
                const int n = 20000;

                for (int i = 0; i < n; i++) {
                        usec_t d = backoff_full_jitter(first, max, failures);
                        assert_true(d <= ceiling);
                        lo = d < lo ? d : lo;
                        hi = d > hi ? d : hi;
                        sum += (double) d;
                }
                assert_true(lo < ceiling / 100);
                assert_true(hi > ceiling - ceiling / 100);
                assert_true(sum / n > 0.48 * (double) ceiling && sum / n < 0.52 * (double) ceiling);
        }
        random_set_source(NULL, NULL);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_backoff),     cmocka_unit_test(test_random_source),
                cmocka_unit_test(test_strv),        cmocka_unit_test(test_url),
                cmocka_unit_test(test_full_jitter),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
