/* The convergence acknowledgement: one message per commit, confirmed.
 *
 * The lifecycle of the message in hand: converged -> (connection to its
 * broker up) published -> confirmed | nacked (sent again after a backoff,
 * ACK_SENDS_MAX in all) | refused (dropped) | the connection went down
 * before the confirm (sent again once it is up: the Provider may then see
 * it twice, and keeps one per agent and epoch; these publishes count
 * towards ACK_SENDS_MAX too) | a newer commit (replaced).
 * Nothing here waits on the broker; nothing here affects synchronization. */

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <systemd/sd-id128.h>

#include "ack.h"
#include "atomic_file.h"
#include "config.h"
#include "log.h"
#include "macro.h"
#include "util.h"
#include "version.h"

#define NACK_BACKOFF_MIN_USEC (1 * USEC_PER_SEC)
#define NACK_BACKOFF_MAX_USEC (30 * USEC_PER_SEC)

struct Ack {
        sd_event *event;
        Broker *broker;
        char agent_id[CONFIG_AGENT_ID_MAX + 1];
        char *record_path; /* the last confirmed epoch, kept across restarts; NULL: memory only */
        int record_error;  /* the last failure to write it, logged once */

        uint64_t taken_epoch; /* the last commit acknowledged (or tried): one ack per commit */

        /* The message in hand. */
        bool have;
        Committed commit;
        char *body;
        bool in_flight; /* published on the current connection, no confirm yet */
        uint64_t seq;
        unsigned sends;
        sd_event_source *retry_source;

        uint64_t outcomes[_ACK_OUTCOME_MAX];
        uint64_t publishes;
        uint64_t confirmed_epoch;
};

static const char *const outcome_names[_ACK_OUTCOME_MAX] = {
        [ACK_CONFIRMED] = "confirmed",   [ACK_NACKED] = "nacked",   [ACK_REFUSED] = "refused",
        [ACK_SUPERSEDED] = "superseded", [ACK_GAVE_UP] = "gave_up",
};

const char *ack_outcome_to_string(AckOutcome o) {
        return o >= 0 && o < _ACK_OUTCOME_MAX ? outcome_names[o] : "unknown";
}

/* ---- the body ---- */

static int format_rfc3339_ms(uint64_t usec, char *buf, size_t size) {
        time_t t = (time_t) (usec / USEC_PER_SEC);
        struct tm tm;
        char base[32];

        if (!gmtime_r(&t, &tm) || strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm) == 0)
                return -EINVAL;
        snprintf(buf, size, "%s.%03uZ", base, (unsigned) (usec % USEC_PER_SEC / USEC_PER_MSEC));
        return 0;
}

