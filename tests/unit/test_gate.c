/* The update gate of contract section 8 as a table: one row per reason,
 * then rows for the precedence between reasons. A row only states what
 * differs from a cluster where everything holds (3 nodes on 9.0.1, offer
 * 9.0.1, installed 9.0.0, 2/2 rounds, 12:00 UTC, no window, delay passed). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "gate.h"
#include "macro.h"

#define DAY0_USEC (UINT64_C(1767225600) * USEC_PER_SEC) /* 2026-01-01 00:00:00 UTC */

typedef struct Row {
        const char *name;
        bool disabled;
        bool no_offer;
        const char *offer;     /* NULL: "9.0.1" */
        const char *installed; /* NULL: "9.0.0" */
        const char *applied;   /* NULL: "" */
        /* "id=version" answered at its own api_url, "id~version" only through
         * the load balancer, "id!" no answer. NULL: "p1=9.0.1 p2=9.0.1 p3=9.0.1";
         * "" no nodes. */
        const char *nodes;
        unsigned agreeing, stable; /* 0: 2 */
        bool busy;
        const char *at;     /* "HH:MM:SS" UTC; NULL: "12:00:00" */
        const char *window; /* "HH:MM-HH:MM"; NULL: unset */
        int64_t delay_usec; /* delay_not_before - now */
        GateState state;
        const char *reason;
} Row;

static const Row rows[] = {
        /* one row per reason */
        {.name = "disabled", .disabled = true, .state = GATE_DISABLED, .reason = ""},
        {.name = "no offer", .no_offer = true, .state = GATE_NONE, .reason = ""},
        {.name = "already installed", .installed = "9.0.1", .state = GATE_INSTALLED, .reason = ""},
        {.name = "already applied", .applied = "9.0.1", .state = GATE_INSTALLED, .reason = ""},
        {.name = "a node unreachable",
         .nodes = "p1=9.0.1 p2=9.0.1 p3!",
         .state = GATE_HELD,
         .reason = "node_unreachable: p3"},
        {.name = "two unreachable, listed by id",
         .nodes = "p3! p1=9.0.1 p2!",
         .state = GATE_HELD,
         .reason = "node_unreachable: p2, p3"},
        {.name = "answer only through the load balancer does not count",
         .nodes = "p1=9.0.1 p2~9.0.1 p3=9.0.1",
         .state = GATE_HELD,
         .reason = "node_unreachable: p2"},
        {.name = "no node list",
         .nodes = "",
         .state = GATE_HELD,
         .reason = "node_unreachable: no nodes known"},
        {.name = "version skew",
         .nodes = "p1=9.0.1 p2=9.0.1 p3=9.0.0",
         .state = GATE_HELD,
         .reason = "version_skew: p3=9.0.0"},
        {.name = "version skew lists each differing node's version by id",
         .offer = "9.0.2",
         .nodes = "p3=9.0.0 p2=9.0.1 p1=9.0.2",
         .state = GATE_HELD,
         .reason = "version_skew: p2=9.0.1, p3=9.0.0"},
        {.name = "cluster agrees on another version than the offer",
         .offer = "9.0.2",
         .state = GATE_HELD,
         .reason = "version_skew: p1=9.0.1, p2=9.0.1, p3=9.0.1"},
        {.name = "settings change in progress",
         .busy = true,
         .state = GATE_HELD,
         .reason = "settings_change_in_progress"},
        {.name = "settling", .agreeing = 1, .state = GATE_WAITING, .reason = "settling: 1/2 rounds"},
        {.name = "settling 2/3",
         .agreeing = 2,
         .stable = 3,
         .state = GATE_WAITING,
         .reason = "settling: 2/3 rounds"},
        {.name = "stable 1 of 1", .agreeing = 1, .stable = 1, .state = GATE_OPEN, .reason = ""},
        {.name = "outside window",
         .window = "02:00-04:00",
         .state = GATE_WAITING,
         .reason = "outside_window: 02:00-04:00"},
        {.name = "inside window", .window = "11:30-12:30", .state = GATE_OPEN, .reason = ""},
        {.name = "window start inclusive",
         .at = "02:00:00",
         .window = "02:00-04:00",
         .state = GATE_OPEN,
         .reason = ""},
        {.name = "window end exclusive",
         .at = "04:00:00",
         .window = "02:00-04:00",
         .state = GATE_WAITING,
         .reason = "outside_window: 02:00-04:00"},
        {.name = "midnight window at 23:00",
         .at = "23:00:00",
         .window = "22:00-02:00",
         .state = GATE_OPEN,
         .reason = ""},
        {.name = "midnight window at 01:00",
         .at = "01:00:00",
         .window = "22:00-02:00",
         .state = GATE_OPEN,
         .reason = ""},
        {.name = "midnight window at 01:59:59",
         .at = "01:59:59",
         .window = "22:00-02:00",
         .state = GATE_OPEN,
         .reason = ""},
        {.name = "midnight window at 02:00",
         .at = "02:00:00",
         .window = "22:00-02:00",
         .state = GATE_WAITING,
         .reason = "outside_window: 22:00-02:00"},
        {.name = "midnight window at 03:00",
         .at = "03:00:00",
         .window = "22:00-02:00",
         .state = GATE_WAITING,
         .reason = "outside_window: 22:00-02:00"},
        {.name = "midnight window at 21:59",
         .at = "21:59:00",
         .window = "22:00-02:00",
         .state = GATE_WAITING,
         .reason = "outside_window: 22:00-02:00"},
        {.name = "delay not passed",
         .delay_usec = 143 * USEC_PER_SEC,
         .state = GATE_WAITING,
         .reason = "delay: 143s"},
        {.name = "delay rounds up",
         .delay_usec = 142 * USEC_PER_SEC + 200 * USEC_PER_MSEC,
         .state = GATE_WAITING,
         .reason = "delay: 143s"},
        {.name = "delay 1us left", .delay_usec = 1, .state = GATE_WAITING, .reason = "delay: 1s"},
        {.name = "delay passed",
         .delay_usec = -5 * (int64_t) USEC_PER_SEC,
         .state = GATE_OPEN,
         .reason = ""},
        {.name = "all conditions met", .state = GATE_OPEN, .reason = ""},
        {.name = "four nodes agree",
         .nodes = "p1=9.0.1 p2=9.0.1 p3=9.0.1 p4=9.0.1",
         .state = GATE_OPEN,
         .reason = ""},
        {.name = "unknown installed version", .installed = "", .state = GATE_OPEN, .reason = ""},

        /* precedence: each row fails two checks; the earlier one wins */
        {.name = "disabled before no offer",
         .disabled = true,
         .no_offer = true,
         .state = GATE_DISABLED,
         .reason = ""},
        {.name = "no offer before unreachable",
         .no_offer = true,
         .nodes = "p1!",
         .state = GATE_NONE,
         .reason = ""},
        {.name = "installed before unreachable",
         .installed = "9.0.1",
         .nodes = "p1!",
         .state = GATE_INSTALLED,
         .reason = ""},
        {.name = "unreachable before skew",
         .nodes = "p1=9.0.1 p2! p3=9.0.0",
         .state = GATE_HELD,
         .reason = "node_unreachable: p2"},
        {.name = "skew before settings change",
         .nodes = "p1=9.0.1 p2=9.0.0 p3=9.0.1",
         .busy = true,
         .state = GATE_HELD,
         .reason = "version_skew: p2=9.0.0"},
        {.name = "settings change before settling",
         .busy = true,
         .agreeing = 1,
         .state = GATE_HELD,
         .reason = "settings_change_in_progress"},
        {.name = "settling before window",
         .agreeing = 1,
         .window = "02:00-04:00",
         .state = GATE_WAITING,
         .reason = "settling: 1/2 rounds"},
        {.name = "window before delay",
         .window = "02:00-04:00",
         .delay_usec = 10 * USEC_PER_SEC,
         .state = GATE_WAITING,
         .reason = "outside_window: 02:00-04:00"},
};

