/* The synchronization core (agent/sync.c) against a hostile Provider and an
 * unlucky fleet: whole sequences of rounds through sync_round_progress(),
 * sync_round_done() and sync_update_ready(), with every effect recorded by a
 * fake SyncIO. Each test is a defect an independent review found (or an
 * attack that held), written so that it fails on the code that had it. */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "macro.h"
#include "sync.h"

#define MAX_TARGETS 8
#define VERSION     "9.0.2"

/* ---- the fake world ---- */

typedef struct World {
        uint64_t now_usec;
        PersistentState saved; /* the state file */
        unsigned saves;
        Committed settings; /* what the settings file says */
        unsigned settings_writes;
        bool settings_busy;
        BrokerInfo broker;
        unsigned broker_moves;
        UpdaterPhase phase;
        AgentUpdate fetching; /* what update_fetch was asked for */
        unsigned fetches;
        AgentUpdate applied; /* what update_apply was asked for */
        unsigned applies;
} World;

static uint64_t w_now(void *u, clockid_t clock) {
        return ((World *) u)->now_usec;
}

static int w_state_save(void *u, const PersistentState *s) {
        World *w = u;
        w->saved = *s;
        w->saves++;
        return 0;
}

static void w_settings_apply(void *u, const Committed *c) {
        World *w = u;
        w->settings = *c;
        w->settings_writes++;
}

static bool w_settings_busy(void *u) {
        return ((World *) u)->settings_busy;
}

static void w_broker_move(void *u, const BrokerInfo *b) {
        World *w = u;
        w->broker = *b;
        w->broker_moves++;
}

static void w_read_installed(void *u, char *buf, size_t size) {
        strscpy(buf, size, "9.0.1");
}

static UpdaterPhase w_update_phase(void *u) {
        return ((World *) u)->phase;
}

static int w_update_fetch(void *u, const AgentUpdate *offer, const char *trusted) {
        World *w = u;
        w->fetching = *offer;
        w->fetches++;
        w->phase = UPDATER_DOWNLOADING;
        return 0;
}

static int w_update_apply(void *u, const AgentUpdate *offer) {
        World *w = u;
        if (w->phase != UPDATER_READY)
                return -ESTALE;
        w->applied = *offer;
        w->applies++;
        w->phase = UPDATER_APPLYING;
        return 0;
}

static const SyncIO world_io = {
        .now = w_now,
        .state_save = w_state_save,
        .settings_apply = w_settings_apply,
        .settings_busy = w_settings_busy,
        .broker_move = w_broker_move,
        .read_installed = w_read_installed,
        .update_phase = w_update_phase,
        .update_fetch = w_update_fetch,
        .update_apply = w_update_apply,
};

/* ---- answers ---- */

static void url_of(const char *id, char *buf, size_t size) {
        snprintf(buf, size, "https://%s.example:8443", id);
}

static void node_ref(NodeRef *r, const char *id) {
        *r = (NodeRef){};
        strscpy(r->id, sizeof(r->id), id);
        url_of(id, r->api_url, sizeof(r->api_url));
}

/* nodes: space separated ids, "" an empty list. */
static size_t node_list(NodeRef *out, const char *nodes) {
        char buf[256], *save = NULL;
        size_t n = 0;

        strscpy(buf, sizeof(buf), nodes);
        for (char *t = strtok_r(buf, " ", &save); t && n < PROVIDER_NODES_MAX;
             t = strtok_r(NULL, " ", &save))
                node_ref(&out[n++], t);
        return n;
}

static void broker_of(BrokerInfo *b, const char *host) {
        *b = (BrokerInfo){.port = 5671, .tls = true};
        strscpy(b->host, sizeof(b->host), host);
        strscpy(b->vhost, sizeof(b->vhost), "/dsm");
}

typedef struct Round {
        PollAnswer answers[MAX_TARGETS];
        size_t n;
        size_t pending;
} Round;

/* An answer at `id`'s own URL: role 'P' or 'S', epoch, the Primary it
 * names, its nodes list, its version; offer: the agent_update it carries. */
