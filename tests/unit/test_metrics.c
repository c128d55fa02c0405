/* Unit tests of agent/metrics.c: the exact text for a snapshot, label
 * escaping, the bounded node table, and every answer checked line by line
 * by a strict parser of the Prometheus text format 0.0.4 written here (the
 * integration test has the same one in Python for a live daemon). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "macro.h"
#include "metrics.h"

/* ---- a strict 0.0.4 parser ---- */

#define MAX_FAMILIES 64
#define MAX_SERIES   1024
#define NAME_MAX_LEN 128
#define SERIES_MAX   512

typedef struct Family {
        char name[NAME_MAX_LEN];
        char type[16];
        bool help, samples_done;
        double last_bucket, count_value, inf_value;
        bool have_inf, have_count;
} Family;

typedef struct Parser {
        Family fam[MAX_FAMILIES];
        size_t n_fam;
        Family *cur; /* the family whose samples are being read */
        char series[MAX_SERIES][SERIES_MAX];
        size_t n_series;
} Parser;

static bool is_name_start(char c, bool colon) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':');
}

static bool is_name_char(char c, bool colon) {
        return is_name_start(c, colon) || (c >= '0' && c <= '9');
}

/* Reads a metric (colon) or label name at *p into buf; false when none. */
static bool read_name(const char **p, char *buf, size_t size, bool colon) {
        size_t n = 0;

        if (!is_name_start(**p, colon))
                return false;
        while (is_name_char(**p, colon) && n + 1 < size)
                buf[n++] = *(*p)++;
        buf[n] = 0;
        return !is_name_char(**p, colon);
}

static bool read_value(const char *s, double *ret) {
        char *end;

        if (strcmp(s, "+Inf") == 0 || strcmp(s, "-Inf") == 0 || strcmp(s, "NaN") == 0) {
                *ret = strcmp(s, "NaN") == 0 ? NAN : s[0] == '+' ? INFINITY : -INFINITY;
                return true;
        }
        if (!*s || strchr(s, ' ') || strpbrk(s, "iInN"))
                return false;
        *ret = strtod(s, &end);
        return *end == 0;
}

static Family *family_find(Parser *ps, const char *name) {
        for (size_t i = 0; i < ps->n_fam; i++)
                if (strcmp(ps->fam[i].name, name) == 0)
                        return &ps->fam[i];
        return NULL;
}

/* The family a sample belongs to: its own name, or for a histogram the
 * base name of _bucket/_sum/_count. */
static Family *family_of_sample(Parser *ps, const char *name, const char **suffix) {
        static const char *const sfx[] = {"_bucket", "_sum", "_count"};
        char base[NAME_MAX_LEN];
        Family *f;

        *suffix = "";
        for (size_t i = 0; i < ELEMENTSOF(sfx); i++) {
                size_t n = strlen(name), k = strlen(sfx[i]);
                if (n > k && strcmp(name + n - k, sfx[i]) == 0) {
                        snprintf(base, sizeof(base), "%.*s", (int) (n - k), name);
                        f = family_find(ps, base);
                        if (f && strcmp(f->type, "histogram") == 0) {
                                *suffix = sfx[i];
                                return f;
                        }
                }
        }
        f = family_find(ps, name);
        return f && strcmp(f->type, "histogram") != 0 ? f : NULL;
}

static bool parse_comment(Parser *ps, const char *line) {
        char name[NAME_MAX_LEN];
        const char *p;
        Family *f;

        if (strncmp(line, "# HELP ", 7) != 0 && strncmp(line, "# TYPE ", 7) != 0)
                return false; /* other comments: not ours */
        p = line + 7;
        if (!read_name(&p, name, sizeof(name), true) || *p != ' ')
                return false;
        p++;
        f = family_find(ps, name);
        if (!f) {
                if (ps->n_fam == MAX_FAMILIES)
                        return false;
                f = &ps->fam[ps->n_fam++];
                *f = (Family){};
                snprintf(f->name, sizeof(f->name), "%s", name);
        }
        if (f->samples_done || (ps->cur && ps->cur != f))
                ps->cur = NULL;
        if (line[2] == 'H') {
                if (f->help || !*p)
                        return false;
                for (const char *q = p; *q; q++) /* only \\ and \n escaped */
                        if (*q == '\\' && (q[1] != '\\' && q[1] != 'n'))
                                return false;
                        else if (*q == '\\')
                                q++;
                return f->help = true;
        }
        if (f->type[0] || f->samples_done)
                return false; /* TYPE once, before every sample */
        if (strcmp(p, "counter") && strcmp(p, "gauge") && strcmp(p, "histogram") && strcmp(p, "summary") &&
            strcmp(p, "untyped"))
                return false;
        snprintf(f->type, sizeof(f->type), "%s", p);
        return true;
}

