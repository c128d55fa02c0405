/* state: round trips, a missing file, and corrupt files of every kind. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "atomic_file.h"
#include "macro.h"
#include "state.h"

static void fill(PersistentState *s) {
        *s = (PersistentState){};
        s->committed.epoch = 8;
        strscpy(s->committed.primary.id, sizeof(s->committed.primary.id), "p2");
        strscpy(s->committed.primary.api_url, sizeof(s->committed.primary.api_url),
                "https://p2.example:8443");
        strscpy(s->committed.broker.host, sizeof(s->committed.broker.host), "p2.example");
        s->committed.broker.port = 5671;
        strscpy(s->committed.broker.vhost, sizeof(s->committed.broker.vhost), "/dsm");
        s->committed.broker.tls = true;
        for (int i = 0; i < 3; i++) {
                snprintf(s->nodes[i].id, sizeof(s->nodes[i].id), "p%d", i + 1);
                snprintf(s->nodes[i].api_url, sizeof(s->nodes[i].api_url), "https://p%d.example:8443",
                         i + 1);
        }
        s->n_nodes = 3;
        strscpy(s->update.applied_version, sizeof(s->update.applied_version), "9.0.1");
        strscpy(s->update.delay_version, sizeof(s->update.delay_version), "9.0.2");
        s->update.delay_not_before_usec = 1764088200000000ULL;
        strscpy(s->update.failed_version, sizeof(s->update.failed_version), "9.0.2");
        s->update.failures = 3;
        s->update.retry_not_before_usec = 1764088260000000ULL;
}

static void assert_state_equal(const PersistentState *a, const PersistentState *b) {
        assert_string_equal(a->committed.primary.id, b->committed.primary.id);
        assert_string_equal(a->committed.primary.api_url, b->committed.primary.api_url);
        assert_true(broker_info_equal(&a->committed.broker, &b->committed.broker));
        assert_int_equal(a->committed.epoch, b->committed.epoch);
        assert_int_equal(a->n_nodes, b->n_nodes);
        for (size_t i = 0; i < a->n_nodes; i++) {
                assert_string_equal(a->nodes[i].id, b->nodes[i].id);
                assert_string_equal(a->nodes[i].api_url, b->nodes[i].api_url);
        }
        assert_string_equal(a->update.applied_version, b->update.applied_version);
        assert_string_equal(a->update.delay_version, b->update.delay_version);
        assert_int_equal(a->update.delay_not_before_usec, b->update.delay_not_before_usec);
        assert_string_equal(a->update.failed_version, b->update.failed_version);
        assert_int_equal(a->update.failures, b->update.failures);
        assert_int_equal(a->update.retry_not_before_usec, b->update.retry_not_before_usec);
}

static void test_round_trip(void **state) {
        PersistentState a, b;
        _cleanup_(freep) char *json = NULL;
        char err[128] = "";

        fill(&a);
        assert_int_equal(state_format(&a, &json), 0);
        assert_int_equal(state_parse(json, strlen(json), &b, err, sizeof(err)), 0);
        assert_state_equal(&a, &b);

        /* Empty state: epoch 0, primary null. */
        a = (PersistentState){};
        free(json);
        json = NULL;
        assert_int_equal(state_format(&a, &json), 0);
        assert_non_null(strstr(json, "\"primary\": null"));
        assert_int_equal(state_parse(json, strlen(json), &b, err, sizeof(err)), 0);
        assert_state_equal(&a, &b);
}

static void test_save_load(void **state) {
        char dir[] = "/tmp/test-state-XXXXXX", path[64], err[128] = "";
        PersistentState a, b;
        struct stat st;
        mode_t old = umask(0);

        assert_non_null(mkdtemp(dir));
        snprintf(path, sizeof(path), "%s/state.json", dir);

        /* Missing: empty and 0. */
        fill(&b);
        assert_int_equal(state_load(path, &b, err, sizeof(err)), 0);
        assert_int_equal(b.committed.epoch, 0);
        assert_int_equal(b.n_nodes, 0);

        fill(&a);
        assert_int_equal(state_save(path, &a), 0);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_mode & 07777, 0600);
        assert_int_equal(state_load(path, &b, err, sizeof(err)), 0);
        assert_state_equal(&a, &b);

        /* A value the loader would reject is never written. */
        strscpy(a.committed.broker.host, sizeof(a.committed.broker.host), "bad host");
        assert_int_equal(state_save(path, &a), -EINVAL);
        assert_int_equal(state_load(path, &b, err, sizeof(err)), 0);
        assert_string_equal(b.committed.broker.host, "p2.example");

        /* Corrupt on disk: -EBADMSG, a reason, and an empty state. */
        assert_int_equal(atomic_file_write(path, "{\"version\":1,", 13, 0600), 0);
        assert_int_equal(state_load(path, &b, err, sizeof(err)), -EBADMSG);
        assert_true(strlen(err) > 0);
        assert_int_equal(b.committed.epoch, 0);
        assert_int_equal(atomic_file_write(path, "", 0, 0600), 0);
        assert_int_equal(state_load(path, &b, err, sizeof(err)), -EBADMSG);

        unlink(path);
        rmdir(dir);
        umask(old);
}

