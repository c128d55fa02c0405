/* The AMQP connection to the committed Primary's broker: the loop side.
 *
 * This file owns the connection state machine (down, connecting,
 * connected), everything done with a ready connection on the sd-event loop
 * (its socket is an I/O source, frames are read with a zero timeout,
 * heartbeats are sent and checked on timers, deliveries are acknowledged
 * and handed out as events), the loss of the connection, the reconnect
 * backoff (full jitter) and the spread of the first attempt after a move.
 *
 * It does not own the connection setup: rabbitmq-c's setup (TCP connect,
 * TLS handshake, login, channel, declare, bind, consume) is a chain of
 * blocking RPCs, and a blocking call must never stall synchronization, so
 * each attempt runs on a short-lived worker thread (broker-connect.c) that
 * hands the ready connection back through an eventfd. From then on the
 * loop owns it, and the only blocking calls left are small sends (acks,
 * heartbeats, close), each made only when poll() says the socket can take
 * it. Whether a delivered body is a valid event is provider_event_check()
 * (common/provider.c), a pure function. */

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>

#include <amqp.h>

#include "broker-connect.h"
#include "broker-internal.h"
#include "broker.h"
#include "log.h"
#include "macro.h"
#include "util.h"

/* Every failed attempt and every loss waits a random time in [0, 250 ms x
 * 2^(n-1)], capped at 30 s ("full jitter"): a fleet that failed together
 * (a broker refusing, timing out or answering 541 under a storm) retries
 * spread over the whole window instead of in waves that fail again. */
#define BACKOFF_MIN_USEC (250 * USEC_PER_MSEC)
#define BACKOFF_MAX_USEC (30 * USEC_PER_SEC)
/* A promote moves every Agent to one broker in the same second. Started
 * together, a thousand setups overflow the broker's accept backlog (SYNs
 * dropped and resent after 1 s, 3 s) and its setup work (541 on
 * queue.declare), and each failure then costs a backoff. So the first
 * attempt after a move waits a random time of up to 1 s: the burst becomes
 * a rate the broker can take in turn. Why 1 s and not more: the spread adds
 * up to its whole length to the time an Agent is consuming on the new
 * broker; 1000 Agents measured without it on a 2-core machine were
 * consuming at p50 5.5 s, p99 7 s (issue 14), so 1 s keeps p99 under the
 * 10 s goal with room left for the retries it does not prevent. Not for the
 * first connection at start nor a reconnect to the same broker (no fleet
 * moves together there; a loss is paced by the backoff). */
#define MOVE_SPREAD_MAX_USEC     (1 * USEC_PER_SEC)
#define WORKER_WAIT_ON_FREE_USEC (2 * USEC_PER_SEC)
#define DRAIN_BATCH              256
#define EVENT_BODY_MAX           (64 * 1024)

/* ---- settings ---- */

static int params_from_config(BrokerParams *dst, const Config *cfg, const BrokerInfo *target) {
        BrokerParams tmp = {
                .username = cfg->broker_username ? cfg->broker_username : (char *) "guest",
                .password = cfg->broker_password ? cfg->broker_password : (char *) "guest",
                .exchange = cfg->exchange ? cfg->exchange : (char *) "dsm.provider.events",
                .ca_file = cfg->broker_ca_file,
                .heartbeat = cfg->heartbeat,
        };

        if (target)
                tmp.target = *target;
        return broker_params_copy(dst, &tmp);
}

/* True when a reconnect is needed to apply b over a. */
static bool params_settings_differ(const BrokerParams *a, const BrokerParams *b) {
        return !streq_ptr(a->username, b->username) || !streq_ptr(a->password, b->password) ||
               !streq_ptr(a->exchange, b->exchange) || !streq_ptr(a->ca_file, b->ca_file) ||
               a->heartbeat != b->heartbeat;
}

/* ---- state, sends, teardown ---- */

static void broker_set_state(Broker *b, BrokerConnState s, const char *reason) {
        if (b->state == s)
                return;
        b->state = s;
        if (b->cb.state_changed)
                b->cb.state_changed(b, s, reason, b->userdata);
}

