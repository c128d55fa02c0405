/* The Provider state parser (contract section 3): the example document, then
 * one mutation at a time, each of which must fail naming its field. */

#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "macro.h"
#include "provider.h"

#define SHA "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

static const char example[] =
        "{\"node\": {\"id\": \"p1\", \"role\": \"primary\", \"version\": \"9.0.1\","
        "            \"api_url\": \"https://p1.example:8443\"},"
        " \"epoch\": 7,"
        " \"primary\": {\"id\": \"p1\", \"api_url\": \"https://p1.example:8443\","
        "             \"broker\": {\"host\": \"p1.example\", \"port\": 5671, \"vhost\": \"/dsm\", \"tls\": "
        "true}},"
        " \"nodes\": [{\"id\": \"p1\", \"api_url\": \"https://p1.example:8443\"},"
        "           {\"id\": \"p2\", \"api_url\": \"https://p2.example:8443\"},"
        "           {\"id\": \"p3\", \"api_url\": \"https://p3.example:8443\"}],"
        " \"agent_update\": {\"version\": \"9.0.1\","
        "                  \"url\": \"https://p1.example:8443/api/v1/agent/packages/9.0.1\","
        "                  \"sha256\": \"" SHA "\", \"size\": 18273645}}";

static ProviderState st;
static char err[256];

static int parse(const char *body) {
        return provider_state_parse(body, strlen(body), &st, err, sizeof(err));
}

/* Replaces (value != NULL, JSON text) or deletes (NULL) the member at a
 * dotted path such as "primary.broker.port" or "nodes.1.id" in the example,
 * parses the result and returns the parser's verdict. */