int ack_render(const char *agent_id, const Committed *c, uint64_t written_at, char **ret) {
        char when[48];
        json_t *o;
        char *s;

        if (format_rfc3339_ms(written_at, when, sizeof when) < 0)
                return -EINVAL;
        o = json_pack("{s:s, s:I, s:s, s:s, s:s}", "agent_id", agent_id, "epoch", (json_int_t) c->epoch,
                      "primary_id", c->primary.id, "settings_written_at", when, "daemon", DAEMON_VERSION);
        if (!o)
                return -EINVAL; /* a string that is not UTF-8 */
        s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
        json_decref(o);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

int ack_default_agent_id(char *buf, size_t size) {
        char host[256];
        sd_id128_t id;

        if (size < SD_ID128_STRING_MAX)
                return -ENOBUFS;
        if (sd_id128_get_machine(&id) >= 0) {
                sd_id128_to_string(id, buf);
                return 0;
        }
        if (gethostname(host, sizeof host) == 0 && config_agent_id_valid(host) && strlen(host) < size) {
                strcpy(buf, host);
                return 0;
        }
        return -ENXIO;
}

/* ---- the record of the last confirmed epoch ---- */

/* A restart must neither acknowledge a confirmed commit again nor forget
 * one that was never confirmed: the last confirmed epoch is kept in a
 * small file next to the state file. Losing a write costs at most one
 * more acknowledgement of the same commit after a restart. */
static void ack_record_save(Ack *a) {
        char buf[32];
        int n, r;

        if (!a->record_path)
                return;
        n = snprintf(buf, sizeof buf, "%" PRIu64 "\n", a->confirmed_epoch);
        r = atomic_file_write(a->record_path, buf, (size_t) n, 0644);
        if (r < 0 && r != a->record_error)
                log_warning_errno(r,
                                  "Cannot record the acknowledged epoch in %s; a restart may acknowledge "
                                  "epoch %" PRIu64 " again",
                                  a->record_path, a->confirmed_epoch);
        a->record_error = r < 0 ? r : 0;
}

static void ack_record_load(Ack *a) {
        _cleanup_(freep) char *text = NULL;
        unsigned long long e;
        int r;

        (void) atomic_file_sweep(a->record_path);
        r = read_file_full(a->record_path, 64, &text, NULL);
        if (r == -ENOENT)
                return;
        if (r < 0 || sscanf(text, "%llu", &e) != 1) {
                log_warning("Ignoring %s (unreadable or not an epoch): the current commit is acknowledged "
                            "again",
                            a->record_path);
                return;
        }
        a->confirmed_epoch = a->taken_epoch = (uint64_t) e;
}

/* ---- the message in hand ---- */

static void ack_count(Ack *a, AckOutcome o) {
        a->outcomes[o]++;
}

static void ack_drop(Ack *a) {
        a->retry_source = sd_event_source_disable_unref(a->retry_source);
        free(a->body);
        a->body = NULL;
        a->have = false;
        a->in_flight = false;
        a->sends = 0;
}

/* Publishes the message in hand if its broker is the one connected. Not
 * connected (or connected elsewhere): the next CONNECTED calls again. */
static void ack_try_send(Ack *a) {
        int r;

        if (!a->have || a->in_flight || a->retry_source)
                return;
        /* Each of those publishes cost the connection (lost before its
         * confirm): a publish that breaks the connection every time must
         * not bring it down for ever, each time after the shortest
         * reconnect backoff, with a fast poll of the Provider. */
        if (a->sends >= ACK_SENDS_MAX) {
                log_warning("Acknowledgement of epoch %" PRIu64 " given up: no confirm from broker %s:%u "
                            "after %u publishes (the connection was lost each time)",
                            a->commit.epoch, a->commit.broker.host, a->commit.broker.port, a->sends);
                ack_count(a, ACK_GAVE_UP);
                ack_drop(a);
                return;
        }
        r = broker_publish(a->broker, &a->commit.broker, ACK_ROUTING_KEY, a->body, strlen(a->body), &a->seq);
        if (r == -EPERM) {
                log_warning("Acknowledgement of epoch %" PRIu64 " not sent: broker %s:%u refused publishing "
                            "on this connection",
                            a->commit.epoch, a->commit.broker.host, a->commit.broker.port);
                ack_count(a, ACK_REFUSED);
                ack_drop(a);
                return;
        }
        if (r < 0) {
                log_debug("Acknowledgement of epoch %" PRIu64 " waits for broker %s:%u: %s", a->commit.epoch,
                          a->commit.broker.host, a->commit.broker.port, strerror(-r));
                return;
        }
        a->in_flight = true;
        a->sends++;
        a->publishes++;
        log_debug("Acknowledgement of epoch %" PRIu64 " published (%u of %d)", a->commit.epoch, a->sends,
                  ACK_SENDS_MAX);
}

static int on_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        Ack *a = userdata;

        a->retry_source = sd_event_source_disable_unref(a->retry_source);
        ack_try_send(a);
        return 0;
}

void ack_converged(Ack *a, const Committed *c, uint64_t written_at) {
        char *body = NULL;
        int r;

        if (!a)
                return;
        if (c->epoch <= a->taken_epoch)
                return; /* the same commit again (the file rewritten after a local edit): one ack */
        r = ack_render(a->agent_id, c, written_at, &body);
        if (r < 0) {
                log_error_errno(r, "Cannot render the acknowledgement of epoch %" PRIu64, c->epoch);
                return;
        }
        if (a->have) {
                log_debug("Acknowledgement of epoch %" PRIu64 " superseded by epoch %" PRIu64,
                          a->commit.epoch, c->epoch);
                ack_count(a, ACK_SUPERSEDED);
                ack_drop(a);
        }
        a->taken_epoch = c->epoch;
        a->have = true;
        a->commit = *c;
        a->body = body;
        ack_try_send(a);
}