static void delivery_reset(Delivery *d) {
        free(d->body);
        *d = (Delivery){};
}

/* rabbitmq-c sends without a deadline: a send into a full socket buffer
 * would block the loop until the peer reads. Ask first; a broker that left
 * a whole buffer unread is not reading at all. */
bool broker_can_send(Broker *b) {
        struct pollfd p = {.fd = amqp_get_sockfd(b->conn), .events = POLLOUT};

        return poll(&p, 1, 0) == 1 && (p.revents & POLLOUT) && !(p.revents & (POLLERR | POLLHUP));
}

/* Forgets the attempt in flight; its worker finishes on its own. */
static void broker_abandon_attempt(Broker *b) {
        if (!b->attempt)
                return;
        b->attempt_source = sd_event_source_disable_unref(b->attempt_source);
        b->attempt = broker_attempt_abandon(b->attempt);
}

/* Drops the connection. graceful: tell the broker (connection.close)
 * without waiting for its close-ok; used only when the peer is known to be
 * responsive or the close is deliberate. */
static void broker_close_conn(Broker *b, bool graceful) {
        b->io_source = sd_event_source_disable_unref(b->io_source);
        b->drain_source = sd_event_source_disable_unref(b->drain_source);
        b->hb_send_source = sd_event_source_disable_unref(b->hb_send_source);
        b->hb_check_source = sd_event_source_disable_unref(b->hb_check_source);
        delivery_reset(&b->delivery);
        b->publish_open = false;
        b->publish_seq = 0;
        if (!b->conn)
                return;
        if (graceful && broker_can_send(b)) {
                amqp_connection_close_t m = {.reply_code = AMQP_REPLY_SUCCESS,
                                             .reply_text = amqp_cstring_bytes("bye")};
                (void) amqp_send_method(b->conn, 0, AMQP_CONNECTION_CLOSE_METHOD, &m);
        }
        amqp_destroy_connection(b->conn);
        b->conn = NULL;
        b->conn_gen++;
}

static void broker_drop_all(Broker *b, bool graceful) {
        broker_abandon_attempt(b);
        b->retry_source = sd_event_source_disable_unref(b->retry_source);
        broker_close_conn(b, graceful);
}

/* ---- loss and reconnect backoff ---- */

static int broker_start_attempt(Broker *b);

static int on_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;

        b->retry_source = sd_event_source_disable_unref(b->retry_source);
        (void) broker_start_attempt(b);
        return 0;
}

static int broker_arm_retry(Broker *b, usec_t delay) {
        b->retry_source = sd_event_source_disable_unref(b->retry_source);
        return sd_event_add_time_relative(b->event, &b->retry_source, CLOCK_MONOTONIC, delay,
                                          10 * USEC_PER_MSEC, on_retry, b);
}

static void broker_schedule_retry(Broker *b) {
        usec_t delay;
        int r;

        if (b->failures < UINT_MAX)
                b->failures++;
        delay = backoff_full_jitter(BACKOFF_MIN_USEC, BACKOFF_MAX_USEC, b->failures);
        r = broker_arm_retry(b, delay);
        if (r < 0) {
                log_error_errno(r, "broker: cannot schedule a reconnect");
                return;
        }
        log_debug("broker: reconnecting to %s:%u in %" PRIu64 " ms", b->params.target.host,
                  b->params.target.port, delay / USEC_PER_MSEC);
}

/* An attempt failed: warn once per outage, report down, back off. */
static void broker_attempt_failed(Broker *b, const char *reason) {
        const BrokerInfo *t = &b->params.target;

        /* A refused login is the Agent's configuration, not the network. */
        if (!b->loss_logged && strstr(reason, "ACCESS_REFUSED"))
                log_struct(LOG_WARNING, 0, MID_BROKER_LOST, &(LogFields){.reason = reason},
                           "broker %s:%u refused the login (%s): check [broker] username and password_file",
                           t->host, t->port, reason);
        else if (!b->loss_logged)
                log_struct(LOG_WARNING, 0, MID_BROKER_LOST, &(LogFields){.reason = reason},
                           "broker %s:%u unreachable: %s", t->host, t->port, reason);
        else
                log_debug("broker %s:%u still unreachable: %s", t->host, t->port, reason);
        b->loss_logged = true;
        broker_schedule_retry(b);
        broker_set_state(b, BROKER_DOWN, reason);
}