static PollAnswer *answer(Round *r, const char *id, char role, uint64_t epoch, const char *primary,
                          const char *nodes, bool offer) {
        PollAnswer *a = &r->answers[r->n++];
        ProviderState *s = &a->state;
        char host[64];

        *a = (PollAnswer){.outcome = POLL_OK, .ok = true, .have_state = true, .configured = true};
        url_of(id, a->url, sizeof(a->url));
        node_ref(&s->node, id);
        s->role = role == 'P' ? NODE_ROLE_PRIMARY : NODE_ROLE_STANDBY;
        strscpy(s->version, sizeof(s->version), VERSION);
        s->epoch = epoch;
        node_ref(&s->primary, primary);
        snprintf(host, sizeof(host), "%s.example", primary);
        broker_of(&s->broker, host);
        s->n_nodes = node_list(s->nodes, nodes);
        if (offer) {
                s->update = (AgentUpdate){.present = true, .size = 100};
                strscpy(s->update.version, sizeof(s->update.version), VERSION);
                snprintf(s->update.url, sizeof(s->update.url),
                         "https://%s.example:8443/api/v1/agent/packages/" VERSION, id);
                memset(s->update.sha256, 'a', SHA256_HEX_LEN);
        }
        return a;
}

/* A target that failed (500, refused) or has not answered yet. */
static void silent(Round *r, const char *id, bool pending) {
        PollAnswer *a = &r->answers[r->n++];

        *a = (PollAnswer){.outcome = pending ? POLL_PENDING : POLL_ERROR, .configured = true};
        url_of(id, a->url, sizeof(a->url));
        if (pending)
                r->pending++;
}

static PollRound as_round(const Round *r) {
        return (PollRound){.answers = r->answers,
                           .n_answers = r->n,
                           .n_pending = r->pending,
                           .in_flight = r->pending > 0};
}

/* ---- the daemon under test ---- */

typedef struct Fixture {
        World world;
        Config cfg;
        Sync sync;
} Fixture;

/* Committed to primary at epoch, with `known` as the state file's nodes. */
static void start(Fixture *f, uint64_t epoch, const char *primary, const char *known) {
        PersistentState st = {};
        SyncIO io = world_io;

        *f = (Fixture){};
        f->world.now_usec = 1000 * USEC_PER_SEC;
        f->cfg.state_file = (char *) "/nonexistent/state.json";
        f->cfg.poll_interval = 30 * USEC_PER_SEC;
        f->cfg.update_enabled = true;
        f->cfg.stable_rounds = 1;
        if (epoch > 0) {
                char host[64];
                st.committed.epoch = epoch;
                node_ref(&st.committed.primary, primary);
                snprintf(host, sizeof(host), "%s.example", primary);
                broker_of(&st.committed.broker, host);
        }
        st.n_nodes = node_list(st.nodes, known);
        io.userdata = &f->world;
        sync_init(&f->sync, &f->cfg, &io, &st, false);
}

static void done(Fixture *f, const Round *r) {
        PollRound pr = as_round(r);
        RuleResult res;

        f->world.now_usec += 5 * USEC_PER_SEC;
        sync_round_done(&f->sync, &pr, &res);
}

static bool progress(Fixture *f, const Round *r) {
        PollRound pr = as_round(r);
        return sync_round_progress(&f->sync, &pr);
}

static bool known_has(const PersistentState *s, const char *id) {
        for (size_t i = 0; i < s->n_nodes; i++)
                if (strcmp(s->nodes[i].id, id) == 0)
                        return true;
        return false;
}

/* ---- rule 6: the known cluster never shrinks through a Standby ---- */

/* Committed p1@7 in a known p1/p2/p3 cluster. p1 and p2 fail; p3, rebuilt
 * or confused, follows p1 at 7 but lists only itself. A round later it
 * names itself Primary at 8 while still a Standby. Contract rule 6: "a lone
 * Standby that lists no other node, or only itself, is one vote of three in
 * a known three-node cluster, not a majority of one". */
static void test_standby_cannot_shrink_known_then_win_alone(void **state) {
        Fixture f;
        Round r1 = {}, r2 = {};

        start(&f, 7, "p1", "p1 p2 p3");
        silent(&r1, "p1", false);
        silent(&r1, "p2", false);
        answer(&r1, "p3", 'S', 7, "p1", "p3", false);
        done(&f, &r1);
        assert_true(known_has(&f.sync.state, "p1"));
        assert_true(known_has(&f.sync.state, "p2"));
        assert_true(known_has(&f.world.saved, "p1") || f.world.saves == 0);

        silent(&r2, "p1", false);
        silent(&r2, "p2", false);
        answer(&r2, "p3", 'S', 8, "p3", "", false);
        done(&f, &r2);
        assert_int_equal(f.sync.state.committed.epoch, 7);
        assert_string_equal(f.sync.state.committed.primary.id, "p1");
        assert_int_equal(f.world.settings_writes, 0);
        assert_int_equal(f.world.broker_moves, 0);
}

