/* ack: the convergence acknowledgement's body (exact text) and its life
 * cycle over every broker answer: one per commit, sent only on the commit's
 * broker once connected, sent again after a reconnect or a nack (bounded),
 * dropped on a refusal, replaced by a newer commit. broker_publish() is
 * replaced here (an object linked into the program wins over broker.o,
 * which is not linked), so every answer of the broker can be scripted. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "ack.h"
#include "version.h"
#include "macro.h"
#include "util.h"

/* ---- the scripted broker ---- */

static struct {
        int answer; /* what broker_publish returns */
        unsigned calls;
        uint64_t seq;
        BrokerInfo target;
        char body[1024];
        char routing_key[64];
} fake;

int broker_publish(Broker *b, const BrokerInfo *target, const char *routing_key, const void *body,
                   size_t len, uint64_t *ret_seq) {
        fake.calls++;
        if (fake.answer < 0)
                return fake.answer;
        fake.target = *target;
        snprintf(fake.body, sizeof fake.body, "%.*s", (int) len, (const char *) body);
        snprintf(fake.routing_key, sizeof fake.routing_key, "%s", routing_key);
        *ret_seq = ++fake.seq;
        return 0;
}

static uint64_t zero_source(void *userdata) {
        return 0; /* every full-jitter backoff is 0: the retry fires on the next iteration */
}

static Committed commit(uint64_t epoch, const char *primary, const char *host) {
        Committed c = {.epoch = epoch};

        snprintf(c.primary.id, sizeof c.primary.id, "%s", primary);
        snprintf(c.broker.host, sizeof c.broker.host, "%s", host);
        c.broker.port = 5672;
        snprintf(c.broker.vhost, sizeof c.broker.vhost, "/");
        return c;
}

typedef struct Fixture {
        sd_event *e;
        Ack *a;
} Fixture;

static int setup(void **state) {
        Fixture *f = calloc(1, sizeof *f);

        memset(&fake, 0, sizeof fake);
        fake.answer = -ENOTCONN;
        random_set_source(zero_source, NULL);
        assert_int_equal(sd_event_new(&f->e), 0);
        assert_int_equal(ack_new(f->e, NULL, "agent-7", NULL, &f->a), 0);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        Fixture *f = *state;

        ack_free(f->a);
        sd_event_unref(f->e);
        free(f);
        random_set_source(NULL, NULL);
        return 0;
}

static void run_loop(Fixture *f) {
        for (int i = 0; i < 10; i++)
                (void) sd_event_run(f->e, 0);
}

/* ---- the body ---- */

static void test_render_exact(void **state) {
        Committed c = commit(8, "p2", "p2.example");
        char *s = NULL;

        /* 2026-12-03T16:20:01.123456Z */
        assert_int_equal(ack_render("db-17", &c, 1796314801123456ULL, &s), 0);
        assert_string_equal(
                s,
                "{\"agent_id\":\"db-17\",\"epoch\":8,\"primary_id\":\"p2\","
                "\"settings_written_at\":\"2026-12-03T16:20:01.123Z\",\"daemon\":\"" DAEMON_VERSION "\"}");
        free(s);
        /* Milliseconds keep their leading zeros. */
        assert_int_equal(ack_render("db-17", &c, 1796314801004999ULL, &s), 0);
        assert_non_null(strstr(s, "\"2026-12-03T16:20:01.004Z\""));
        free(s);
}

static void test_render_escapes_and_rejects_bad_utf8(void **state) {
        Committed c = commit(1, "p\"1\\", "h");
        json_t *j;
        char *s = NULL;

        assert_int_equal(ack_render("a", &c, 0, &s), 0);
        j = json_loads(s, 0, NULL); /* still one valid JSON object */
        assert_non_null(j);
        assert_string_equal(json_string_value(json_object_get(j, "primary_id")), "p\"1\\");
        json_decref(j);
        free(s);
        c = commit(1, "p\xff", "h");
        assert_int_equal(ack_render("a", &c, 0, &s), -EINVAL);
}