/* The established connection failed. */
void broker_lost(Broker *b, const char *reason, bool graceful) {
        const BrokerInfo *t = &b->params.target;

        broker_close_conn(b, graceful);
        log_struct(LOG_WARNING, 0, MID_BROKER_LOST, &(LogFields){.reason = reason},
                   "broker connection to %s:%u lost: %s", t->host, t->port, reason);
        b->loss_logged = true;
        broker_schedule_retry(b);
        broker_set_state(b, BROKER_DOWN, reason);
}

void broker_lost_status(Broker *b, const char *what, int status) {
        char reason[BROKER_REASON_MAX];

        snprintf(reason, sizeof reason, "%s: %s", what, amqp_error_string2(status));
        broker_lost(b, status == AMQP_STATUS_HEARTBEAT_TIMEOUT ? "heartbeat timeout" : reason, false);
}

/* ---- events ---- */

/* Every event is only a hint to poll: report the known, well-formed ones,
 * drop the rest with a debug line. */
static void broker_dispatch(Broker *b, const Delivery *d) {
        const char *why;

        if (!d->body) {
                log_debug("broker: ignoring event %s: body over %d bytes", d->routing_key, EVENT_BODY_MAX);
                return;
        }
        why = provider_event_check(d->routing_key, d->body, d->size);
        if (why) {
                log_debug("broker: ignoring event %s: %s", d->routing_key, why);
                return;
        }
        log_debug("broker: event %s (%" PRIu64 " bytes)", d->routing_key, d->size);
        if (b->cb.event)
                b->cb.event(b, d->routing_key, d->body, d->size, b->userdata);
}

/* The whole message is in: acknowledge it first (the callback may move
 * the connection), then hand it over. */
static int broker_delivery_complete(Broker *b) {
        Delivery d = b->delivery;
        int r;

        b->delivery = (Delivery){};
        if (!broker_can_send(b)) {
                delivery_reset(&d);
                broker_lost(b, "broker not reading (send buffer full)", false);
                return -EIO;
        }
        r = amqp_basic_ack(b->conn, BROKER_CHANNEL, d.tag, 0);
        if (r != AMQP_STATUS_OK) {
                delivery_reset(&d);
                broker_lost_status(b, "basic.ack", r);
                return -EIO;
        }
        broker_dispatch(b, &d);
        delivery_reset(&d);
        return 0;
}

static int broker_on_deliver(Broker *b, const amqp_basic_deliver_t *m) {
        Delivery *d = &b->delivery;
        size_t n =
                m->routing_key.len < sizeof d->routing_key ? m->routing_key.len : sizeof d->routing_key - 1;

        delivery_reset(d);
        d->active = true;
        d->tag = m->delivery_tag;
        memcpy(d->routing_key, m->routing_key.bytes, n);
        d->routing_key[n] = 0;
        if (strlen(d->routing_key) != n)
                d->routing_key[0] = 0; /* embedded NUL: never matches a known key */
        return 0;
}

static int broker_on_header(Broker *b, const amqp_frame_t *f) {
        Delivery *d = &b->delivery;

        if (!d->active || d->have_header)
                return 0;
        d->have_header = true;
        d->size = f->payload.properties.body_size;
        if (d->size <= EVENT_BODY_MAX) {
                d->body = malloc(d->size + 1);
                if (!d->body)
                        return log_error_errno(-ENOMEM, "broker: cannot buffer an event");
        }
        return d->size == 0 ? broker_delivery_complete(b) : 0;
}

