/* The AMQP event check (contract section 4's table): per routing key the
 * example body, then one defect at a time, each rejected with its reason.
 * Every event is only a hint, so a rejected one is acked and ignored; what
 * matters is that nothing malformed or unknown is reported as an event. */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "macro.h"
#include "provider.h"

#define PRIMARY_CHANGED "provider.primary.changed"
#define VERSION_CHANGED "provider.version.changed"
#define UPDATE          "agent.update.available"
#define NOT_OBJECT      "body is not a JSON object"
#define UNKNOWN         "unknown routing key"

typedef struct Case {
        const char *key;
        const char *body;
        const char *why; /* NULL: accepted */
} Case;

static const Case cases[] = {
        /* The rows of the contract, as written there. */
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"primary_id\": \"p2\", \"api_url\": \"https://p2.example:8443\"}",
         NULL},
        {VERSION_CHANGED, "{\"node_id\": \"p2\", \"version\": \"9.0.2\"}", NULL},
        {UPDATE, "{\"version\": \"9.0.2\"}", NULL},
        /* Extra fields are allowed (newer Providers), plain http too. */
        {PRIMARY_CHANGED,
         "{\"epoch\": 1, \"primary_id\": \"p-2_x.y\", \"api_url\": \"http://10.0.0.2\", \"reason\": \"x\"}",
         NULL},
        {UPDATE, "{\"version\": \"9.0.2\", \"url\": 3}", NULL},

        /* provider.primary.changed, one field at a time. */
        {PRIMARY_CHANGED, "{\"primary_id\": \"p2\", \"api_url\": \"https://p2\"}",
         "epoch: not a positive integer"},
        {PRIMARY_CHANGED, "{\"epoch\": 0, \"primary_id\": \"p2\", \"api_url\": \"https://p2\"}",
         "epoch: not a positive integer"},
        {PRIMARY_CHANGED, "{\"epoch\": -3, \"primary_id\": \"p2\", \"api_url\": \"https://p2\"}",
         "epoch: not a positive integer"},
        {PRIMARY_CHANGED, "{\"epoch\": \"8\", \"primary_id\": \"p2\", \"api_url\": \"https://p2\"}",
         "epoch: not a positive integer"},
        {PRIMARY_CHANGED, "{\"epoch\": 8.0, \"primary_id\": \"p2\", \"api_url\": \"https://p2\"}",
         "epoch: not a positive integer"},
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"api_url\": \"https://p2\"}", "primary_id: missing or invalid"},
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"primary_id\": \"\", \"api_url\": \"https://p2\"}",
         "primary_id: missing or invalid"},
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"primary_id\": \"p 2\", \"api_url\": \"https://p2\"}",
         "primary_id: missing or invalid"},
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"primary_id\": 2, \"api_url\": \"https://p2\"}",
         "primary_id: missing or invalid"},
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"primary_id\": \"p2\"}", "api_url: missing or invalid"},
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"primary_id\": \"p2\", \"api_url\": \"ftp://p2\"}",
         "api_url: missing or invalid"},
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"primary_id\": \"p2\", \"api_url\": \"https://\"}",
         "api_url: missing or invalid"},
        {PRIMARY_CHANGED, "{\"epoch\": 8, \"primary_id\": \"p2\", \"api_url\": \"https://p 2\"}",
         "api_url: missing or invalid"},

        /* provider.version.changed */
        {VERSION_CHANGED, "{\"version\": \"9.0.2\"}", "node_id: missing or invalid"},
        {VERSION_CHANGED, "{\"node_id\": \"p/2\", \"version\": \"9.0.2\"}", "node_id: missing or invalid"},
        {VERSION_CHANGED, "{\"node_id\": \"p2\"}", "version: missing or invalid"},
        {VERSION_CHANGED, "{\"node_id\": \"p2\", \"version\": \"\"}", "version: missing or invalid"},
        {VERSION_CHANGED, "{\"node_id\": \"p2\", \"version\": \"9.0 .2\"}", "version: missing or invalid"},
        {VERSION_CHANGED, "{\"node_id\": \"p2\", \"version\": 9}", "version: missing or invalid"},

        /* agent.update.available */
        {UPDATE, "{}", "version: missing or invalid"},
        {UPDATE, "{\"version\": null}", "version: missing or invalid"},
        {UPDATE, "{\"version\": \"9.0.2\\n\"}", "version: missing or invalid"},

        /* Bodies that are not one JSON object, whatever the key. */
        {UPDATE, "", NOT_OBJECT},
        {UPDATE, "not json", NOT_OBJECT},
        {UPDATE, "[{\"version\": \"9.0.2\"}]", NOT_OBJECT},
        {UPDATE, "\"9.0.2\"", NOT_OBJECT},
        {UPDATE, "{\"version\": \"9.0.2\"", NOT_OBJECT},
        {UPDATE, "{\"version\": \"9.0.2\"} {}", NOT_OBJECT},
        {UPDATE, "{\"version\": \"9.0.1\", \"version\": \"9.0.2\"}", NOT_OBJECT}, /* duplicate key */
        {UPDATE, "{\"version\": \"9.0\\u00002\"}", NOT_OBJECT},                   /* NUL in a string */
        {"provider.unknown", "not json", NOT_OBJECT},

        /* Routing keys: only the three of the table, exactly. */
        {"provider.primary", "{\"version\": \"9.0.2\"}", UNKNOWN},
        {"agent.update.available.x", "{\"version\": \"9.0.2\"}", UNKNOWN},
        {"AGENT.UPDATE.AVAILABLE", "{\"version\": \"9.0.2\"}", UNKNOWN},
        {"", "{\"version\": \"9.0.2\"}", UNKNOWN},
        {NULL, "{\"version\": \"9.0.2\"}", UNKNOWN},
};

static void test_table(void **state) {
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                const Case *c = &cases[i];
                const char *why = provider_event_check(c->key, c->body, strlen(c->body));

                if (c->why ? !why || strcmp(why, c->why) != 0 : why != NULL) {
                        print_message("case %zu: %s %s: got \"%s\", want \"%s\"\n", i,
                                      c->key ? c->key : "(null)", c->body, why ? why : "(accepted)",
                                      c->why ? c->why : "(accepted)");
                        fail();
                }
        }
}

/* The body is not NUL-terminated: only len bytes count. */
static void test_length_bounds(void **state) {
#define GOOD "{\"version\": \"9.0.2\"}"
        static const char body[] = GOOD "garbage";
        char exact[sizeof(GOOD) - 1];

        assert_null(provider_event_check(UPDATE, body, strlen(GOOD)));
        assert_string_equal(provider_event_check(UPDATE, body, strlen(body)), NOT_OBJECT);
        assert_string_equal(provider_event_check(UPDATE, body, 5), NOT_OBJECT);
        assert_string_equal(provider_event_check(UPDATE, body, 0), NOT_OBJECT);

        memcpy(exact, body, sizeof exact); /* no terminator anywhere */
        assert_null(provider_event_check(UPDATE, exact, sizeof exact));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_table),
                cmocka_unit_test(test_length_bounds),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