/* The same in a known four-node cluster, without anyone naming itself: p4
 * lists only itself while p1..p3 are down; then p3 and p4 name p2 at 8.
 * Two of four is no majority. */
static void test_standby_cannot_shrink_known_four(void **state) {
        Fixture f;
        Round r1 = {}, r2 = {};

        start(&f, 7, "p1", "p1 p2 p3 p4");
        silent(&r1, "p1", false);
        silent(&r1, "p2", false);
        silent(&r1, "p3", false);
        answer(&r1, "p4", 'S', 7, "p1", "p4", false);
        done(&f, &r1);

        silent(&r2, "p1", false);
        silent(&r2, "p2", false);
        answer(&r2, "p3", 'S', 8, "p2", "", false);
        answer(&r2, "p4", 'S', 8, "p2", "", false);
        done(&f, &r2);
        assert_int_equal(f.sync.state.committed.epoch, 7);
        assert_int_equal(f.world.settings_writes, 0);
}

/* A Standby's list may grow the known cluster (a node added while the
 * Primary is away), never rename where a known node lives: the poller
 * sends the Provider token to those URLs. */
static void test_standby_cannot_move_a_known_node(void **state) {
        Fixture f;
        Round r1 = {};
        PollAnswer *a;

        start(&f, 7, "p1", "p1 p2 p3");
        silent(&r1, "p1", false);
        a = answer(&r1, "p3", 'S', 7, "p1", "p1 p2 p3 p4", false);
        strscpy(a->state.nodes[1].api_url, sizeof(a->state.nodes[1].api_url), "https://evil.example:8443");
        done(&f, &r1);
        for (size_t i = 0; i < f.sync.state.n_nodes; i++)
                assert_null(strstr(f.sync.state.nodes[i].api_url, "evil"));
        assert_true(known_has(&f.sync.state, "p1"));
        assert_true(known_has(&f.sync.state, "p2"));
        assert_true(known_has(&f.sync.state, "p3"));
}

/* The committed Primary itself is the authority on its cluster: its own
 * answer replaces the list (a node removed by the operator goes). */
static void test_primary_may_shrink_known(void **state) {
        Fixture f;
        Round r1 = {};

        start(&f, 7, "p1", "p1 p2 p3 p4");
        answer(&r1, "p1", 'P', 7, "p1", "p1 p2 p3", false);
        answer(&r1, "p2", 'S', 7, "p1", "p1 p2 p3", false);
        answer(&r1, "p3", 'S', 7, "p1", "p1 p2 p3", false);
        done(&f, &r1);
        assert_int_equal(f.sync.state.n_nodes, 3);
        assert_false(known_has(&f.sync.state, "p4"));
}

/* ---- contract 8: the offer is the committed Primary's ---- */

/* The round's pending targets time out and the round ends. */
static void round_times_out(Fixture *f, Round *r) {
        PollRound pr;

        for (size_t i = 0; i < r->n; i++)
                if (r->answers[i].outcome == POLL_PENDING)
                        r->answers[i].outcome = POLL_ERROR;
        r->pending = 0;
        pr = as_round(r);
        sync_round_done(&f->sync, &pr, NULL);
}

/* Committed p1@1, all at the offered version: a whole round
 * opens the gate with p1's offer and starts the download. */
static void open_gate_with_p1_offer(Fixture *f, Round *r1) {
        start(f, 1, "p1", "p1 p2 p3");
        answer(r1, "p1", 'P', 1, "p1", "p1 p2 p3", true);
        answer(r1, "p2", 'S', 1, "p1", "p1 p2 p3", false);
        answer(r1, "p3", 'S', 1, "p1", "p1 p2 p3", false);
        done(f, r1);
}

/* The gate opened with p1's offer and the package is downloading. p1's host
 * vanishes, p2 is promoted, and the round commits p2 early (rule 7) while
 * p1's request hangs. The download ends now: the committed Primary (p2) has
 * not offered anything yet, so nothing may run until a round says what it
 * offers. */