/* A file written before the update fields were grouped into UpdateRecord
 * (byte for byte what that version wrote) loads into .update, and is
 * written back unchanged: the file format did not move. */
static void test_format_unchanged(void **state) {
        static const char file[] = "{\n"
                                   "  \"version\": 1,\n"
                                   "  \"epoch\": 8,\n"
                                   "  \"primary\": {\n"
                                   "    \"id\": \"p2\",\n"
                                   "    \"api_url\": \"https://p2.example:8443\",\n"
                                   "    \"broker\": {\n"
                                   "      \"host\": \"p2.example\",\n"
                                   "      \"port\": 5671,\n"
                                   "      \"vhost\": \"/dsm\",\n"
                                   "      \"tls\": true\n"
                                   "    }\n"
                                   "  },\n"
                                   "  \"nodes\": [\n"
                                   "    {\n"
                                   "      \"id\": \"p1\",\n"
                                   "      \"api_url\": \"https://p1.example:8443\"\n"
                                   "    }\n"
                                   "  ],\n"
                                   "  \"update\": {\n"
                                   "    \"applied_version\": \"9.0.1\",\n"
                                   "    \"delay_version\": \"9.0.2\",\n"
                                   "    \"delay_not_before_usec\": 1764088200000000,\n"
                                   "    \"failed_version\": \"9.0.2\",\n"
                                   "    \"failures\": 3,\n"
                                   "    \"retry_not_before_usec\": 1764088260000000\n"
                                   "  }\n"
                                   "}\n";
        _cleanup_(freep) char *json = NULL;
        PersistentState s;
        char err[128] = "";

        assert_int_equal(state_parse(file, strlen(file), &s, err, sizeof(err)), 0);
        assert_int_equal(s.committed.epoch, 8);
        assert_int_equal(s.n_nodes, 1);
        assert_string_equal(s.update.applied_version, "9.0.1");
        assert_string_equal(s.update.delay_version, "9.0.2");
        assert_int_equal(s.update.delay_not_before_usec, 1764088200000000ULL);
        assert_string_equal(s.update.failed_version, "9.0.2");
        assert_int_equal(s.update.failures, 3);
        assert_int_equal(s.update.retry_not_before_usec, 1764088260000000ULL);
        assert_int_equal(state_format(&s, &json), 0);
        assert_string_equal(json, file);
}

#define GOOD_PRIMARY                                                                                        \
        "{\"id\":\"p2\",\"api_url\":\"https://p2.example:8443\",\"broker\":{\"host\":\"p2.example\","       \
        "\"port\":5671,\"vhost\":\"/dsm\",\"tls\":true}}"
#define GOOD_UPDATE                                                                                         \
        "{\"applied_version\":\"\",\"delay_version\":\"\",\"delay_not_before_usec\":0,"                     \
        "\"failed_version\":\"\",\"failures\":0,\"retry_not_before_usec\":0}"
#define DOC(epoch, primary, nodes, update)                                                                  \
        "{\"version\":1,\"epoch\":" epoch ",\"primary\":" primary ",\"nodes\":" nodes ",\"update\":" update \
        "}"

static void test_good_variants(void **state) {
        static const char *good[] = {
                DOC("8", GOOD_PRIMARY, "[]", GOOD_UPDATE),
                DOC("0", "null", "[]", GOOD_UPDATE),
                "{\"version\":1,\"epoch\":0,\"nodes\":[],\"update\":" GOOD_UPDATE "}",
                /* Unknown keys are ignored (a later minor version may add some). */
                "{\"version\":1,\"epoch\":0,\"nodes\":[],\"update\":" GOOD_UPDATE ",\"extra\":1}",
        };
        PersistentState s;
        char err[128];

        for (size_t i = 0; i < ELEMENTSOF(good); i++) {
                err[0] = 0;
                if (state_parse(good[i], strlen(good[i]), &s, err, sizeof(err)) != 0)
                        fail_msg("good[%zu] rejected: %s", i, err);
        }
}