void ack_broker_state(Ack *a, BrokerConnState state) {
        if (!a || !a->have)
                return;
        if (state != BROKER_CONNECTED) {
                a->in_flight = false; /* unconfirmed: send again on the next connection */
                return;
        }
        ack_try_send(a);
}

void ack_confirmed(Ack *a, uint64_t seq, bool multiple, bool ok) {
        usec_t delay;

        if (!a || !a->have || !a->in_flight || !(seq == a->seq || (multiple && a->seq <= seq)))
                return;
        a->in_flight = false;
        if (ok) {
                log_info("Acknowledged epoch %" PRIu64 " (primary %s) to the Provider on broker %s:%u",
                         a->commit.epoch, a->commit.primary.id, a->commit.broker.host,
                         a->commit.broker.port);
                ack_count(a, ACK_CONFIRMED);
                a->confirmed_epoch = a->commit.epoch;
                ack_record_save(a);
                ack_drop(a);
                return;
        }
        ack_count(a, ACK_NACKED);
        if (a->sends >= ACK_SENDS_MAX) {
                log_warning("Acknowledgement of epoch %" PRIu64 " given up: broker %s:%u nacked it %u times",
                            a->commit.epoch, a->commit.broker.host, a->commit.broker.port, a->sends);
                ack_count(a, ACK_GAVE_UP);
                ack_drop(a);
                return;
        }
        delay = backoff_full_jitter(NACK_BACKOFF_MIN_USEC, NACK_BACKOFF_MAX_USEC, a->sends);
        log_info("Broker %s:%u nacked the acknowledgement of epoch %" PRIu64 "; sending it again in %" PRIu64
                 " ms",
                 a->commit.broker.host, a->commit.broker.port, a->commit.epoch, delay / USEC_PER_MSEC);
        if (sd_event_add_time_relative(a->event, &a->retry_source, CLOCK_MONOTONIC, delay,
                                       10 * USEC_PER_MSEC, on_retry, a) < 0)
                a->retry_source = NULL; /* the next connection sends it */
}

void ack_refused(Ack *a, const char *reason) {
        if (!a)
                return;
        if (!a->have || !a->in_flight) {
                log_debug("broker: publishing channel closed (%s)", reason);
                return;
        }
        log_warning("Broker %s:%u refused the acknowledgement of epoch %" PRIu64
                    " (%s): the Agent's broker user needs write permission on the events exchange",
                    a->commit.broker.host, a->commit.broker.port, a->commit.epoch, reason);
        ack_count(a, ACK_REFUSED);
        ack_drop(a);
}

/* ---- lifetime and counters ---- */

int ack_new(sd_event *e, Broker *broker, const char *agent_id, const char *record_path, Ack **ret) {
        Ack *a;

        if (!config_agent_id_valid(agent_id))
                return -EINVAL;
        a = calloc(1, sizeof *a);
        if (!a)
                return -ENOMEM;
        if (record_path && !(a->record_path = strdup(record_path))) {
                free(a);
                return -ENOMEM;
        }
        a->event = sd_event_ref(e);
        a->broker = broker;
        strscpy(a->agent_id, sizeof a->agent_id, agent_id);
        if (a->record_path)
                ack_record_load(a);
        *ret = a;
        return 0;
}

Ack *ack_free(Ack *a) {
        if (!a)
                return NULL;
        ack_drop(a);
        sd_event_unref(a->event);
        free(a->record_path);
        free(a);
        return NULL;
}

uint64_t ack_outcomes(const Ack *a, AckOutcome o) {
        return a && o >= 0 && o < _ACK_OUTCOME_MAX ? a->outcomes[o] : 0;
}

uint64_t ack_publishes(const Ack *a) {
        return a ? a->publishes : 0;
}

uint64_t ack_confirmed_epoch(const Ack *a) {
        return a ? a->confirmed_epoch : 0;
}

_Static_assert((int) _ACK_OUTCOME_MAX == 5, "AckOutcome and MetricsAck (metrics.h) list the same outcomes");