/* Labels "{a="x",b="y"}" into a canonical text (in order: ours are fixed). */
static bool parse_labels(const char **p, char *canon, size_t size, char *le, size_t le_size) {
        char lname[NAME_MAX_LEN], names[8][NAME_MAX_LEN];
        size_t n = 0, used = 0;

        canon[0] = le[0] = 0;
        if (**p != '{')
                return true;
        (*p)++;
        while (**p != '}') {
                char val[256];
                size_t v = 0;

                if (!read_name(p, lname, sizeof(lname), false) || strncmp(lname, "__", 2) == 0 || n == 8)
                        return false;
                for (size_t i = 0; i < n; i++)
                        if (strcmp(names[i], lname) == 0)
                                return false; /* a label twice */
                snprintf(names[n++], NAME_MAX_LEN, "%s", lname);
                if (*(*p)++ != '=' || *(*p)++ != '"')
                        return false;
                while (**p != '"') {
                        if (!**p || **p == '\n' || v + 2 >= sizeof(val))
                                return false;
                        if (**p == '\\') {
                                char e = (*p)[1];
                                if (e != '\\' && e != '"' && e != 'n')
                                        return false;
                                val[v++] = *(*p)++;
                        }
                        val[v++] = *(*p)++;
                }
                val[v] = 0;
                (*p)++;
                if (strcmp(lname, "le") == 0)
                        snprintf(le, le_size, "%s", val);
                used += (size_t) snprintf(canon + used, size - used, "%s=\"%s\",", lname, val);
                if (used >= size)
                        return false;
                if (**p == ',')
                        (*p)++;
                else if (**p != '}')
                        return false;
        }
        (*p)++;
        return true;
}

static bool check_histogram(Family *f, const char *suffix, const char *le, double v) {
        double bound;

        if (strcmp(suffix, "_bucket") == 0) {
                if (!le[0] || !read_value(le, &bound) || f->have_inf || v < f->last_bucket)
                        return false; /* cumulative, ascending, +Inf last */
                f->last_bucket = v;
                if (isinf(bound) && bound > 0) {
                        f->have_inf = true;
                        f->inf_value = v;
                }
                return true;
        }
        if (le[0])
                return false;
        if (strcmp(suffix, "_count") == 0) {
                f->have_count = true;
                f->count_value = v;
        }
        return true;
}

static bool parse_sample(Parser *ps, const char *line) {
        char name[NAME_MAX_LEN], canon[SERIES_MAX - NAME_MAX_LEN], le[256];
        const char *p = line, *suffix;
        double v;
        Family *f;

        if (!read_name(&p, name, sizeof(name), true) ||
            !parse_labels(&p, canon, sizeof(canon), le, sizeof(le)))
                return false;
        if (*p++ != ' ' || !read_value(p, &v))
                return false; /* no timestamps: we never send one */
        f = family_of_sample(ps, name, &suffix);
        if (!f || !f->type[0] || !f->help || f->samples_done || (ps->cur && ps->cur != f))
                return false; /* unknown, untyped, or not contiguous */
        if (strcmp(f->type, "counter") == 0 &&
            (strlen(name) < 6 || strcmp(name + strlen(name) - 6, "_total")))
                return false;
        if (strcmp(f->type, "histogram") == 0 && !check_histogram(f, suffix, le, v))
                return false;
        if (ps->cur != f && ps->cur)
                ps->cur->samples_done = true;
        ps->cur = f;
        if (ps->n_series == MAX_SERIES)
                return false;
        if (snprintf(ps->series[ps->n_series], SERIES_MAX, "%s{%s}", name, canon) >= SERIES_MAX)
                return false; /* a series this long is not ours */
        for (size_t i = 0; i < ps->n_series; i++)
                if (strcmp(ps->series[i], ps->series[ps->n_series]) == 0)
                        return false; /* a series twice */
        ps->n_series++;
        return true;
}

