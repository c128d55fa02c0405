/* Discovery of poll targets: which URLs learned from answers are polled,
 * and which are refused (they would receive the Provider token). */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "discovery.h"
#include "macro.h"

static Config config(const char *endpoint) {
        Config c = {};

        c.endpoints[0] = (char *) endpoint;
        c.n_endpoints = 1;
        return c;
}

static void test_url_acceptable(void **st) {
        Config tls = config("https://p1.example:8443"), plain = config("HTTP://127.0.0.1:1");

        assert_true(discovery_url_acceptable(&tls, "https://p2.example:8443"));
        assert_true(discovery_url_acceptable(&tls, "HTTPS://p2.example:8443"));
        /* The token never goes to a URL carrying credentials (contract 2)... */
        assert_false(discovery_url_acceptable(&tls, "https://agent:pw@p2.example:8443"));
        assert_false(discovery_url_acceptable(&tls, "https://agent@p2.example:8443"));
        assert_false(discovery_url_acceptable(&plain, "http://a:b@127.0.0.1:2"));
        /* ... nor in clear when the configuration uses TLS. */
        assert_false(discovery_url_acceptable(&tls, "http://p2.example:8080"));
        assert_true(discovery_url_acceptable(&plain, "http://127.0.0.1:2"));
        assert_false(discovery_url_acceptable(&tls, "ftp://p2.example"));
        assert_false(discovery_url_acceptable(&tls, "p2.example:8443"));
}

static void node(NodeRef *n, const char *id, const char *url) {
        strscpy(n->id, sizeof(n->id), id);
        strscpy(n->api_url, sizeof(n->api_url), url);
}

static void test_targets(void **st) {
        Config c = config("https://p1.example");
        PersistentState s = {};
        PollAnswer answers[2] = {};
        PollRound round = {.answers = answers, .n_answers = 2};
        const char *urls[DISCOVERY_MAX];
        size_t n;

        node(&s.nodes[0], "p1", "https://p1.example");
        node(&s.nodes[1], "p2", "https://user:pw@p2.example");
        s.n_nodes = 2;
        /* A node's answer and the load balancer's, each listing p3. */
        answers[0].ok = true;
        node(&answers[0].state.nodes[0], "p3", "https://p3.example");
        answers[0].state.n_nodes = 1;
        answers[1].ok = answers[1].via_load_balancer = true;
        node(&answers[1].state.nodes[0], "p3", "https://p3.example");
        node(&answers[1].state.nodes[1], "p4", "https://p4.example");
        answers[1].state.n_nodes = 2;

        /* Nothing committed: every answer's list counts, each URL once. */
        n = discovery_targets(&c, &s, &round, urls, DISCOVERY_MAX);
        assert_int_equal(n, 3);
        assert_string_equal(urls[0], "https://p1.example");
        assert_string_equal(urls[1], "https://p3.example");
        assert_string_equal(urls[2], "https://p4.example");

        /* Committed: only the state's list and the load balancer's. */
        s.committed.epoch = 3;
        answers[1].state.n_nodes = 1;
        n = discovery_targets(&c, &s, &round, urls, DISCOVERY_MAX);
        assert_int_equal(n, 2);
        assert_string_equal(urls[1], "https://p3.example");

        /* The cap holds. */
        assert_int_equal(discovery_targets(&c, &s, &round, urls, 1), 1);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_url_acceptable),
                cmocka_unit_test(test_targets),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