static void test_agent_id(void **state) {
        char buf[CONFIG_AGENT_ID_MAX + 1], long_id[CONFIG_AGENT_ID_MAX + 2];
        Ack *a = NULL;

        assert_true(config_agent_id_valid("db-17.eu-west:a_b"));
        assert_true(config_agent_id_valid("0123456789abcdef0123456789abcdef"));
        assert_false(config_agent_id_valid(""));
        assert_false(config_agent_id_valid("a b"));
        assert_false(config_agent_id_valid("a/b"));
        assert_false(config_agent_id_valid("a\"b"));
        assert_false(config_agent_id_valid("caf\xc3\xa9"));
        memset(long_id, 'a', sizeof long_id - 1);
        long_id[sizeof long_id - 1] = 0;
        assert_false(config_agent_id_valid(long_id));
        long_id[CONFIG_AGENT_ID_MAX] = 0;
        assert_true(config_agent_id_valid(long_id));
        assert_int_equal(ack_new(NULL, NULL, "a b", NULL, &a), -EINVAL);
        /* The default is a valid id (the machine id, else the host name). */
        if (ack_default_agent_id(buf, sizeof buf) == 0)
                assert_true(config_agent_id_valid(buf));
        assert_int_equal(ack_default_agent_id(buf, 8), -ENOBUFS);
}

/* ---- the life cycle ---- */

static void test_one_ack_per_commit(void **state) {
        Fixture *f = *state;
        Committed c = commit(3, "p2", "b2");

        fake.answer = 0;
        ack_converged(f->a, &c, 1);
        ack_converged(f->a, &c, 2); /* the file rewritten again for the same commit */
        assert_int_equal(fake.calls, 1);
        assert_string_equal(fake.routing_key, "fleet.agent.synced");
        assert_string_equal(fake.target.host, "b2");
        ack_confirmed(f->a, fake.seq, false, true);
        assert_int_equal(ack_outcomes(f->a, ACK_CONFIRMED), 1);
        assert_int_equal(ack_confirmed_epoch(f->a), 3);
        ack_converged(f->a, &c, 3); /* after the confirm too */
        c.epoch = 2;                /* and an older commit never */
        ack_converged(f->a, &c, 4);
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(fake.calls, 1);
        assert_int_equal(ack_publishes(f->a), 1);
}

static void test_waits_for_the_connection(void **state) {
        Fixture *f = *state;
        Committed c = commit(4, "p3", "b3");

        ack_converged(f->a, &c, 1); /* not connected: tried, nothing sent */
        assert_int_equal(ack_publishes(f->a), 0);
        fake.answer = -ESTALE; /* connected, but still to the old broker */
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(ack_publishes(f->a), 0);
        ack_broker_state(f->a, BROKER_CONNECTING);
        fake.answer = 0;
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(ack_publishes(f->a), 1);
        assert_non_null(strstr(fake.body, "\"epoch\":4"));
        ack_broker_state(f->a, BROKER_CONNECTED); /* in flight: not twice */
        assert_int_equal(ack_publishes(f->a), 1);
}

static void test_lost_before_the_confirm_is_sent_again(void **state) {
        Fixture *f = *state;
        Committed c = commit(5, "p1", "b1");
        uint64_t first;

        fake.answer = 0;
        ack_converged(f->a, &c, 1);
        first = fake.seq;
        ack_broker_state(f->a, BROKER_DOWN);
        ack_confirmed(f->a, first, false, true); /* a confirm of the old connection: stale */
        assert_int_equal(ack_outcomes(f->a, ACK_CONFIRMED), 0);
        fake.seq = 0; /* a new connection numbers from 1 again */
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(ack_publishes(f->a), 2);
        ack_confirmed(f->a, fake.seq + 1, false, true); /* not ours */
        ack_confirmed(f->a, fake.seq - 1, true, true);  /* multiple, but only earlier ones */
        assert_int_equal(ack_outcomes(f->a, ACK_CONFIRMED), 0);
        ack_confirmed(f->a, fake.seq + 3, true, true); /* multiple: covers ours */
        assert_int_equal(ack_outcomes(f->a, ACK_CONFIRMED), 1);
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(ack_publishes(f->a), 2);
}