static unsigned parse_hm(const char *s, size_t *pos) {
        unsigned h = 0, m = 0;
        int n = 0;

        assert_int_equal(sscanf(s + *pos, "%2u:%2u%n", &h, &m, &n), 2);
        *pos += (size_t) n;
        return h * 60 + m;
}

static uint64_t parse_at(const char *s) {
        unsigned h, m, sec;

        assert_int_equal(sscanf(s, "%2u:%2u:%2u", &h, &m, &sec), 3);
        return DAY0_USEC + ((uint64_t) h * 3600 + m * 60 + sec) * USEC_PER_SEC;
}

static size_t parse_nodes(const char *spec, GateNode *nodes) {
        size_t n = 0;

        for (const char *p = spec; *p;) {
                size_t len = strcspn(p, " "), idlen = strcspn(p, "=~!");
                GateNode *g = &nodes[n++];

                assert_true(n <= GATE_MAX_NODES);
                assert_true(idlen < len || p[idlen] == '!');
                *g = (GateNode){.answered_direct = p[idlen] == '='};
                memcpy(g->id, p, idlen);
                if (p[idlen] != '!')
                        memcpy(g->version, p + idlen + 1, len - idlen - 1);
                p += len;
                p += strspn(p, " ");
        }
        return n;
}

static void run_row(const Row *row) {
        GateNode nodes[GATE_MAX_NODES];
        AgentUpdate offer = {.present = true, .size = 1};
        GateInput in = {
                .enabled = !row->disabled,
                .offer = row->no_offer ? NULL : &offer,
                .installed = row->installed ? row->installed : "9.0.0",
                .applied = row->applied ? row->applied : "",
                .nodes = nodes,
                .n_nodes = parse_nodes(row->nodes ? row->nodes : "p1=9.0.1 p2=9.0.1 p3=9.0.1", nodes),
                .agreeing_rounds = row->agreeing ? row->agreeing : 2,
                .stable_rounds = row->stable ? row->stable : 2,
                .settings_busy = row->busy,
                .now_usec = parse_at(row->at ? row->at : "12:00:00"),
        };
        GateResult res;

        assert_int_equal(strscpy(offer.version, sizeof(offer.version), row->offer ? row->offer : "9.0.1"),
                         0);
        if (row->window) {
                size_t pos = 0;

                in.window_set = true;
                in.window_start_min = parse_hm(row->window, &pos);
                assert_int_equal(row->window[pos++], '-');
                in.window_end_min = parse_hm(row->window, &pos);
        }
        in.delay_not_before_usec = (uint64_t) ((int64_t) in.now_usec + row->delay_usec);

        gate_evaluate(&in, &res);
        if (res.state != row->state || strcmp(res.reason, row->reason) != 0)
                fail_msg("row \"%s\": got %s \"%s\", want %s \"%s\"", row->name,
                         gate_state_to_string(res.state), res.reason, gate_state_to_string(row->state),
                         row->reason);
}