static int parse_mutated(const char *path, const char *value) {
        json_t *root = json_loads(example, 0, NULL), *parent = root, *v = NULL;
        char buf[256], *key, *next, *dump;
        int r;

        assert_non_null(root);
        snprintf(buf, sizeof(buf), "%s", path);
        key = buf;
        while ((next = strchr(key, '.'))) {
                *next = 0;
                parent = json_is_array(parent) ? json_array_get(parent, strtoul(key, NULL, 10))
                                               : json_object_get(parent, key);
                assert_non_null(parent);
                key = next + 1;
        }
        if (value) {
                v = json_loads(value, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
                assert_non_null(v);
        }
        if (json_is_array(parent)) {
                size_t i = strtoul(key, NULL, 10);
                assert_int_equal(v ? json_array_set_new(parent, i, v) : json_array_remove(parent, i), 0);
        } else
                assert_int_equal(v ? json_object_set_new(parent, key, v) : json_object_del(parent, key), 0);

        dump = json_dumps(root, JSON_COMPACT);
        assert_non_null(dump);
        r = provider_state_parse(dump, strlen(dump), &st, err, sizeof(err));
        free(dump);
        json_decref(root);
        return r;
}

static char *repeat(char c, size_t n, const char *prefix, const char *suffix) {
        size_t lp = strlen(prefix), ls = strlen(suffix);
        char *s = malloc(lp + n + ls + 1);

        assert_non_null(s);
        memcpy(s, prefix, lp);
        memset(s + lp, c, n);
        memcpy(s + lp + n, suffix, ls + 1);
        return s;
}

static void test_example(void **state) {
        assert_int_equal(parse(example), 0);
        assert_string_equal(err, "");
        assert_string_equal(st.node.id, "p1");
        assert_int_equal(st.role, NODE_ROLE_PRIMARY);
        assert_string_equal(st.version, "9.0.1");
        assert_string_equal(st.node.api_url, "https://p1.example:8443");
        assert_int_equal(st.epoch, 7);
        assert_string_equal(st.primary.id, "p1");
        assert_string_equal(st.primary.api_url, "https://p1.example:8443");
        assert_string_equal(st.broker.host, "p1.example");
        assert_int_equal(st.broker.port, 5671);
        assert_string_equal(st.broker.vhost, "/dsm");
        assert_true(st.broker.tls);
        assert_int_equal(st.n_nodes, 3);
        assert_string_equal(st.nodes[2].id, "p3");
        assert_string_equal(st.nodes[2].api_url, "https://p3.example:8443");
        assert_true(st.update.present);
        assert_string_equal(st.update.version, "9.0.1");
        assert_string_equal(st.update.sha256, SHA);
        assert_int_equal(st.update.size, 18273645);
}

/* The body need not be NUL-terminated: only len bytes are read. */
static void test_not_terminated(void **state) {
        size_t n = strlen(example);
        char *copy = malloc(n);

        assert_non_null(copy);
        memcpy(copy, example, n);
        assert_int_equal(provider_state_parse(copy, n, &st, err, sizeof(err)), 0);
        assert_int_equal(provider_state_parse(copy, n - 1, &st, err, sizeof(err)), -EINVAL);
        free(copy);
}

static void test_standby_and_update(void **state) {
        assert_int_equal(parse_mutated("node.role", "\"standby\""), 0);
        assert_int_equal(st.role, NODE_ROLE_STANDBY);
        assert_int_equal(parse_mutated("agent_update", "null"), 0);
        assert_false(st.update.present);
        assert_int_equal(parse_mutated("agent_update", NULL), 0);
        assert_false(st.update.present);
        assert_int_equal(parse_mutated("primary.broker.tls", "false"), 0);
        assert_false(st.broker.tls);
}

static void test_unknown_fields_allowed(void **state) {
        assert_int_equal(parse_mutated("future", "{\"a\": [1, 2]}"), 0);
        assert_int_equal(parse_mutated("node.zone", "\"eu-1\""), 0);
        assert_int_equal(parse_mutated("primary.broker.extra", "1"), 0);
        assert_int_equal(parse_mutated("nodes.0.extra", "null"), 0);
}

static void test_limits_accepted(void **state) {
        char *s;

        s = repeat('a', 64, "\"", "\"");
        assert_int_equal(parse_mutated("node.id", s), 0);
        free(s);
        /* 2048 bytes, most of them path: a host name has at most 253. */
        s = repeat('a', 2048 - strlen("https://p1.example/"), "\"https://p1.example/", "\"");
        assert_int_equal(parse_mutated("primary.api_url", s), 0);
        assert_int_equal(strlen(st.primary.api_url), 2048);
        free(s);
        s = repeat('a', 63, "\"", ".b.c.d\""); /* 63 + 6 */
        assert_int_equal(parse_mutated("primary.broker.host", s), 0);
        free(s);
        s = repeat('v', 255, "\"", "\"");
        assert_int_equal(parse_mutated("primary.broker.vhost", s), 0);
        free(s);
        assert_int_equal(parse_mutated("primary.broker.port", "1"), 0);
        assert_int_equal(parse_mutated("primary.broker.port", "65535"), 0);
        assert_int_equal(st.broker.port, 65535);
        assert_int_equal(parse_mutated("epoch", "9007199254740993"), 0); /* 2^53 + 1 */
        assert_int_equal(st.epoch, 9007199254740993ULL);
        assert_int_equal(parse_mutated("epoch", "9223372036854775807"), 0);
        assert_int_equal(parse_mutated("primary.broker.host", "\"10.0.0.1\""), 0);
        assert_int_equal(parse_mutated("primary.broker.host", "\"fd00::1\""), 0);
        assert_string_equal(st.broker.host, "fd00::1");
        /* Both forms of an IPv6 literal become one: no brackets (the form of
         * the settings file and of getaddrinfo). */
        assert_int_equal(parse_mutated("primary.broker.host", "\"[fd00::1]\""), 0);
        assert_string_equal(st.broker.host, "fd00::1");
        assert_int_equal(parse_mutated("primary.broker.host", "\"[p1.example]\""), -EINVAL);
        assert_int_equal(parse_mutated("primary.broker.host", "\"[]\""), -EINVAL);
        assert_int_equal(parse_mutated("primary.broker.host", "\"mq_1.example.\""), 0);
        assert_int_equal(parse_mutated("node.version", "\"9.0.1-rc1+build.5\""), 0);
        assert_int_equal(parse_mutated("primary.api_url", "\"http://10.0.0.1:8080/base\""), 0);
        assert_int_equal(parse_mutated("nodes", "[]"), 0);
        assert_int_equal(st.n_nodes, 0);
}

typedef struct Bad {
        const char *path;
        const char *value; /* JSON text; NULL: delete */
        const char *field; /* must start the error message */
} Bad;

static const Bad bad[] = {
        /* missing */
        {"node", NULL, "node: missing"},
        {"node.id", NULL, "node.id: missing"},
        {"node.role", NULL, "node.role: missing"},
        {"node.version", NULL, "node.version: missing"},
        {"node.api_url", NULL, "node.api_url: missing"},
        {"epoch", NULL, "epoch: missing"},
        {"epoch", "null", "epoch: missing"},
        {"primary", NULL, "primary: missing"},
        {"primary.id", NULL, "primary.id: missing"},
        {"primary.api_url", NULL, "primary.api_url: missing"},
        {"primary.broker", NULL, "primary.broker: missing"},
        {"primary.broker.host", NULL, "primary.broker.host: missing"},
        {"primary.broker.port", NULL, "primary.broker.port: missing"},
        {"primary.broker.vhost", NULL, "primary.broker.vhost: missing"},
        {"primary.broker.tls", NULL, "primary.broker.tls: missing"},
        {"nodes", NULL, "nodes: missing"},
        {"nodes.1.id", NULL, "nodes[1].id: missing"},
        {"nodes.2.api_url", NULL, "nodes[2].api_url: missing"},
        {"agent_update.version", NULL, "agent_update.version: missing"},
        {"agent_update.url", NULL, "agent_update.url: missing"},
        {"agent_update.sha256", NULL, "agent_update.sha256: missing"},
        {"agent_update.size", NULL, "agent_update.size: missing"},
        /* mistyped */
        {"node", "[]", "node: not an object"},
        {"node.id", "5", "node.id: not a string"},
        {"node.role", "\"leader\"", "node.role:"},
        {"node.role", "\"Primary\"", "node.role:"},
        {"node.role", "true", "node.role: not a string"},
        {"epoch", "\"7\"", "epoch: not an integer"},
        {"epoch", "7.0", "epoch: not an integer"},
        {"epoch", "7.5", "epoch: not an integer"},
        {"epoch", "1e3", "epoch: not an integer"},
        {"epoch", "true", "epoch: not an integer"},
        {"epoch", "0", "epoch: out of range"},
        {"epoch", "-1", "epoch: out of range"},
        {"primary", "\"p1\"", "primary: not an object"},
        {"primary.broker", "\"p1.example:5671\"", "primary.broker: not an object"},
        {"primary.broker.port", "0", "primary.broker.port: out of range"},
        {"primary.broker.port", "65536", "primary.broker.port: out of range"},
        {"primary.broker.port", "-5671", "primary.broker.port: out of range"},
        {"primary.broker.port", "\"5671\"", "primary.broker.port: not an integer"},
        {"primary.broker.port", "5671.0", "primary.broker.port: not an integer"},
        {"primary.broker.tls", "\"true\"", "primary.broker.tls: not a boolean"},
        {"primary.broker.tls", "1", "primary.broker.tls: not a boolean"},
        {"nodes", "{}", "nodes: not an array"},
        {"nodes.0", "\"p1\"", "nodes[0]: not an object"},
        {"agent_update", "\"9.0.2\"", "agent_update: not an object"},
        {"agent_update", "[]", "agent_update: not an object"},
        {"agent_update.size", "0", "agent_update.size: out of range"},
        {"agent_update.size", "-1", "agent_update.size: out of range"},
        {"agent_update.size", "\"1\"", "agent_update.size: not an integer"},
        {"agent_update.size", "1.5", "agent_update.size: not an integer"},
        /* out of limits */
        {"node.id", "\"\"", "node.id: invalid"},
        {"node.id", "\"p 1\"", "node.id: invalid"},
        {"node.id", "\"p/1\"", "node.id: invalid"},
        {"node.id", "\"p1\\n\"", "node.id: invalid"},
        {"node.id", "\"p\\u00e91\"", "node.id: invalid"},
        {"node.id", "\"p\\u00001\"", "node.id: contains a NUL byte"},
        {"primary.id", "\"a:b\"", "primary.id: invalid"},
        {"nodes.0.id", "\"../x\"", "nodes[0].id: invalid"},
        {"node.version", "\"\"", "node.version: invalid"},
        {"node.version", "\"9.0 1\"", "node.version: invalid"},
        {"node.version", "\"9.0.1\\t\"", "node.version: invalid"},
        {"node.api_url", "\"ftp://p1.example\"", "node.api_url: invalid"},
        {"node.api_url", "\"p1.example:8443\"", "node.api_url: invalid"},
        {"node.api_url", "\"https://\"", "node.api_url: invalid"},
        {"node.api_url", "\"https://p1 .example\"", "node.api_url: invalid"},
        {"primary.api_url", "\"https://p1.example\\r\\nX: y\"", "primary.api_url: invalid"},
        {"nodes.1.api_url", "\"\"", "nodes[1].api_url: invalid"},
        {"agent_update.url", "\"file:///etc/passwd\"", "agent_update.url: invalid"},
        {"primary.broker.host", "\"\"", "primary.broker.host: invalid"},
        {"primary.broker.host", "\"bad host\"", "primary.broker.host: invalid"},
        {"primary.broker.host", "\"-oProxy\"", "primary.broker.host: invalid"},
        {"primary.broker.host", "\"a..b\"", "primary.broker.host: invalid"},
        {"primary.broker.host", "\"p1.example:5671\"", "primary.broker.host: invalid"},
        {"primary.broker.host", "\"[fd00::1\"", "primary.broker.host: invalid"},
        {"primary.broker.vhost", "\"\"", "primary.broker.vhost: invalid"},
        {"primary.broker.vhost", "\"/dsm\\nhost = evil\"", "primary.broker.vhost: invalid"},
        {"primary.broker.vhost", "\" /dsm\"", "primary.broker.vhost: invalid"},
        {"agent_update.sha256", "\"" SHA "0\"", "agent_update.sha256:"},
        {"agent_update.sha256", "\"0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef\"",
         "agent_update.sha256: invalid"},
        {"agent_update.sha256", "\"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\"",
         "agent_update.sha256: invalid"},
        {"agent_update.version", "\"\"", "agent_update.version: invalid"},
        /* duplicates in the nodes list */
        {"nodes.1.id", "\"p1\"", "nodes[1].id: duplicate"},
        {"nodes.2.api_url", "\"https://p1.example:8443\"", "nodes[2].api_url: duplicate"},
};

static void test_bad_fields(void **state) {
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                int r = parse_mutated(bad[i].path, bad[i].value);

                if (r != -EINVAL || strncmp(err, bad[i].field, strlen(bad[i].field)) != 0)
                        fail_msg("%s = %s: got %d \"%s\", want \"%s...\"", bad[i].path,
                                 bad[i].value ? bad[i].value : "(deleted)", r, err, bad[i].field);
        }
}