static int broker_on_body(Broker *b, const amqp_frame_t *f) {
        Delivery *d = &b->delivery;
        size_t len = f->payload.body_fragment.len;

        if (!d->active || !d->have_header)
                return 0;
        if (len > d->size - d->got) {
                broker_lost(b, "protocol error: body longer than announced", false);
                return -EPROTO;
        }
        if (d->body)
                memcpy(d->body + d->got, f->payload.body_fragment.bytes, len);
        d->got += len;
        return d->got == d->size ? broker_delivery_complete(b) : 0;
}

static void broker_on_server_close(Broker *b, const amqp_frame_t *f) {
        char reason[BROKER_REASON_MAX];
        int r;

        if (f->payload.method.id == AMQP_CONNECTION_CLOSE_METHOD) {
                amqp_connection_close_t *m = f->payload.method.decoded;
                amqp_connection_close_ok_t ok = {};
                snprintf(reason, sizeof reason, "closed by broker: %u %.*s", m->reply_code,
                         (int) m->reply_text.len, (const char *) m->reply_text.bytes);
                r = broker_can_send(b) ? amqp_send_method(b->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok)
                                       : AMQP_STATUS_SOCKET_ERROR;
                if (r != AMQP_STATUS_OK)
                        log_debug("broker: connection.close-ok: %s", amqp_error_string2(r));
                broker_lost(b, reason, false);
        } else {
                amqp_channel_close_t *m = f->payload.method.decoded;
                amqp_channel_close_ok_t ok = {};
                snprintf(reason, sizeof reason, "channel closed by broker: %u %.*s", m->reply_code,
                         (int) m->reply_text.len, (const char *) m->reply_text.bytes);
                if (broker_can_send(b))
                        (void) amqp_send_method(b->conn, f->channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
                broker_lost(b, reason, true);
        }
}

static int broker_on_method(Broker *b, const amqp_frame_t *f) {
        if (f->channel == BROKER_PUBLISH_CHANNEL)
                return broker_on_publish_method(b, f);
        switch (f->payload.method.id) {
        case AMQP_BASIC_DELIVER_METHOD:
                return broker_on_deliver(b, f->payload.method.decoded);
        case AMQP_CONNECTION_CLOSE_METHOD:
        case AMQP_CHANNEL_CLOSE_METHOD:
                broker_on_server_close(b, f);
                return -ECONNRESET;
        case AMQP_BASIC_CANCEL_METHOD:
                /* Our queue went away (deleted by an operator): start over. */
                broker_lost(b, "consumer cancelled by broker", true);
                return -ECONNRESET;
        case AMQP_CONNECTION_BLOCKED_METHOD:
                log_info("broker: the broker blocked publishing (resource alarm)");
                return 0;
        default:
                log_debug("broker: ignoring method 0x%08x on channel %u", f->payload.method.id, f->channel);
                return 0;
        }
}

static int broker_on_frame(Broker *b, const amqp_frame_t *f) {
        switch (f->frame_type) {
        case AMQP_FRAME_METHOD:
                return broker_on_method(b, f);
        /* Content on the publishing channel (a basic.return) may come
         * between a delivery's frames: it is not the delivery's. */
        case AMQP_FRAME_HEADER:
                return f->channel == BROKER_CHANNEL ? broker_on_header(b, f) : 0;
        case AMQP_FRAME_BODY:
                return f->channel == BROKER_CHANNEL ? broker_on_body(b, f) : 0;
        default:
                return 0; /* heartbeats: last_rx is already updated */
        }
}

/* ---- frames and heartbeats, never blocking ---- */

/* Reads every frame that is already here, never waiting. Stops after a
 * batch and continues from a deferred source so that a storm does not
 * starve the rest of the loop. */
static void broker_drain(Broker *b) {
        uint64_t gen = b->conn_gen;
        struct timeval zero = {};

        for (unsigned i = 0; i < DRAIN_BATCH; i++) {
                amqp_frame_t f;
                int r = amqp_simple_wait_frame_noblock(b->conn, &f, &zero);

                if (r == AMQP_STATUS_TIMEOUT)
                        return;
                if (r != AMQP_STATUS_OK) {
                        broker_lost_status(b, "read", r);
                        return;
                }
                (void) sd_event_now(b->event, CLOCK_MONOTONIC, &b->last_rx);
                r = broker_on_frame(b, &f);
                if (gen != b->conn_gen || !b->conn)
                        return; /* lost, moved or closed meanwhile */
                if (!amqp_frames_enqueued(b->conn))
                        amqp_maybe_release_buffers(b->conn);
                if (r < 0) {
                        broker_lost(b, "out of memory", false);
                        return;
                }
        }
        (void) sd_event_source_set_enabled(b->drain_source, SD_EVENT_ONESHOT);
}

static int on_drain(sd_event_source *s, void *userdata) {
        Broker *b = userdata;

        if (b->conn)
                broker_drain(b);
        return 0;
}

static void broker_send_heartbeat(Broker *b, usec_t now);

static int on_socket(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Broker *b = userdata;
        uint64_t gen = b->conn_gen;

        /* Any byte counts as life, also heartbeats that the library swallows. */
        (void) sd_event_now(b->event, CLOCK_MONOTONIC, &b->last_rx);
        broker_drain(b);
        if (gen == b->conn_gen && b->conn && (revents & (EPOLLHUP | EPOLLERR)) &&
            sd_event_source_get_enabled(b->drain_source, NULL) == 0) {
                broker_lost(b, "socket error", false);
                return 0;
        }
        if (gen == b->conn_gen && b->conn && b->heartbeat > 0 && b->last_rx >= b->last_tx + b->heartbeat / 4)
                broker_send_heartbeat(b, b->last_rx);
        return 0;
}

/* Our heartbeats ride on the broker's: it sends one every half heartbeat,
 * and when one wakes us and a quarter heartbeat has passed since our last
 * send, ours goes out in the same wakeup. The send timer, 3/4 heartbeat
 * after our last send, is the fallback for a broker that has gone quiet;
 * while the broker talks it never fires, so an idle daemon wakes up only
 * for the broker's heartbeats and its own poll rounds. rabbitmq-c's own
 * deadline (one heartbeat after the last send) never passes, so it never
 * sends one itself inside a frame read (and blocks there on a full
 * socket). Each send also pushes the receive check out to last_rx + 2
 * heartbeats: a silent broker is still declared lost exactly 2 heartbeats
 * after its last byte. */
static usec_t heartbeat_send_interval(const Broker *b) {
        return b->heartbeat / 4 * 3;
}

static void broker_send_heartbeat(Broker *b, usec_t now) {
        amqp_frame_t f = {.frame_type = AMQP_FRAME_HEARTBEAT, .channel = 0};
        int r;

        /* A peer that has stopped reading is lost: the library would
         * otherwise send its own heartbeat inside the next frame read and
         * block there on the full socket. */
        if (!broker_can_send(b)) {
                broker_lost(b, "broker not reading (send buffer full)", false);
                return;
        }
        r = amqp_send_frame(b->conn, &f);
        if (r != AMQP_STATUS_OK) {
                broker_lost_status(b, "heartbeat", r);
                return;
        }
        b->last_tx = now;
        (void) sd_event_source_set_time(b->hb_send_source, now + heartbeat_send_interval(b));
        (void) sd_event_source_set_time(b->hb_check_source, b->last_rx + 2 * b->heartbeat);
}

static int on_heartbeat_send(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;

        broker_send_heartbeat(b, usec);
        return 0;
}

/* Fires at last_rx + 2 heartbeats (pushed out by every send tick). */
static int on_heartbeat_check(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;
        usec_t deadline = b->last_rx + 2 * b->heartbeat;

        if (deadline > usec) {
                (void) sd_event_source_set_time(s, deadline);
                return 0;
        }
        broker_lost(b, "heartbeat timeout", false);
        return 0;
}

/* ---- the hand-off: a worker's attempt becomes the loop's connection ---- */

static int broker_watch(Broker *b) {
        int r, fd = amqp_get_sockfd(b->conn);
        usec_t now;

        (void) sd_event_now(b->event, CLOCK_MONOTONIC, &now);
        b->last_rx = b->last_tx = now;
        b->heartbeat = (usec_t) amqp_get_heartbeat(b->conn) * USEC_PER_SEC;
        r = sd_event_add_io(b->event, &b->io_source, fd, EPOLLIN, on_socket, b);
        if (r >= 0)
                r = sd_event_add_defer(b->event, &b->drain_source, on_drain, b);
        if (r >= 0)
                r = sd_event_source_set_enabled(b->drain_source, SD_EVENT_OFF);
        if (r >= 0 && b->heartbeat > 0)
                r = sd_event_add_time(b->event, &b->hb_send_source, CLOCK_MONOTONIC,
                                      now + heartbeat_send_interval(b), USEC_PER_MSEC, on_heartbeat_send, b);
        if (r >= 0 && b->heartbeat > 0)
                r = sd_event_add_time(b->event, &b->hb_check_source, CLOCK_MONOTONIC, now + 2 * b->heartbeat,
                                      USEC_PER_MSEC, on_heartbeat_check, b);
        if (r >= 0 && b->heartbeat > 0)
                r = sd_event_source_set_enabled(b->hb_send_source, SD_EVENT_ON);
        if (r >= 0 && b->heartbeat > 0)
                r = sd_event_source_set_enabled(b->hb_check_source, SD_EVENT_ON);
        return r;
}

static void broker_connected(Broker *b, amqp_connection_state_t conn, usec_t elapsed) {
        const BrokerInfo *t = &b->params.target;
        char hostport[PROVIDER_HOST_MAX + 16];
        uint64_t gen;
        int r;

        b->conn = conn;
        r = broker_watch(b);
        if (r < 0) {
                log_error_errno(r, "broker: cannot watch the connection");
                broker_close_conn(b, true);
                broker_attempt_failed(b, "cannot watch the connection");
                return;
        }
        b->failures = 0;
        b->loss_logged = false;
        b->connects++;
        b->publish_open = true;
        b->publish_seq = 0;
        snprintf(hostport, sizeof hostport, "%s:%u", t->host, t->port);
        log_struct(LOG_NOTICE, 0, MID_BROKER_CONNECTED, &(LogFields){.peer = hostport},
                   "broker %s%s connected, consuming from %s (setup %" PRIu64 " ms, heartbeat %" PRIu64
                   " s)",
                   hostport, t->tls ? " (TLS)" : "", b->params.exchange, elapsed / USEC_PER_MSEC,
                   b->heartbeat / USEC_PER_SEC);
        gen = b->conn_gen;
        broker_set_state(b, BROKER_CONNECTED, NULL);
        /* Frames that arrived during setup sit in the library's buffers. */
        if (gen == b->conn_gen && b->conn)
                broker_drain(b);
}

static int on_attempt_done(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Broker *b = userdata;
        BrokerAttempt *a = b->attempt;
        char reason[BROKER_REASON_MAX];
        amqp_connection_state_t conn;
        usec_t elapsed = now_usec(CLOCK_MONOTONIC) - broker_attempt_started(a);

        conn = broker_attempt_take(a, reason, sizeof reason);
        b->attempt_source = sd_event_source_disable_unref(b->attempt_source);
        b->attempt = broker_attempt_unref(a);

        if (conn)
                broker_connected(b, conn, elapsed);
        else
                broker_attempt_failed(b, reason[0] ? reason : "unknown error");
        return 0;
}

static int broker_start_attempt(Broker *b) {
        const BrokerInfo *t = &b->params.target;
        BrokerAttempt *a = NULL;
        int r;

        broker_abandon_attempt(b);
        r = broker_attempt_new(&b->params, &a);
        if (r >= 0)
                r = sd_event_add_io(b->event, &b->attempt_source, broker_attempt_fd(a), EPOLLIN,
                                    on_attempt_done, b);
        if (r >= 0)
                r = broker_attempt_spawn(a);
        if (r < 0) {
                b->attempt_source = sd_event_source_disable_unref(b->attempt_source);
                broker_attempt_unref(a);
                log_error_errno(r, "broker: cannot start a connection attempt");
                broker_attempt_failed(b, "cannot start a connection attempt");
                return r;
        }
        b->attempt = a;
        log_debug("broker: connecting to %s:%u vhost %s%s", t->host, t->port, t->vhost,
                  t->tls ? " (TLS)" : "");
        return 0;
}

/* A deliberate (re)connect: fresh backoff, reported as connecting, the
 * attempt at once or after delay (the spread of a move). */
static int broker_connect(Broker *b, usec_t delay) {
        const BrokerInfo *t = &b->params.target;

        broker_drop_all(b, true);
        b->failures = 0;
        b->loss_logged = false;
        broker_set_state(b, BROKER_CONNECTING, NULL);
        if (delay == 0 || broker_arm_retry(b, delay) < 0)
                return broker_start_attempt(b);
        log_debug("broker: first attempt to %s:%u in %" PRIu64 " ms (spread after a move)", t->host, t->port,
                  delay / USEC_PER_MSEC);
        return 0;
}

/* ---- the interface ---- */

int broker_new(sd_event *e, const Config *cfg, const BrokerCallbacks *cb, void *userdata, Broker **ret) {
        struct sigaction sa;
        Broker *b;
        int r;

        /* A peer that vanishes mid-write must not kill the daemon; the
         * library sends with MSG_NOSIGNAL, this covers everything else. */
        if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
                (void) signal(SIGPIPE, SIG_IGN);

        b = calloc(1, sizeof *b);
        if (!b)
                return -ENOMEM;
        r = params_from_config(&b->params, cfg, NULL);
        if (r < 0) {
                free(b);
                return r;
        }
        b->event = sd_event_ref(e);
        if (cb)
                b->cb = *cb;
        b->userdata = userdata;
        b->state = BROKER_DOWN;
        *ret = b;
        return 0;
}

Broker *broker_free(Broker *b) {
        if (!b)
                return NULL;
        broker_drop_all(b, true);
        broker_attempts_wait(WORKER_WAIT_ON_FREE_USEC);
        broker_params_done(&b->params);
        sd_event_unref(b->event);
        free(b);
        return NULL;
}

int broker_reconfigure(Broker *b, const Config *cfg) {
        BrokerParams p;
        bool changed;
        int r;

        r = params_from_config(&p, cfg, &b->params.target);
        if (r < 0)
                return log_error_errno(r, "broker: cannot apply the new configuration");
        changed = params_settings_differ(&b->params, &p);
        broker_params_done(&b->params);
        b->params = p;
        if (!changed || !b->have_target)
                return 0;
        log_info("broker: settings changed, reconnecting to %s:%u", p.target.host, p.target.port);
        return broker_connect(b, 0);
}

int broker_set_target(Broker *b, const BrokerInfo *target) {
        bool move;

        if (!target) {
                if (!b->have_target)
                        return 0;
                log_info("broker: disconnecting from %s:%u", b->params.target.host, b->params.target.port);
                broker_drop_all(b, true);
                b->have_target = false;
                b->loss_logged = false;
                broker_set_state(b, BROKER_DOWN, "no broker target");
                return 0;
        }
        if (b->have_target && broker_info_equal(&b->params.target, target) &&
            (b->state != BROKER_DOWN || b->attempt))
                return 0;
        move = b->have_target && !broker_info_equal(&b->params.target, target);
        if (move)
                log_info("broker: moving from %s:%u to %s:%u", b->params.target.host, b->params.target.port,
                         target->host, target->port);
        b->params.target = *target;
        b->have_target = true;
        return broker_connect(b, move ? random_usec(MOVE_SPREAD_MAX_USEC) : 0);
}

BrokerConnState broker_state(const Broker *b) {
        return b ? b->state : BROKER_DOWN;
}

const char *broker_conn_state_to_string(BrokerConnState s) {
        switch (s) {
        case BROKER_DOWN:
                return "down";
        case BROKER_CONNECTING:
                return "connecting";
        case BROKER_CONNECTED:
                return "connected";
        }
        return "unknown";
}

uint64_t broker_reconnects(const Broker *b) {
        return b && b->connects > 1 ? b->connects - 1 : 0;
}