/* A publish that costs the connection every time (a broker or a middlebox
 * that drops the connection on it): each reconnect must not send it again
 * for ever, each time after the shortest reconnect backoff (the connection
 * came up, so the broker's backoff starts over). ACK_SENDS_MAX publishes
 * in all, as for nacks, then it is given up. */
static void test_lost_after_every_publish_is_given_up(void **state) {
        Fixture *f = *state;
        Committed c = commit(11, "p2", "b2");

        fake.answer = 0;
        ack_converged(f->a, &c, 1);
        for (int i = 0; i < 3 * ACK_SENDS_MAX; i++) {
                ack_broker_state(f->a, BROKER_DOWN);
                ack_broker_state(f->a, BROKER_CONNECTING);
                ack_broker_state(f->a, BROKER_CONNECTED);
        }
        assert_int_equal(ack_publishes(f->a), ACK_SENDS_MAX);
        assert_int_equal(ack_outcomes(f->a, ACK_GAVE_UP), 1);
        assert_int_equal(ack_confirmed_epoch(f->a), 0);
        /* The next commit is tried again. */
        c.epoch = 12;
        ack_converged(f->a, &c, 2);
        assert_int_equal(ack_publishes(f->a), ACK_SENDS_MAX + 1);
}

static void test_nacks_are_retried_then_given_up(void **state) {
        Fixture *f = *state;
        Committed c = commit(6, "p2", "b2");

        fake.answer = 0;
        ack_converged(f->a, &c, 1);
        for (unsigned i = 1; i < ACK_SENDS_MAX; i++) {
                ack_confirmed(f->a, fake.seq, false, false);
                assert_int_equal(ack_publishes(f->a), i); /* not at once: after the backoff */
                run_loop(f);
                assert_int_equal(ack_publishes(f->a), i + 1);
        }
        ack_confirmed(f->a, fake.seq, false, false);
        run_loop(f);
        assert_int_equal(ack_publishes(f->a), ACK_SENDS_MAX);
        assert_int_equal(ack_outcomes(f->a, ACK_NACKED), ACK_SENDS_MAX);
        assert_int_equal(ack_outcomes(f->a, ACK_GAVE_UP), 1);
        assert_int_equal(ack_confirmed_epoch(f->a), 0);
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(ack_publishes(f->a), ACK_SENDS_MAX);
}

static void test_refusal_drops_it(void **state) {
        Fixture *f = *state;
        Committed c = commit(7, "p2", "b2");

        fake.answer = 0;
        ack_refused(f->a, "403 ACCESS_REFUSED"); /* nothing in flight: only a debug line */
        assert_int_equal(ack_outcomes(f->a, ACK_REFUSED), 0);
        ack_converged(f->a, &c, 1);
        ack_refused(f->a, "403 ACCESS_REFUSED - access to exchange denied");
        assert_int_equal(ack_outcomes(f->a, ACK_REFUSED), 1);
        ack_broker_state(f->a, BROKER_DOWN);
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(ack_publishes(f->a), 1);
        /* A connection whose publishing channel is already closed. */
        c.epoch = 8;
        fake.answer = -EPERM;
        ack_converged(f->a, &c, 2);
        assert_int_equal(ack_outcomes(f->a, ACK_REFUSED), 2);
        fake.answer = 0;
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(ack_publishes(f->a), 1);
}