static void test_corrupt(void **state) {
        static const struct {
                const char *json, *reason;
        } bad[] = {
                {"", "line"},
                {"{\"version\":1", "line"},
                {"[]", "not a JSON object"},
                {"null", "line"},
                {DOC("8", GOOD_PRIMARY, "[]", GOOD_UPDATE) "x", "line"},
                {"{\"epoch\":0,\"nodes\":[],\"update\":" GOOD_UPDATE "}", "version: missing"},
                {"{\"version\":2,\"epoch\":0,\"nodes\":[],\"update\":" GOOD_UPDATE "}", "not supported"},
                {"{\"version\":\"1\",\"epoch\":0,\"nodes\":[],\"update\":" GOOD_UPDATE "}", "version"},
                {DOC("0", GOOD_PRIMARY, "[]", GOOD_UPDATE), "primary: set while epoch is 0"},
                {DOC("8", "null", "[]", GOOD_UPDATE), "primary: missing"},
                {"{\"version\":1,\"epoch\":8,\"nodes\":[],\"update\":" GOOD_UPDATE "}", "primary: missing"},
                {DOC("-1", "null", "[]", GOOD_UPDATE), "epoch"},
                {DOC("8.5", GOOD_PRIMARY, "[]", GOOD_UPDATE), "epoch"},
                {DOC("\"8\"", GOOD_PRIMARY, "[]", GOOD_UPDATE), "epoch"},
                {DOC("8", "[]", "[]", GOOD_UPDATE), "primary: not an object"},
                {DOC("8", "{\"id\":\"p 2\",\"api_url\":\"https://p2\",\"broker\":{}}", "[]", GOOD_UPDATE),
                 "primary.id"},
                {DOC("8", "{\"id\":\"p2\",\"api_url\":\"ftp://p2\",\"broker\":{}}", "[]", GOOD_UPDATE),
                 "primary.api_url"},
                {DOC("8", "{\"id\":\"p2\",\"api_url\":\"https://p2\"}", "[]", GOOD_UPDATE),
                 "broker: missing"},
                {DOC("8",
                     "{\"id\":\"p2\",\"api_url\":\"https://p2\",\"broker\":{\"host\":\"p2\",\"port\":0,"
                     "\"vhost\":\"/\",\"tls\":true}}",
                     "[]", GOOD_UPDATE),
                 "port"},
                {DOC("8",
                     "{\"id\":\"p2\",\"api_url\":\"https://p2\",\"broker\":{\"host\":\"p2\",\"port\":65536,"
                     "\"vhost\":\"/\",\"tls\":true}}",
                     "[]", GOOD_UPDATE),
                 "port"},
                {DOC("8",
                     "{\"id\":\"p2\",\"api_url\":\"https://p2\",\"broker\":{\"host\":\"p2\",\"port\":1,"
                     "\"vhost\":\"/\\nx=1\",\"tls\":true}}",
                     "[]", GOOD_UPDATE),
                 "vhost"},
                {DOC("8",
                     "{\"id\":\"p2\",\"api_url\":\"https://p2\",\"broker\":{\"host\":\"p2\",\"port\":1,"
                     "\"vhost\":\"/\",\"tls\":\"true\"}}",
                     "[]", GOOD_UPDATE),
                 "tls: not a boolean"},
                {DOC("0", "null", "{}", GOOD_UPDATE), "nodes: not an array"},
                {DOC("0", "null", "[1]", GOOD_UPDATE), "nodes[0]: not an object"},
                {DOC("0", "null", "[{\"id\":\"p1\"}]", GOOD_UPDATE), "nodes[0].api_url: missing"},
                {DOC("0", "null",
                     "[{\"id\":\"a\",\"api_url\":\"http://a\"},{\"id\":\"a\",\"api_url\":\"http://a\"},"
                     "{\"id\":\"a\",\"api_url\":\"http://a\"},{\"id\":\"a\",\"api_url\":\"http://a\"},"
                     "{\"id\":\"a\",\"api_url\":\"http://a\"},{\"id\":\"a\",\"api_url\":\"http://a\"},"
                     "{\"id\":\"a\",\"api_url\":\"http://a\"},{\"id\":\"a\",\"api_url\":\"http://a\"},"
                     "{\"id\":\"a\",\"api_url\":\"http://a\"}]",
                     GOOD_UPDATE),
                 "nodes: more than"},
                {"{\"version\":1,\"epoch\":0,\"nodes\":[]}", "update: missing"},
                {DOC("0", "null", "[]", "{\"applied_version\":\"9 0\"}"), "update.applied_version"},
                {DOC("0", "null", "[]",
                     "{\"applied_version\":\"\",\"delay_version\":\"\",\"delay_not_before_usec\":-5,"
                     "\"failed_version\":\"\",\"failures\":0,\"retry_not_before_usec\":0}"),
                 "delay_not_before_usec"},
                {DOC("0", "null", "[]",
                     "{\"applied_version\":\"\",\"delay_version\":\"\",\"delay_not_before_usec\":0,"
                     "\"failed_version\":\"\",\"failures\":4294967296,\"retry_not_before_usec\":0}"),
                 "failures"},
                {"{\"version\":1,\"version\":1,\"epoch\":0,\"nodes\":[],\"update\":" GOOD_UPDATE "}",
                 "line"},
                {"{\"version\":1,\"epoch\":0,\"nodes\":[],\"update\":" GOOD_UPDATE ",\"x\":\"\\u0000\"}",
                 "line"},
        };
        PersistentState s;
        char err[128];

        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                err[0] = 0;
                if (state_parse(bad[i].json, strlen(bad[i].json), &s, err, sizeof(err)) != -EBADMSG)
                        fail_msg("bad[%zu] accepted: %s", i, bad[i].json);
                if (!strstr(err, bad[i].reason))
                        fail_msg("bad[%zu]: reason \"%s\" lacks \"%s\"", i, err, bad[i].reason);
        }
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_round_trip),       cmocka_unit_test(test_save_load),
                cmocka_unit_test(test_format_unchanged), cmocka_unit_test(test_good_variants),
                cmocka_unit_test(test_corrupt),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
