/* The status document of contract section 7 from a hand-built Manager: the
 * poller, broker and updater are stubs, so only agent/status.c (and the
 * pure gate names) is under test. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "manager.h"
#include "version.h"

static PollAnswer targets[3];
static size_t n_targets;
static BrokerConnState broker_now = BROKER_CONNECTED;

void poller_get_round(const Poller *p, PollRound *ret) {
        *ret = (PollRound){.answers = targets, .n_answers = n_targets};
}
BrokerConnState broker_state(const Broker *b) {
        return broker_now;
}
const char *broker_conn_state_to_string(BrokerConnState s) {
        return s == BROKER_CONNECTED ? "connected" : s == BROKER_CONNECTING ? "connecting" : "down";
}
UpdaterPhase updater_phase(const Updater *u) {
        return UPDATER_FAILED;
}
const char *updater_last_error(const Updater *u) {
        return "command_failed: exit 3";
}

static void target(size_t i, const char *url, const char *id, NodeRole role, const char *version, bool lb) {
        PollAnswer *t = &targets[i];

        memset(t, 0, sizeof(*t));
        strscpy(t->url, sizeof(t->url), url);
        t->via_load_balancer = lb;
        if (id) {
                t->have_state = t->ok = true;
                t->outcome = POLL_OK;
                strscpy(t->state.node.id, sizeof(t->state.node.id), id);
                t->state.role = role;
                strscpy(t->state.version, sizeof(t->state.version), version);
                t->state.epoch = 8;
                t->last_seen_usec = UINT64_C(1795624200) * USEC_PER_SEC; /* 2026-11-25T16:30:00Z */
        } else {
                t->outcome = POLL_ERROR;
                strscpy(t->error, sizeof(t->error), "connection refused");
        }
}

static void test_empty_manager(void **state) {
        Manager m = {};
        json_t *doc;

        n_targets = 0;
        doc = manager_status_json(&m);
        assert_non_null(doc);
        assert_string_equal(json_string_value(json_object_get(doc, "daemon_version")), DAEMON_VERSION);
        assert_int_equal(json_integer_value(json_object_get(doc, "epoch")), 0);
        assert_true(json_is_null(json_object_get(doc, "primary")));
        assert_string_equal(json_string_value(json_object_get(doc, "broker_connection")), "down");
        assert_true(json_is_null(json_object_get(doc, "last_poll")));
        assert_int_equal(json_array_size(json_object_get(doc, "nodes")), 0);
        assert_int_equal(json_array_size(json_object_get(doc, "warnings")), 0);
        assert_true(json_is_null(json_object_get(json_object_get(doc, "update"), "reason")));
        assert_int_equal(json_integer_value(json_object_get(json_object_get(doc, "counters"), "polls")), 0);
        json_decref(doc);
}

static void test_full_manager(void **state) {
        Manager m = {.poller = (Poller *) 1, .broker = (Broker *) 1, .updater = NULL};
        json_t *doc, *nodes, *n, *u;

        m.sync.state.committed.epoch = 8;
        strscpy(m.sync.state.committed.primary.id, sizeof(m.sync.state.committed.primary.id), "p2");
        strscpy(m.sync.state.committed.primary.api_url, sizeof(m.sync.state.committed.primary.api_url),
                "https://p2:8443");
        strscpy(m.sync.state.committed.broker.host, sizeof(m.sync.state.committed.broker.host),
                "p2.example");
        m.sync.state.committed.broker.port = 5671;
        strscpy(m.sync.state.committed.broker.vhost, sizeof(m.sync.state.committed.broker.vhost), "/dsm");
        m.sync.state.committed.broker.tls = true;
        m.sync.state.n_nodes = 1;
        strscpy(m.sync.state.nodes[0].id, sizeof(m.sync.state.nodes[0].id), "p3");
        strscpy(m.sync.state.nodes[0].api_url, sizeof(m.sync.state.nodes[0].api_url), "https://p3:8443");
        m.last_poll_usec = UINT64_C(1795624200) * USEC_PER_SEC;
        strscpy(m.warnings[0], sizeof(m.warnings[0]), "stale primary p1 at epoch 7");
        m.n_warnings = 1;
        m.sync.gate.state = GATE_HELD;
        strscpy(m.sync.gate.reason, sizeof(m.sync.gate.reason), "version_skew: p3=9.0.0");
        strscpy(m.sync.installed_version, sizeof(m.sync.installed_version), "9.0.0");
        m.counters.polls = 5;

        target(0, "https://p2:8443", "p2", NODE_ROLE_PRIMARY, "9.0.1", false);
        targets[0].state.update.present = true;
        strscpy(targets[0].state.update.version, sizeof(targets[0].state.update.version), "9.0.1");
        /* The offer is the sync core's, computed once per round. */
        m.sync.have_offer = true;
        m.sync.offer = targets[0].state.update;
        target(1, "https://lb:8443", "p1", NODE_ROLE_STANDBY, "9.0.1", true);
        target(2, "https://p3:8443", NULL, NODE_ROLE_STANDBY, NULL, false);
        n_targets = 3;

        doc = manager_status_json(&m);
        assert_non_null(doc);
        assert_string_equal(json_string_value(json_object_get(json_object_get(doc, "primary"), "id")), "p2");
        assert_int_equal(json_integer_value(json_object_get(
                                 json_object_get(json_object_get(doc, "primary"), "broker"), "port")),
                         5671);
        assert_string_equal(json_string_value(json_object_get(doc, "broker_connection")), "connected");
        assert_string_equal(json_string_value(json_object_get(doc, "last_poll")), "2026-11-25T16:30:00Z");
        assert_true(json_is_null(json_object_get(doc, "last_change")));

        nodes = json_object_get(doc, "nodes");
        assert_int_equal(json_array_size(nodes), 2); /* the load balancer is not a node */
        n = json_array_get(nodes, 0);
        assert_string_equal(json_string_value(json_object_get(n, "role")), "primary");
        assert_string_equal(json_string_value(json_object_get(n, "last_seen")), "2026-11-25T16:30:00Z");
        assert_true(json_is_null(json_object_get(n, "error")));
        n = json_array_get(nodes, 1);
        assert_string_equal(json_string_value(json_object_get(n, "id")), "p3"); /* from the cluster list */
        assert_true(json_is_null(json_object_get(n, "role")));
        assert_string_equal(json_string_value(json_object_get(n, "error")), "connection refused");

        u = json_object_get(doc, "update");
        assert_string_equal(json_string_value(json_object_get(u, "state")), "held");
        assert_string_equal(json_string_value(json_object_get(u, "reason")), "version_skew: p3=9.0.0");
        assert_string_equal(json_string_value(json_object_get(u, "target")), "9.0.1");
        assert_string_equal(json_string_value(json_object_get(u, "installed")), "9.0.0");
        assert_string_equal(json_string_value(json_array_get(json_object_get(doc, "warnings"), 0)),
                            "stale primary p1 at epoch 7");
        assert_int_equal(json_integer_value(json_object_get(json_object_get(doc, "counters"), "polls")), 5);
        json_decref(doc);

        /* A failing updater overrides the gate's verdict. */
        m.updater = (Updater *) 1;
        doc = manager_status_json(&m);
        u = json_object_get(doc, "update");
        assert_string_equal(json_string_value(json_object_get(u, "state")), "failed");
        assert_string_equal(json_string_value(json_object_get(u, "reason")), "command_failed: exit 3");
        json_decref(doc);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_empty_manager),
                cmocka_unit_test(test_full_manager),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