static void test_offer_of_old_primary_not_applied_after_early_commit(void **state) {
        Fixture f;
        Round r1 = {}, r2 = {};

        open_gate_with_p1_offer(&f, &r1);
        assert_int_equal(f.sync.gate.state, GATE_OPEN);
        assert_int_equal(f.world.fetches, 1);

        silent(&r2, "p1", true);
        answer(&r2, "p2", 'P', 2, "p2", "p1 p2 p3", false);
        answer(&r2, "p3", 'S', 2, "p2", "p1 p2 p3", false);
        assert_true(progress(&f, &r2));
        assert_int_equal(f.sync.state.committed.epoch, 2);

        f.world.phase = UPDATER_READY;
        sync_update_ready(&f.sync, &f.world.fetching);
        assert_int_equal(f.world.applies, 0);

        /* The round ends (p1 times out): p2 offers nothing, nothing runs. */
        round_times_out(&f, &r2);
        assert_int_equal(f.world.applies, 0);
        assert_int_equal(f.sync.gate.state, GATE_NONE);
}

/* The other side: the new Primary offers the same package. The kept
 * package waits for a whole round in which every node answers, then runs
 * once. */
static void test_offer_of_new_primary_applied_once(void **state) {
        Fixture f;
        Round r1 = {}, r2 = {}, r3 = {};

        open_gate_with_p1_offer(&f, &r1);

        silent(&r2, "p1", true);
        answer(&r2, "p2", 'P', 2, "p2", "p1 p2 p3", true)->state.update = r1.answers[0].state.update;
        answer(&r2, "p3", 'S', 2, "p2", "p1 p2 p3", false);
        assert_true(progress(&f, &r2));
        f.world.phase = UPDATER_READY;
        sync_update_ready(&f.sync, &f.world.fetching);
        assert_int_equal(f.world.applies, 0);

        /* p1 never answered this round: node_unreachable holds it. */
        round_times_out(&f, &r2);
        assert_int_equal(f.world.applies, 0);
        assert_int_equal(f.sync.gate.state, GATE_HELD);

        answer(&r3, "p1", 'S', 2, "p2", "p1 p2 p3", false);
        answer(&r3, "p2", 'P', 2, "p2", "p1 p2 p3", true)->state.update = r1.answers[0].state.update;
        answer(&r3, "p3", 'S', 2, "p2", "p1 p2 p3", false);
        done(&f, &r3);
        assert_int_equal(f.world.applies, 1);
        done(&f, &r3);
        assert_int_equal(f.world.applies, 1);
}

/* ---- rule 7 ---- */

/* An early commit needs a strict majority of the known cluster in hand;
 * after it, the whole round is judged: a late rival at the committed epoch
 * is a conflict (reported), never a move and never a second commit. */
static void test_early_commit_then_late_rival(void **state) {
        Fixture f;
        Round r = {};
        PollRound pr;
        RuleResult res;

        start(&f, 1, "p1", "p1 p2 p3 p4");
        silent(&r, "p1", true);
        silent(&r, "p4", true);
        answer(&r, "p2", 'P', 2, "p2", "", false);
        answer(&r, "p3", 'S', 2, "p2", "", false);
        assert_false(progress(&f, &r)); /* 2 of the known 4 answered */

        r.answers[1] = *answer(&r, "p4", 'S', 2, "p2", "", false);
        r.n--;
        r.pending--;
        assert_true(progress(&f, &r)); /* 3 of 4 */
        assert_int_equal(f.world.settings_writes, 1);
        assert_int_equal(f.world.saved.committed.epoch, 2);

        /* p1 answers late, claiming primary at 2 too. */
        r.answers[0] = *answer(&r, "p1", 'P', 2, "p1", "", false);
        r.n--;
        r.pending = 0;
        pr = as_round(&r);
        sync_round_done(&f.sync, &pr, &res);
        assert_true(res.conflict);
        assert_int_equal(f.sync.state.committed.epoch, 2);
        assert_string_equal(f.sync.state.committed.primary.id, "p2");
        assert_int_equal(f.world.settings_writes, 1);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_standby_cannot_shrink_known_then_win_alone),
                cmocka_unit_test(test_standby_cannot_shrink_known_four),
                cmocka_unit_test(test_standby_cannot_move_a_known_node),
                cmocka_unit_test(test_primary_may_shrink_known),
                cmocka_unit_test(test_offer_of_old_primary_not_applied_after_early_commit),
                cmocka_unit_test(test_offer_of_new_primary_applied_once),
                cmocka_unit_test(test_early_commit_then_late_rival),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
