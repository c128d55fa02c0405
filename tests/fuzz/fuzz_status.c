/* libFuzzer target for the status document of contract section 7
 * (manager_status_json): a Manager built from the input, the document
 * serialized (json_dumps) and parsed back (json_loads), then its shape
 * checked field by field (every key present with its type) and every string
 * compared with what the Manager held. The poller, broker and updater are
 * stubs (as in tests/unit/test_status.c).
 *
 * Input: a 48-byte header (flags, gate state, counters, clocks), then
 * chunks separated by "\n#~#\n":
 *   0  the committed Primary's answer (provider_state_parse; accepted: the
 *      committed pair, broker and cluster list; rejected: nothing committed)
 *   1  gate reason      2  installed version     3  failed_version
 *   4  updater error    5  warnings, one a line (at most 16)
 *   6+ poll targets: byte 0 flags, then the URL up to '\n', then the
 *      node's answer (provider_state_parse; rejected: the target's error
 *      is "invalid state document: ..." as in agent/poller.c).
 *
 * Strings the daemon takes unvalidated from files and configuration
 * (installed version, warnings naming paths, configured URLs, errors) are
 * made valid UTF-8 here, truncated on a character boundary, unless built
 * with -DFUZZ_RAW_STRINGS=1: then they are raw bytes, which makes jansson
 * refuse them and the document lose a whole key (see the h18 report). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "manager.h"
#include "version.h"

#ifndef FUZZ_RAW_STRINGS
#define FUZZ_RAW_STRINGS 0
#endif

#define HEADER_LEN  48
#define SEP         "\n#~#\n"
#define MAX_TARGETS 10
#define YEAR_9999   UINT64_C(253402300799) /* last second strftime prints in 20 bytes */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* ---- stubs of the live pieces ---- */

static PollAnswer targets[MAX_TARGETS];
static size_t n_targets;
static BrokerConnState broker_now;
static UpdaterPhase phase_now;
static char updater_error[256];
static bool updater_error_null;

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
        return phase_now;
}
const char *updater_last_error(const Updater *u) {
        return updater_error_null ? NULL : updater_error;
}

/* ---- input ---- */

static uint64_t get_u64(const uint8_t *p) {
        uint64_t v = 0;

        for (int i = 0; i < 8; i++)
                v = (v << 8) | p[i];
        return v;
}

/* Length of the longest prefix of s[0..n) that is valid UTF-8 as jansson
 * wants it (no overlongs, surrogates or code points above U+10FFFF). */