/* 0 when text is valid 0.0.4, else the 1-based number of the bad line. */
static int parse_exposition(const char *text) {
        Parser *ps = calloc(1, sizeof(*ps));
        char line[1024];
        int no = 0, bad = 0;

        assert_non_null(ps);
        while (*text && !bad) {
                const char *nl = strchr(text, '\n');
                no++;
                if (!nl || (size_t) (nl - text) >= sizeof(line)) {
                        bad = no; /* every line ends with \n */
                        break;
                }
                snprintf(line, sizeof(line), "%.*s", (int) (nl - text), text);
                text = nl + 1;
                if (!line[0] || !(line[0] == '#' ? parse_comment(ps, line) : parse_sample(ps, line)))
                        bad = no;
        }
        for (size_t i = 0; !bad && i < ps->n_fam; i++) {
                Family *f = &ps->fam[i];
                if (strcmp(f->type, "histogram") == 0 &&
                    (!f->have_inf || !f->have_count || f->inf_value != f->count_value))
                        bad = no + 1;
        }
        free(ps);
        return bad;
}

/* ---- the tests ---- */

static const char *const states[] = {"disabled", "none",        "installed", "held",
                                     "waiting",  "downloading", "applying",  "failed"};

static MetricsSnapshot sample(MetricsNodePolls *polls, size_t n) {
        MetricsSnapshot s = {
                .epoch = 7,
                .primary_id = "p2",
                .polls = polls,
                .n_polls = n,
                .commits = 3,
                .events = 5,
                .notifies = 2,
                .rejected = {[METRICS_REJECT_UNAUTHORIZED] = 4, [METRICS_REJECT_RATE_LIMITED] = 1},
                .broker_connected = true,
                .broker_reconnects = 1,
                .on_change_ok = 3,
                .on_change_failed = 1,
                .acks = {[METRICS_ACK_CONFIRMED] = 4,
                         [METRICS_ACK_NACKED] = 1,
                         [METRICS_ACK_REFUSED] = 2,
                         [METRICS_ACK_SUPERSEDED] = 3,
                         [METRICS_ACK_GAVE_UP] = 0},
                .ack_publishes = 8,
                .acknowledged_epoch = 7,
                .n_update_states = ELEMENTSOF(states),
                .update_state = 1,
                .applies_failed = 2,
                .warnings = {[METRICS_WARNING_CLUSTER_SIZE] = 1},
                .last_commit_usec = 1764770000123456,
                .last_good_poll_usec = 1764770001000000,
        };
        for (size_t i = 0; i < ELEMENTSOF(states); i++)
                s.update_states[i] = states[i];
        metrics_observe(&s.rounds, 0.02);
        metrics_observe(&s.rounds, 0.3);
        metrics_observe(&s.rounds, 42);
        return s;
}