static void test_too_long(void **state) {
        static const struct {
                const char *path;
                char c;
                size_t n;
                const char *prefix, *suffix, *field;
        } longs[] = {
                {"node.id", 'a', 65, "\"", "\"", "node.id:"},
                {"nodes.0.id", 'a', 65, "\"", "\"", "nodes[0].id:"},
                {"node.version", '9', 65, "\"", "\"", "node.version:"},
                {"primary.api_url", 'a', 2049 - 19, "\"https://p1.example/", "\"", "primary.api_url:"},
                {"primary.broker.host", 'a', 64, "\"", ".example\"",
                 "primary.broker.host:"}, /* label > 63 */
                {"primary.broker.vhost", 'v', 256, "\"", "\"", "primary.broker.vhost:"},
        };

        char host[300] = "\"";

        /* 254 characters in labels of at most 63 */
        for (int i = 0; i < 4; i++)
                snprintf(host + strlen(host), sizeof(host) - strlen(host), "%s%.*s", i ? "." : "",
                         i < 3 ? 63 : 62, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
        assert_int_equal(strlen(host) - 1, 254);
        snprintf(host + strlen(host), sizeof(host) - strlen(host), "\"");
        assert_int_equal(parse_mutated("primary.broker.host", host), -EINVAL);
        assert_string_equal(err, "primary.broker.host: too long (254 bytes, at most 253)");
        host[strlen(host) - 2] = '"'; /* 253: fine */
        host[strlen(host) - 1] = 0;
        assert_int_equal(parse_mutated("primary.broker.host", host), 0);

        for (size_t i = 0; i < ELEMENTSOF(longs); i++) {
                char *s = repeat(longs[i].c, longs[i].n, longs[i].prefix, longs[i].suffix);
                int r = parse_mutated(longs[i].path, s);

                if (r != -EINVAL || strncmp(err, longs[i].field, strlen(longs[i].field)) != 0)
                        fail_msg("%s (%zu bytes): got %d \"%s\"", longs[i].path, strlen(s), r, err);
                free(s);
        }
}

static void test_nodes_limit(void **state) {
        char buf[2048];
        size_t off = 0;

        for (int n = PROVIDER_NODES_MAX; n <= PROVIDER_NODES_MAX + 1; n++) {
                off = (size_t) snprintf(buf, sizeof(buf), "[");
                for (int i = 0; i < n; i++)
                        off += (size_t) snprintf(buf + off, sizeof(buf) - off,
                                                 "%s{\"id\": \"p%d\", \"api_url\": \"https://p%d.example\"}",
                                                 i ? "," : "", i, i);
                snprintf(buf + off, sizeof(buf) - off, "]");
                if (n == PROVIDER_NODES_MAX) {
                        assert_int_equal(parse_mutated("nodes", buf), 0);
                        assert_int_equal(st.n_nodes, PROVIDER_NODES_MAX);
                } else {
                        assert_int_equal(parse_mutated("nodes", buf), -EINVAL);
                        assert_string_equal(err, "nodes: more than 8");
                }
        }
}

static void test_body(void **state) {
        char *big;

        assert_int_equal(parse("not json"), -EINVAL);
        assert_non_null(strstr(err, "body: not JSON"));
        assert_int_equal(parse(""), -EINVAL);
        assert_int_equal(parse("[]"), -EINVAL);
        assert_string_equal(err, "body: not a JSON object");
        assert_int_equal(parse("[{\"node\": {}}]"), -EINVAL);
        assert_int_equal(parse("7"), -EINVAL);
        assert_int_equal(parse("null"), -EINVAL);
        assert_int_equal(parse("{} {}"), -EINVAL);
        assert_int_equal(parse("{}"), -EINVAL);
        assert_string_equal(err, "node: missing");
        assert_int_equal(parse("{\"epoch\": 1, \"epoch\": 2}"), -EINVAL);
        assert_non_null(strstr(err, "body: not JSON"));
        assert_int_equal(parse("{\"epoch\": 99999999999999999999}"), -EINVAL);
        assert_int_equal(provider_state_parse(NULL, 0, &st, err, sizeof(err)), -EINVAL);

        /* Over 1 MiB: refused before parsing, even if it is valid JSON. */
        big = repeat(' ', PROVIDER_BODY_MAX + 1 - strlen(example), example, "");
        assert_int_equal(strlen(big), PROVIDER_BODY_MAX + 1);
        assert_int_equal(parse(big), -E2BIG);
        assert_non_null(strstr(err, "body"));
        big[PROVIDER_BODY_MAX] = 0; /* exactly 1 MiB: fine */
        assert_int_equal(parse(big), 0);
        free(big);
}

/* Out-parameter written only on success; a NULL or tiny err is fine. */
static void test_ret_untouched(void **state) {
        ProviderState before;
        char tiny[4];

        assert_int_equal(parse(example), 0);
        before = st;
        assert_int_equal(parse_mutated("primary.broker.port", "0"), -EINVAL);
        assert_memory_equal(&st, &before, sizeof(st));
        assert_int_equal(provider_state_parse("[]", 2, &st, NULL, 0), -EINVAL);
        assert_int_equal(provider_state_parse("[]", 2, &st, tiny, sizeof(tiny)), -EINVAL);
        assert_string_equal(tiny, "bod");
}

static void test_validators(void **state) {
        assert_true(provider_id_valid("p1"));
        assert_true(provider_id_valid("node-1.dc_2"));
        assert_false(provider_id_valid(NULL));
        assert_false(provider_id_valid(""));
        assert_true(provider_url_valid("https://a"));
        assert_false(provider_url_valid("https:/a"));
        /* The scheme in any letter case, as the config takes it. */
        assert_true(provider_url_valid("HTTPS://a"));
        assert_true(provider_url_valid("Http://a:8080/x"));
        assert_true(provider_url_valid("https://[fd00::1]:8443"));
        assert_false(provider_url_valid("https:///a"));
        assert_false(provider_url_valid("https://:80"));
        assert_false(provider_url_valid("https://a:99999"));
        assert_false(provider_url_valid("https://a:0"));
        assert_false(provider_url_valid("http://[::1"));
        assert_false(provider_url_valid("httpx://a"));
        assert_true(provider_host_valid("localhost"));
        assert_true(provider_host_valid("::1"));
        assert_true(provider_host_valid("[::1]"));
        assert_false(provider_host_valid("[]"));
        assert_false(provider_host_valid("."));
        assert_false(provider_host_valid("a b"));
        assert_true(provider_version_valid("9.0.1"));
        assert_false(provider_version_valid("9.0.1 "));
}

static void test_broker_equal(void **state) {
        BrokerInfo a = {.host = "h", .port = 5671, .vhost = "/", .tls = true}, b = a;

        assert_true(broker_info_equal(&a, &b));
        b.tls = false;
        assert_false(broker_info_equal(&a, &b));
        b = a;
        b.port = 5672;
        assert_false(broker_info_equal(&a, &b));
        b = a;
        snprintf(b.vhost, sizeof(b.vhost), "/x");
        assert_false(broker_info_equal(&a, &b));
        b = a;
        snprintf(b.host, sizeof(b.host), "g");
        assert_false(broker_info_equal(&a, &b));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_example),
                cmocka_unit_test(test_not_terminated),
                cmocka_unit_test(test_standby_and_update),
                cmocka_unit_test(test_unknown_fields_allowed),
                cmocka_unit_test(test_limits_accepted),
                cmocka_unit_test(test_bad_fields),
                cmocka_unit_test(test_too_long),
                cmocka_unit_test(test_nodes_limit),
                cmocka_unit_test(test_body),
                cmocka_unit_test(test_ret_untouched),
                cmocka_unit_test(test_validators),
                cmocka_unit_test(test_broker_equal),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