static void test_table(void **state) {
        for (size_t i = 0; i < ELEMENTSOF(rows); i++)
                run_row(&rows[i]);
}

/* agent_update: null in the Primary's answer arrives as present = false. */
static void test_offer_not_present(void **state) {
        AgentUpdate offer = {.present = false};
        GateInput in = {.enabled = true, .offer = &offer, .installed = "", .applied = ""};
        GateResult res;

        gate_evaluate(&in, &res);
        assert_int_equal(res.state, GATE_NONE);
}

static void test_window_contains(void **state) {
        /* plain window */
        assert_true(gate_window_contains(120, 240, 120));
        assert_true(gate_window_contains(120, 240, 239));
        assert_false(gate_window_contains(120, 240, 240));
        assert_false(gate_window_contains(120, 240, 119));
        /* across midnight: 22:00-02:00 */
        assert_true(gate_window_contains(1320, 120, 1320));
        assert_true(gate_window_contains(1320, 120, 1380));
        assert_true(gate_window_contains(1320, 120, 0));
        assert_true(gate_window_contains(1320, 120, 60));
        assert_false(gate_window_contains(1320, 120, 120));
        assert_false(gate_window_contains(1320, 120, 180));
        assert_false(gate_window_contains(1320, 120, 1319));
        /* equal ends: the whole day, never an update blocked forever */
        assert_true(gate_window_contains(600, 600, 0));
        assert_true(gate_window_contains(600, 600, 599));
}

static void test_state_names(void **state) {
        assert_string_equal(gate_state_to_string(GATE_DISABLED), "disabled");
        assert_string_equal(gate_state_to_string(GATE_NONE), "none");
        assert_string_equal(gate_state_to_string(GATE_INSTALLED), "installed");
        assert_string_equal(gate_state_to_string(GATE_HELD), "held");
        assert_string_equal(gate_state_to_string(GATE_WAITING), "waiting");
        assert_string_equal(gate_state_to_string(GATE_OPEN), "open");
        assert_string_equal(gate_state_to_string((GateState) 99), "unknown");
}

/* The longest reason (8 nodes, 64-character ids and versions) is cut at a
 * whole entry and stays NUL-terminated. */
static void test_long_reason_truncated(void **state) {
        GateNode nodes[GATE_MAX_NODES];
        AgentUpdate offer = {.present = true, .version = "1"};
        GateInput in = {.enabled = true,
                        .offer = &offer,
                        .installed = "",
                        .applied = "",
                        .nodes = nodes,
                        .n_nodes = GATE_MAX_NODES,
                        .agreeing_rounds = 2,
                        .stable_rounds = 2};
        GateResult res;

        for (size_t i = 0; i < GATE_MAX_NODES; i++) {
                nodes[i] = (GateNode){.answered_direct = true};
                memset(nodes[i].id, 'a' + (int) i, PROVIDER_ID_MAX);
                memset(nodes[i].version, '9', PROVIDER_VERSION_MAX);
        }
        gate_evaluate(&in, &res);
        assert_int_equal(res.state, GATE_HELD);
        assert_true(strlen(res.reason) < sizeof(res.reason));
        assert_true(strncmp(res.reason, "version_skew: aaaa", 18) == 0);
        /* ends on a whole "id=version" entry */
        assert_int_equal(res.reason[strlen(res.reason) - 1], '9');
        assert_null(strstr(res.reason, "hhhh"));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_table),
                cmocka_unit_test(test_offer_not_present),
                cmocka_unit_test(test_window_contains),
                cmocka_unit_test(test_state_names),
                cmocka_unit_test(test_long_reason_truncated),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