static void test_newer_commit_supersedes(void **state) {
        Fixture *f = *state;
        Committed c1 = commit(9, "p2", "b2"), c2 = commit(10, "p3", "b3");

        ack_converged(f->a, &c1, 1);
        ack_converged(f->a, &c2, 2);
        assert_int_equal(ack_outcomes(f->a, ACK_SUPERSEDED), 1);
        fake.answer = 0;
        ack_broker_state(f->a, BROKER_CONNECTED);
        assert_int_equal(fake.calls, 3);
        assert_string_equal(fake.target.host, "b3");
        assert_non_null(strstr(fake.body, "\"epoch\":10"));
        assert_non_null(strstr(fake.body, "\"primary_id\":\"p3\""));
}

/* The last confirmed epoch survives a restart: a confirmed commit is not
 * acknowledged again, one cut short by the stop is. */
static void test_record_across_restarts(void **state) {
        char dir[] = "/tmp/test-ack-XXXXXX", path[64];
        Committed c5 = commit(5, "p2", "b2"), c6 = commit(6, "p3", "b3");
        sd_event *e = NULL;
        Ack *a = NULL;
        FILE *f;

        assert_non_null(mkdtemp(dir));
        snprintf(path, sizeof path, "%s/state.json.acked", dir);
        memset(&fake, 0, sizeof fake);
        assert_int_equal(sd_event_new(&e), 0);

        /* First life: epoch 5 confirmed and recorded. */
        assert_int_equal(ack_new(e, NULL, "agent-7", path, &a), 0);
        assert_int_equal(ack_confirmed_epoch(a), 0);
        ack_converged(a, &c5, 1);
        ack_confirmed(a, fake.seq, false, true);
        a = ack_free(a);

        /* Second life: the same commit reported at start is not sent. */
        assert_int_equal(ack_new(e, NULL, "agent-7", path, &a), 0);
        assert_int_equal(ack_confirmed_epoch(a), 5);
        ack_converged(a, &c5, 2);
        assert_int_equal(fake.calls, 1);
        /* Epoch 6 taken in hand, the stop comes before the confirm. */
        ack_converged(a, &c6, 3);
        assert_int_equal(fake.calls, 2);
        a = ack_free(a);

        /* Third life: epoch 6 was never confirmed, so it goes out. */
        assert_int_equal(ack_new(e, NULL, "agent-7", path, &a), 0);
        assert_int_equal(ack_confirmed_epoch(a), 5);
        ack_converged(a, &c6, 4);
        assert_int_equal(fake.calls, 3);
        a = ack_free(a);

        /* A record that is not an epoch is ignored (and said so). */
        f = fopen(path, "w");
        assert_non_null(f);
        fputs("garbage\n", f);
        fclose(f);
        assert_int_equal(ack_new(e, NULL, "agent-7", path, &a), 0);
        assert_int_equal(ack_confirmed_epoch(a), 0);
        ack_converged(a, &c5, 5);
        assert_int_equal(fake.calls, 4);
        a = ack_free(a);

        sd_event_unref(e);
        unlink(path);
        rmdir(dir);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_render_exact),
                cmocka_unit_test(test_render_escapes_and_rejects_bad_utf8),
                cmocka_unit_test(test_agent_id),
                cmocka_unit_test(test_record_across_restarts),
                cmocka_unit_test_setup_teardown(test_one_ack_per_commit, setup, teardown),
                cmocka_unit_test_setup_teardown(test_waits_for_the_connection, setup, teardown),
                cmocka_unit_test_setup_teardown(test_lost_before_the_confirm_is_sent_again, setup, teardown),
                cmocka_unit_test_setup_teardown(test_nacks_are_retried_then_given_up, setup, teardown),
                cmocka_unit_test_setup_teardown(test_lost_after_every_publish_is_given_up, setup, teardown),
                cmocka_unit_test_setup_teardown(test_refusal_drops_it, setup, teardown),
                cmocka_unit_test_setup_teardown(test_newer_commit_supersedes, setup, teardown),
        };

        log_setup(LOG_TARGET_STDERR, LOG_WARNING);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