static const char expected[] =
        "# HELP dsm_agent_sync_committed_epoch The committed epoch; 0 before the first commit.\n"
        "# TYPE dsm_agent_sync_committed_epoch gauge\n"
        "dsm_agent_sync_committed_epoch 7\n"
        "# HELP dsm_agent_sync_primary_info The committed Primary (no series before the first commit).\n"
        "# TYPE dsm_agent_sync_primary_info gauge\n"
        "dsm_agent_sync_primary_info{primary_id=\"p2\"} 1\n"
        "# HELP dsm_agent_sync_polls_total Poll answers by Provider node and outcome.\n"
        "# TYPE dsm_agent_sync_polls_total counter\n"
        "dsm_agent_sync_polls_total{node=\"p1\",outcome=\"ok\"} 10\n"
        "dsm_agent_sync_polls_total{node=\"p1\",outcome=\"not_modified\"} 20\n"
        "dsm_agent_sync_polls_total{node=\"p1\",outcome=\"error\"} 0\n"
        "dsm_agent_sync_polls_total{node=\"unknown\",outcome=\"ok\"} 0\n"
        "dsm_agent_sync_polls_total{node=\"unknown\",outcome=\"not_modified\"} 0\n"
        "dsm_agent_sync_polls_total{node=\"unknown\",outcome=\"error\"} 3\n"
        "# HELP dsm_agent_sync_round_duration_seconds Duration of complete poll rounds.\n"
        "# TYPE dsm_agent_sync_round_duration_seconds histogram\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"0.05\"} 1\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"0.1\"} 1\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"0.25\"} 1\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"0.5\"} 2\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"1\"} 2\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"2.5\"} 2\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"5\"} 2\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"10\"} 2\n"
        "dsm_agent_sync_round_duration_seconds_bucket{le=\"+Inf\"} 3\n"
        "dsm_agent_sync_round_duration_seconds_sum 42.320000\n"
        "dsm_agent_sync_round_duration_seconds_count 3\n"
        "# HELP dsm_agent_sync_commits_total Commits of a new (epoch, Primary) pair.\n"
        "# TYPE dsm_agent_sync_commits_total counter\n"
        "dsm_agent_sync_commits_total 3\n"
        "# HELP dsm_agent_sync_events_total Broker events received.\n"
        "# TYPE dsm_agent_sync_events_total counter\n"
        "dsm_agent_sync_events_total 5\n"
        "# HELP dsm_agent_sync_notifies_total Valid notifies accepted.\n"
        "# TYPE dsm_agent_sync_notifies_total counter\n"
        "dsm_agent_sync_notifies_total 2\n"
        "# HELP dsm_agent_sync_rejected_requests_total HTTP requests refused, by reason.\n"
        "# TYPE dsm_agent_sync_rejected_requests_total counter\n"
        "dsm_agent_sync_rejected_requests_total{reason=\"unauthorized\"} 4\n"
        "dsm_agent_sync_rejected_requests_total{reason=\"rate_limited\"} 1\n"
        "dsm_agent_sync_rejected_requests_total{reason=\"bad_request\"} 0\n"
        "dsm_agent_sync_rejected_requests_total{reason=\"too_large\"} 0\n"
        "dsm_agent_sync_rejected_requests_total{reason=\"not_found\"} 0\n"
        "dsm_agent_sync_rejected_requests_total{reason=\"method_not_allowed\"} 0\n"
        "# HELP dsm_agent_sync_broker_connected 1 while the broker connection is up.\n"
        "# TYPE dsm_agent_sync_broker_connected gauge\n"
        "dsm_agent_sync_broker_connected 1\n"
        "# HELP dsm_agent_sync_broker_reconnects_total Broker connections made after the first.\n"
        "# TYPE dsm_agent_sync_broker_reconnects_total counter\n"
        "dsm_agent_sync_broker_reconnects_total 1\n"
        "# HELP dsm_agent_sync_on_change_runs_total on_change runs by outcome.\n"
        "# TYPE dsm_agent_sync_on_change_runs_total counter\n"
        "dsm_agent_sync_on_change_runs_total{outcome=\"ok\"} 3\n"
        "dsm_agent_sync_on_change_runs_total{outcome=\"failed\"} 1\n"
        "# HELP dsm_agent_sync_acks_total Convergence acknowledgements (fleet.agent.synced) by outcome.\n"
        "# TYPE dsm_agent_sync_acks_total counter\n"
        "dsm_agent_sync_acks_total{outcome=\"confirmed\"} 4\n"
        "dsm_agent_sync_acks_total{outcome=\"nacked\"} 1\n"
        "dsm_agent_sync_acks_total{outcome=\"refused\"} 2\n"
        "dsm_agent_sync_acks_total{outcome=\"superseded\"} 3\n"
        "dsm_agent_sync_acks_total{outcome=\"gave_up\"} 0\n"
        "# HELP dsm_agent_sync_ack_publishes_total Publishes of acknowledgements (resends included).\n"
        "# TYPE dsm_agent_sync_ack_publishes_total counter\n"
        "dsm_agent_sync_ack_publishes_total 8\n"
        "# HELP dsm_agent_sync_acknowledged_epoch The epoch of the last confirmed acknowledgement; 0 none.\n"
        "# TYPE dsm_agent_sync_acknowledged_epoch gauge\n"
        "dsm_agent_sync_acknowledged_epoch 7\n"
        "# HELP dsm_agent_sync_update_state The update gate's state (contract 8): 1 for the current one.\n"
        "# TYPE dsm_agent_sync_update_state gauge\n"
        "dsm_agent_sync_update_state{state=\"disabled\"} 0\n"
        "dsm_agent_sync_update_state{state=\"none\"} 1\n"
        "dsm_agent_sync_update_state{state=\"installed\"} 0\n"
        "dsm_agent_sync_update_state{state=\"held\"} 0\n"
        "dsm_agent_sync_update_state{state=\"waiting\"} 0\n"
        "dsm_agent_sync_update_state{state=\"downloading\"} 0\n"
        "dsm_agent_sync_update_state{state=\"applying\"} 0\n"
        "dsm_agent_sync_update_state{state=\"failed\"} 0\n"
        "# HELP dsm_agent_sync_update_applies_total Update commands run, by outcome.\n"
        "# TYPE dsm_agent_sync_update_applies_total counter\n"
        "dsm_agent_sync_update_applies_total{outcome=\"ok\"} 0\n"
        "dsm_agent_sync_update_applies_total{outcome=\"failed\"} 2\n"
        "# HELP dsm_agent_sync_warnings Current warnings of the status document, by kind.\n"
        "# TYPE dsm_agent_sync_warnings gauge\n"
        "dsm_agent_sync_warnings{kind=\"stale_primary\"} 0\n"
        "dsm_agent_sync_warnings{kind=\"conflict\"} 0\n"
        "dsm_agent_sync_warnings{kind=\"cluster_size\"} 1\n"
        "dsm_agent_sync_warnings{kind=\"flapping\"} 0\n"
        "dsm_agent_sync_warnings{kind=\"settings_not_written\"} 0\n"
        "dsm_agent_sync_warnings{kind=\"state_not_written\"} 0\n"
        "dsm_agent_sync_warnings{kind=\"no_primary\"} 0\n"
        "# HELP dsm_agent_sync_last_commit_timestamp_seconds Unix time of the last commit; 0 never.\n"
        "# TYPE dsm_agent_sync_last_commit_timestamp_seconds gauge\n"
        "dsm_agent_sync_last_commit_timestamp_seconds 1764770000.123456\n"
        "# HELP dsm_agent_sync_last_good_poll_timestamp_seconds Unix time of the last round with a good "
        "answer; 0 never.\n"
        "# TYPE dsm_agent_sync_last_good_poll_timestamp_seconds gauge\n"
        "dsm_agent_sync_last_good_poll_timestamp_seconds 1764770001.000000\n";