static size_t utf8_prefix(const unsigned char *s, size_t n) {
        size_t i = 0;

        while (i < n) {
                unsigned c = s[i], len, cp;

                if (c < 0x80) {
                        i++;
                        continue;
                }
                len = c >= 0xC2 && c <= 0xDF   ? 2
                      : c >= 0xE0 && c <= 0xEF ? 3
                      : c >= 0xF0 && c <= 0xF4 ? 4
                                               : 0;
                if (len == 0 || i + len > n)
                        return i;
                cp = c & (0x7F >> len);
                for (unsigned k = 1; k < len; k++) {
                        if ((s[i + k] & 0xC0) != 0x80)
                                return i;
                        cp = (cp << 6) | (s[i + k] & 0x3F);
                }
                if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
                    (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
                        return i;
                i += len;
        }
        return i;
}

/* Copies src[0..n) into dst the way the daemon would hold it: cut at the
 * first NUL and to size - 1 bytes; unless FUZZ_RAW_STRINGS, invalid UTF-8
 * becomes '?' and the cut falls on a character boundary. */
static void put_string(char *dst, size_t size, const uint8_t *src, size_t n) {
        size_t o = 0, i = 0;
        const uint8_t *nul = memchr(src, 0, n);

        if (nul)
                n = (size_t) (nul - src);
        while (i < n && o < size - 1) {
                size_t ok = FUZZ_RAW_STRINGS ? n - i : utf8_prefix(src + i, n - i);

                if (ok > size - 1 - o) {
                        ok = size - 1 - o;
                        if (!FUZZ_RAW_STRINGS)
                                while (ok > 0 && (src[i + ok] & 0xC0) == 0x80)
                                        ok--; /* do not split a character */
                        if (ok == 0)
                                break;
                }
                memcpy(dst + o, src + i, ok);
                o += ok;
                i += ok;
                if (ok == 0) {
                        dst[o++] = '?';
                        i++;
                }
        }
        dst[o] = 0;
}

typedef struct Chunk {
        const uint8_t *p;
        size_t n;
} Chunk;

static size_t split(const uint8_t *p, size_t n, Chunk *ret, size_t max) {
        size_t k = 0, sl = strlen(SEP);

        while (k < max) {
                const uint8_t *s = memmem(p, n, SEP, sl);
                size_t len = s ? (size_t) (s - p) : n;

                ret[k++] = (Chunk){p, len};
                if (!s)
                        break;
                p += len + sl;
                n -= len + sl;
        }
        return k;
}

/* ---- checks on the document read back ---- */

#define CHECK(x)                                                                                            \
        do {                                                                                                \
                if (!(x)) {                                                                                 \
                        fprintf(stderr, "fuzz_status: check failed: %s (line %d)\n", #x, __LINE__);         \
                        abort();                                                                            \
                }                                                                                           \
        } while (0)

static void check_string(json_t *v, const char *want) {
        CHECK(json_is_string(v));
        CHECK(strcmp(json_string_value(v), want) == 0);
}

/* A string equal to want, or null when want is NULL or "". */
static void check_string_or_null(json_t *v, const char *want) {
        if (!want || !want[0])
                CHECK(json_is_null(v));
        else
                check_string(v, want);
}

static void check_time(json_t *v, uint64_t usec) {
        const char *s;

        if (usec == 0) {
                CHECK(json_is_null(v));
                return;
        }
        CHECK(json_is_string(v));
        s = json_string_value(v);
        CHECK(strlen(s) == 20 && s[4] == '-' && s[7] == '-' && s[10] == 'T' && s[13] == ':' &&
              s[16] == ':' && s[19] == 'Z');
}

static void check_integer(json_t *v, uint64_t want) {
        CHECK(json_is_integer(v));
        CHECK(json_integer_value(v) >= 0 && (uint64_t) json_integer_value(v) == want);
}

static const char *expected_target_id(const Manager *m, const PollAnswer *t) {
        if (t->have_state)
                return t->state.node.id;
        for (size_t i = 0; i < m->sync.state.n_nodes; i++)
                if (strcmp(m->sync.state.nodes[i].api_url, t->url) == 0)
                        return m->sync.state.nodes[i].id;
        return NULL;
}

static const char *expected_offer(const Manager *m) {
        /* The status shows the sync core's offer, never one of its own. */
        return m->sync.have_offer ? m->sync.offer.version : NULL;
}

static void check_update(const Manager *m, json_t *u) {
        const char *state = gate_state_to_string(m->sync.gate.state), *reason = m->sync.gate.reason;
        const char *offer = expected_offer(m);

        if (m->updater) {
                if (phase_now == UPDATER_DOWNLOADING || phase_now == UPDATER_APPLYING) {
                        state = phase_now == UPDATER_DOWNLOADING ? "downloading" : "applying";
                        reason = NULL;
                } else if (phase_now == UPDATER_FAILED) {
                        state = "failed";
                        reason = updater_last_error(m->updater);
                } else if (phase_now == UPDATER_READY) {
                        /* the gate's verdict as it is */
                } else if (m->sync.gate.state == GATE_OPEN && m->sync.state.update.failures > 0 &&
                           streq_ptr(m->sync.state.update.failed_version, offer)) {
                        state = "failed";
                        reason = "retry_pending";
                } else if (m->sync.gate.state == GATE_OPEN) {
                        state = "waiting";
                        reason = "starting";
                }
        }
        CHECK(json_is_object(u));
        check_string(json_object_get(u, "state"), state ? state : "none");
        check_string_or_null(json_object_get(u, "reason"), reason);
        check_string_or_null(json_object_get(u, "target"), offer);
        check_string_or_null(json_object_get(u, "installed"), m->sync.installed_version);
}

static void check_document(const Manager *m, json_t *d) {
        const Committed *c = &m->sync.state.committed;
        json_t *v, *a;
        size_t k = 0;

        CHECK(json_is_object(d));
        check_string(json_object_get(d, "daemon_version"), DAEMON_VERSION);
        check_integer(json_object_get(d, "epoch"), c->epoch);

        v = json_object_get(d, "primary");
        if (c->epoch == 0)
                CHECK(json_is_null(v));
        else {
                json_t *b = json_object_get(v, "broker");

                CHECK(json_is_object(v));
                check_string(json_object_get(v, "id"), c->primary.id);
                check_string(json_object_get(v, "api_url"), c->primary.api_url);
                CHECK(json_is_object(b));
                check_string(json_object_get(b, "host"), c->broker.host);
                check_integer(json_object_get(b, "port"), c->broker.port);
                check_string(json_object_get(b, "vhost"), c->broker.vhost);
                CHECK(json_is_boolean(json_object_get(b, "tls")));
                CHECK(json_is_true(json_object_get(b, "tls")) == c->broker.tls);
        }

        check_string(json_object_get(d, "broker_connection"),
                     m->broker ? broker_conn_state_to_string(broker_now) : "down");
        check_time(json_object_get(d, "last_poll"), m->last_poll_usec);
        check_time(json_object_get(d, "last_change"), m->sync.last_change_usec);

        a = json_object_get(d, "nodes");
        CHECK(json_is_array(a));
        for (size_t i = 0; m->poller && i < n_targets; i++) {
                const PollAnswer *t = &targets[i];
                const ProviderState *st = t->have_state ? &t->state : NULL;
                json_t *n;

                if (t->via_load_balancer)
                        continue;
                n = json_array_get(a, k++);
                CHECK(json_is_object(n));
                check_string_or_null(json_object_get(n, "id"), expected_target_id(m, t));
                check_string(json_object_get(n, "api_url"), t->url);
                check_string_or_null(json_object_get(n, "role"), !st ? NULL
                                                                 : st->role == NODE_ROLE_PRIMARY
                                                                         ? "primary"
                                                                         : "standby");
                check_string_or_null(json_object_get(n, "version"), st ? st->version : NULL);
                if (st)
                        check_integer(json_object_get(n, "epoch"), st->epoch);
                else
                        CHECK(json_is_null(json_object_get(n, "epoch")));
                check_time(json_object_get(n, "last_seen"), t->last_seen_usec);
                check_string_or_null(json_object_get(n, "error"), t->error);
        }
        CHECK(json_array_size(a) == k);

        a = json_object_get(d, "warnings");
        CHECK(json_is_array(a));
        CHECK(json_array_size(a) == m->n_warnings);
        for (size_t i = 0; i < m->n_warnings; i++)
                check_string(json_array_get(a, i), m->warnings[i]);

        check_update(m, json_object_get(d, "update"));

        v = json_object_get(d, "counters");
        CHECK(json_is_object(v));
        check_integer(json_object_get(v, "polls"), m->counters.polls);
        check_integer(json_object_get(v, "events"), m->counters.events);
        check_integer(json_object_get(v, "notifies"), m->counters.notifies);
        check_integer(json_object_get(v, "changes"), m->sync.changes);
}

/* ---- the Manager from the input ---- */

static uint64_t clock_usec(const uint8_t *p) {
        uint64_t v = get_u64(p);

        /* 0 ("never") stays reachable; otherwise up to the end of year 9999. */
        return v % ((YEAR_9999 + 1) * USEC_PER_SEC);
}

static void build_target(PollAnswer *t, const Chunk *ch, const uint8_t *clock) {
        static char err[POLL_ERROR_MAX];
        const uint8_t *p = ch->p, *nl;
        size_t n = ch->n;
        uint8_t flags;

        memset(t, 0, sizeof(*t));
        if (n == 0)
                return;
        flags = p[0];
        p++;
        n--;
        nl = memchr(p, '\n', n);
        put_string(t->url, sizeof(t->url), p, nl ? (size_t) (nl - p) : n);
        if (nl) {
                n -= (size_t) (nl - p) + 1;
                p = nl + 1;
        } else
                n = 0;
        t->via_load_balancer = flags & 1;
        t->configured = flags & 2;
        if (flags & 4) {
                /* A transport error: the text comes from libcurl or strerror. */
                t->outcome = POLL_ERROR;
                put_string(t->error, sizeof(t->error), p, n);
                return;
        }
        if (provider_state_parse((const char *) p, n, &t->state, err, sizeof(err)) == 0) {
                t->have_state = t->ok = true;
                t->outcome = POLL_OK;
                t->last_seen_usec = clock_usec(clock);
        } else {
                t->outcome = POLL_ERROR;
                snprintf(t->error, sizeof(t->error), "invalid state document: %s", err);
                if (flags & 8) { /* a 304 keeps the last good answer */
                        memset(&t->state, 0, sizeof(t->state));
                        t->have_state = false;
                }
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static Manager m;
        static ProviderState primary;
        Chunk ch[6 + MAX_TARGETS];
        char err[256], *text;
        size_t n;
        json_t *doc, *back;

        if (size < HEADER_LEN)
                return 0;
        memset(&m, 0, sizeof(m));
        n_targets = 0;
        m.poller = (data[0] & 1) ? (Poller *) 1 : NULL;
        m.broker = (data[0] & 2) ? (Broker *) 1 : NULL;
        m.updater = (data[0] & 4) ? (Updater *) 1 : NULL;
        updater_error_null = data[0] & 8;
        broker_now = (BrokerConnState) (data[1] % 3);
        phase_now = (UpdaterPhase) (data[2] % 5);
        m.sync.gate.state = (GateState) (data[3] % 6);
        m.sync.state.update.failures = data[4];
        m.last_poll_usec = clock_usec(data + 8);
        m.sync.last_change_usec = clock_usec(data + 16);
        /* Counters count real events: they never reach 2^62. */
        m.counters.polls = get_u64(data + 24) >> 2;
        m.counters.events = (uint64_t) data[5] << 40 | data[6];
        m.counters.notifies = get_u64(data + 32) >> 2;
        m.sync.changes = get_u64(data + 40) >> 2;

        n = split(data + HEADER_LEN, size - HEADER_LEN, ch, sizeof(ch) / sizeof(ch[0]));
        for (size_t i = n; i < sizeof(ch) / sizeof(ch[0]); i++)
                ch[i] = (Chunk){(const uint8_t *) "", 0};

        if (provider_state_parse((const char *) ch[0].p, ch[0].n, &primary, err, sizeof(err)) == 0) {
                m.sync.state.committed.epoch = primary.epoch;
                m.sync.state.committed.primary = primary.primary;
                m.sync.state.committed.broker = primary.broker;
                m.sync.state.n_nodes = primary.n_nodes;
                memcpy(m.sync.state.nodes, primary.nodes, sizeof(primary.nodes));
                /* The round's offer, as the sync core keeps it. */
                m.sync.have_offer = primary.update.present && (data[0] & 16);
                m.sync.offer = primary.update;
        }
        /* The gate builds its reasons from validated ids and versions. */
        put_string(m.sync.gate.reason, sizeof(m.sync.gate.reason), ch[1].p, ch[1].n);
        put_string(m.sync.installed_version, sizeof(m.sync.installed_version), ch[2].p, ch[2].n);
        put_string(m.sync.state.update.failed_version, sizeof(m.sync.state.update.failed_version), ch[3].p,
                   ch[3].n);
        put_string(updater_error, sizeof(updater_error), ch[4].p, ch[4].n);
        for (const uint8_t *p = ch[5].p, *end = ch[5].p + ch[5].n;
             p < end && m.n_warnings < MANAGER_MAX_WARNINGS;) {
                const uint8_t *nl = memchr(p, '\n', (size_t) (end - p));
                size_t len = nl ? (size_t) (nl - p) : (size_t) (end - p);

                put_string(m.warnings[m.n_warnings++], MANAGER_WARNING_MAX, p, len);
                p += len + 1;
        }
        for (size_t i = 6; i < n; i++)
                build_target(&targets[n_targets++], &ch[i], data + 8 + (i % 4) * 8);

        doc = manager_status_json(&m);
        CHECK(doc);
        check_document(&m, doc);
        text = json_dumps(doc, JSON_INDENT(2) | JSON_SORT_KEYS);
        CHECK(text);
        back = json_loads(text, JSON_REJECT_DUPLICATES, NULL);
        CHECK(back);
        CHECK(json_equal(doc, back));
        check_document(&m, back);
        free(text);
        json_decref(back);
        json_decref(doc);
        return 0;
}