static void test_exact_text(void **state) {
        MetricsNodePolls polls[4];
        size_t n = 0;
        MetricsSnapshot s;
        char *text;

        metrics_node_polls(polls, &n, ELEMENTSOF(polls), "p1")->n[METRICS_POLL_OK] = 10;
        metrics_node_polls(polls, &n, ELEMENTSOF(polls), "p1")->n[METRICS_POLL_NOT_MODIFIED] = 20;
        metrics_node_polls(polls, &n, ELEMENTSOF(polls), NULL)->n[METRICS_POLL_ERROR] = 3;
        s = sample(polls, n);
        text = metrics_render(&s);
        assert_non_null(text);
        assert_string_equal(text, expected);
        assert_int_equal(parse_exposition(text), 0);
        free(text);
}

static void test_empty_snapshot(void **state) {
        MetricsSnapshot s = {};
        char *text = metrics_render(&s);

        assert_non_null(text);
        assert_null(strstr(text, "primary_info{"));
        assert_non_null(strstr(text, "dsm_agent_sync_committed_epoch 0\n"));
        assert_non_null(strstr(text, "dsm_agent_sync_last_commit_timestamp_seconds 0.000000\n"));
        assert_int_equal(parse_exposition(text), 0);
        free(text);
}

static void test_label_escaping(void **state) {
        MetricsNodePolls polls[2];
        size_t n = 0;
        MetricsSnapshot s;
        char *text;

        metrics_node_polls(polls, &n, ELEMENTSOF(polls), "a\"b\\c\nd")->n[METRICS_POLL_OK] = 1;
        s = sample(polls, n);
        s.primary_id = "q\"\\";
        text = metrics_render(&s);
        assert_non_null(text);
        assert_non_null(strstr(text, "{node=\"a\\\"b\\\\c\\nd\",outcome=\"ok\"} 1\n"));
        assert_non_null(strstr(text, "primary_info{primary_id=\"q\\\"\\\\\"} 1\n"));
        assert_int_equal(parse_exposition(text), 0);
        free(text);
}

/* Label values stay bounded: past the table's size, new ids count as
 * "unknown", which always has its row. */
static void test_node_table_bounded(void **state) {
        MetricsNodePolls polls[3];
        size_t n = 0;
        char id[16];

        for (int i = 0; i < 10; i++) {
                snprintf(id, sizeof(id), "n%d", i);
                metrics_node_polls(polls, &n, ELEMENTSOF(polls), id)->n[METRICS_POLL_OK]++;
        }
        assert_int_equal(n, 3);
        assert_string_equal(polls[0].id, "n0");
        assert_string_equal(polls[1].id, "n1");
        assert_string_equal(polls[2].id, "unknown");
        assert_int_equal(polls[2].n[METRICS_POLL_OK], 8);
        assert_ptr_equal(metrics_node_polls(polls, &n, ELEMENTSOF(polls), "n1"), &polls[1]);
        assert_null(metrics_node_polls(polls, &n, 0, "x"));
}

static void test_reject_reasons(void **state) {
        assert_int_equal(metrics_reject_of_status(401), METRICS_REJECT_UNAUTHORIZED);
        assert_int_equal(metrics_reject_of_status(429), METRICS_REJECT_RATE_LIMITED);
        assert_int_equal(metrics_reject_of_status(400), METRICS_REJECT_BAD_REQUEST);
        assert_int_equal(metrics_reject_of_status(413), METRICS_REJECT_TOO_LARGE);
        assert_int_equal(metrics_reject_of_status(404), METRICS_REJECT_NOT_FOUND);
        assert_int_equal(metrics_reject_of_status(405), METRICS_REJECT_METHOD_NOT_ALLOWED);
        assert_int_equal(metrics_reject_of_status(200), -1);
        assert_int_equal(metrics_reject_of_status(503), -1);
}

/* The parser itself refuses what 0.0.4 forbids, so that its "0" means something. */
static void test_parser_strict(void **state) {
        static const char *const bad[] = {
                "x 1\n",                                              /* no TYPE */
                "# HELP x h\n# TYPE x gauge\nx 1",                    /* no final \n */
                "# HELP x h\n# TYPE x gauge\nx 1\nx 2\n",             /* duplicate series */
                "# HELP x h\n# TYPE x gauge\nx{a=\"1\",a=\"2\"} 1\n", /* a label twice */
                "# HELP x h\n# TYPE x gauge\nx{a=\"\\t\"} 1\n",       /* bad escape */
                "# HELP x h\n# TYPE x gauge\nx{1a=\"v\"} 1\n",        /* bad label name */
                "# HELP x h\n# TYPE x gauge\nx one\n",                /* bad value */
                "# HELP x h\n# TYPE x gauge\nx 1 \n",                 /* trailing blank */
                "# HELP x h\n# TYPE x counter\nx 1\n",                /* counter without _total */
                "# HELP x h\n# TYPE x gauge\n# TYPE x gauge\nx 1\n",  /* TYPE twice */
                "# HELP x h\n# TYPE x histogram\nx_bucket{le=\"1\"} 2\nx_sum 1\nx_count 2\n", /* no +Inf */
                "# HELP x h\n# TYPE x histogram\nx_bucket{le=\"1\"} 2\nx_bucket{le=\"+Inf\"} 1\n"
                "x_sum 1\nx_count 1\n", /* not cumulative */
                "# HELP x h\n# TYPE x histogram\nx_bucket{le=\"+Inf\"} 2\nx_sum 1\nx_count 3\n", /* count */
                "# HELP x h\n# TYPE x gauge\nx 1\n# HELP y h\n# TYPE y gauge\ny 1\nx{a=\"b\"} 1\n", /* split
                                                                                                     */
                "# HELP x h\n# TYPE x gauge\n\nx 1\n", /* empty line */
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                if (parse_exposition(bad[i]) == 0)
                        fail_msg("parser accepted bad case %zu", i);
        assert_int_equal(parse_exposition("# HELP x h\n# TYPE x gauge\nx{a=\"\\\"\"} -Inf\n"), 0);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_exact_text),     cmocka_unit_test(test_empty_snapshot),
                cmocka_unit_test(test_label_escaping), cmocka_unit_test(test_node_table_bounded),
                cmocka_unit_test(test_reject_reasons), cmocka_unit_test(test_parser_strict),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
