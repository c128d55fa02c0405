/* The AMQP connection to the committed Primary's broker.
 *
 * rabbitmq-c is a blocking library. Connection setup (TCP connect, TLS
 * handshake, login, channel, declare, bind, consume) is a chain of blocking
 * RPCs, so each attempt runs in a short-lived detached worker thread that
 * owns its own amqp connection and touches nothing else; it hands the
 * finished connection to the loop through an eventfd. From then on the loop
 * owns it: the socket is an I/O source, frames are read with a zero
 * timeout, heartbeats are sent and checked on timers, and the only blocking
 * calls left are small sends (acks, heartbeats, close).
 *
 * Abandoning an attempt (new target, reconfigure, free) marks it and shuts
 * its socket down so that a blocked RPC returns at once; the worker then
 * destroys its own connection. */

#include <errno.h>
#include <openssl/x509v3.h>
#include <openssl/ssl.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include "broker.h"
#include "log.h"
#include "macro.h"

#define BACKOFF_MIN_USEC              (250 * USEC_PER_MSEC)
#define BACKOFF_MAX_USEC              (30 * USEC_PER_SEC)
#define BACKOFF_JITTER                0.2
#define CONNECT_TIMEOUT_USEC          (10 * USEC_PER_SEC)
#define RPC_TIMEOUT_MIN_USEC          (2 * USEC_PER_SEC)
#define RPC_TIMEOUT_MAX_USEC          (30 * USEC_PER_SEC)
#define RPC_TIMEOUT_NO_HEARTBEAT_USEC (10 * USEC_PER_SEC)
#define WORKER_WAIT_ON_FREE_USEC      (2 * USEC_PER_SEC)
/* Events are a few hundred bytes; rabbitmq-c keeps one inbound buffer of
 * frame_max bytes for the connection's life, so a small frame_max is most
 * of the daemon's idle heap saved. Larger bodies arrive in several frames. */
#define FRAME_MAX      16384
#define PREFETCH       100
#define CHANNEL        1
#define DRAIN_BATCH    256
#define EVENT_BODY_MAX (64 * 1024)
#define REASON_MAX     256
#define SYSTEM_CA_FILE "/etc/ssl/certs/ca-certificates.crt"

/* What one attempt needs, copied so that the worker shares nothing with
 * the loop but the Attempt itself. */
typedef struct BrokerParams {
        BrokerInfo target;
        char *username;
        char *password;
        char *exchange;
        char *ca_file; /* NULL: system store */
        usec_t heartbeat;
} BrokerParams;

typedef struct Attempt {
        pthread_mutex_t lock;
        unsigned n_ref; /* the loop's and the worker's */
        int wake_fd;    /* eventfd: written once when a result is ready */
        BrokerParams params;
        usec_t started; /* CLOCK_MONOTONIC */

        /* Under lock. */
        bool abandoned;
        int sock_fd;                  /* the worker's socket while it may block on it, else -1 */
        amqp_connection_state_t conn; /* the result on success, until taken */
        char reason[REASON_MAX];      /* the result on failure */
} Attempt;

/* A delivery in progress: a basic.deliver method, a header, body frames. */
typedef struct Delivery {
        bool active;
        bool have_header;
        uint64_t tag;
        char routing_key[256];
        uint64_t size;
        uint64_t got;
        char *body; /* NULL while discarding an oversized body */
} Delivery;

struct Broker {
        sd_event *event;
        BrokerCallbacks cb;
        void *userdata;
        BrokerParams params; /* current settings and target */
        bool have_target;
        BrokerConnState state;

        Attempt *attempt;
        sd_event_source *attempt_source;
        sd_event_source *retry_source;
        usec_t backoff;
        bool loss_logged; /* a warning went out for the current outage */

        amqp_connection_state_t conn;
        uint64_t conn_gen; /* bumped whenever conn goes away */
        sd_event_source *io_source;
        sd_event_source *drain_source;
        sd_event_source *hb_send_source;
        sd_event_source *hb_check_source;
        usec_t heartbeat; /* negotiated, 0: off */
        usec_t last_rx;
        Delivery delivery;
};

/* ---- worker bookkeeping: broker_free waits (bounded) for stragglers ---- */

static pthread_mutex_t workers_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t workers_cond;
static pthread_once_t workers_once = PTHREAD_ONCE_INIT;
static unsigned n_workers;

static void workers_init(void) {
        pthread_condattr_t attr;

        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(&workers_cond, &attr);
        pthread_condattr_destroy(&attr);
}

static void workers_add(int delta) {
        pthread_once(&workers_once, workers_init);
        pthread_mutex_lock(&workers_lock);
        n_workers += delta;
        if (n_workers == 0)
                pthread_cond_broadcast(&workers_cond);
        pthread_mutex_unlock(&workers_lock);
}

static void workers_wait(usec_t timeout) {
        struct timespec ts;

        pthread_once(&workers_once, workers_init);
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += timeout / USEC_PER_SEC;
        ts.tv_nsec += (timeout % USEC_PER_SEC) * NSEC_PER_USEC;
        if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&workers_lock);
        while (n_workers > 0)
                if (pthread_cond_timedwait(&workers_cond, &workers_lock, &ts) == ETIMEDOUT)
                        break;
        if (n_workers > 0)
                log_debug("broker: %u connection attempt(s) still finishing in the background", n_workers);
        pthread_mutex_unlock(&workers_lock);
}

/* ---- small helpers ---- */

static struct timeval usec_to_timeval(usec_t u) {
        return (struct timeval){.tv_sec = u / USEC_PER_SEC, .tv_usec = u % USEC_PER_SEC};
}

/* AMQP negotiates whole seconds; round a sub-second heartbeat up. */
static int heartbeat_seconds(usec_t hb) {
        if (hb == 0)
                return 0;
        if (hb >= 65535 * USEC_PER_SEC)
                return 65535;
        return (int) ((hb + USEC_PER_SEC - 1) / USEC_PER_SEC);
}

/* Bounds every blocking RPC of the setup: a stalled broker must fail the
 * attempt in about the time the heartbeat would have declared it dead. */
static usec_t rpc_timeout(usec_t heartbeat) {
        usec_t t = heartbeat > 0 ? 2 * (usec_t) heartbeat_seconds(heartbeat) * USEC_PER_SEC
                                 : RPC_TIMEOUT_NO_HEARTBEAT_USEC;

        if (t < RPC_TIMEOUT_MIN_USEC)
                return RPC_TIMEOUT_MIN_USEC;
        return t > RPC_TIMEOUT_MAX_USEC ? RPC_TIMEOUT_MAX_USEC : t;
}

/* base * (1 +- BACKOFF_JITTER), from one random word. Pure. */
static usec_t backoff_jitter(usec_t base, uint64_t rnd) {
        double f =
                1.0 - BACKOFF_JITTER + 2.0 * BACKOFF_JITTER * ((double) (rnd >> 11) / (double) (1ULL << 53));

        return (usec_t) ((double) base * f);
}

static uint64_t random_u64(void) {
        uint64_t v = 0;

        if (getrandom(&v, sizeof v, GRND_NONBLOCK) != sizeof v)
                v = now_usec(CLOCK_MONOTONIC) * 6364136223846793005ULL;
        return v;
}

static void params_done(BrokerParams *p) {
        free(p->username);
        if (p->password) {
                explicit_bzero(p->password, strlen(p->password));
                free(p->password);
        }
        free(p->exchange);
        free(p->ca_file);
        *p = (BrokerParams){};
}

static int strdup_opt(const char *s, char **ret) {
        *ret = NULL;
        if (!s)
                return 0;
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

static int params_copy(BrokerParams *dst, const BrokerParams *src) {
        *dst = (BrokerParams){.target = src->target, .heartbeat = src->heartbeat};
        if (strdup_opt(src->username, &dst->username) < 0 || strdup_opt(src->password, &dst->password) < 0 ||
            strdup_opt(src->exchange, &dst->exchange) < 0 || strdup_opt(src->ca_file, &dst->ca_file) < 0) {
                params_done(dst);
                return -ENOMEM;
        }
        return 0;
}

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
        return params_copy(dst, &tmp);
}

/* True when a reconnect is needed to apply b over a. */
static bool params_settings_differ(const BrokerParams *a, const BrokerParams *b) {
        return !streq_ptr(a->username, b->username) || !streq_ptr(a->password, b->password) ||
               !streq_ptr(a->exchange, b->exchange) || !streq_ptr(a->ca_file, b->ca_file) ||
               a->heartbeat != b->heartbeat;
}

/* "403 ACCESS_REFUSED - ..." or the library's words for r. */
static void format_rpc_reply(char *buf, size_t size, const char *what, amqp_rpc_reply_t r) {
        switch (r.reply_type) {
        case AMQP_RESPONSE_NORMAL:
                snprintf(buf, size, "%s: ok", what);
                break;
        case AMQP_RESPONSE_NONE:
                snprintf(buf, size, "%s: no reply", what);
                break;
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
                snprintf(buf, size, "%s: %s", what, amqp_error_string2(r.library_error));
                break;
        case AMQP_RESPONSE_SERVER_EXCEPTION:
                if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
                        amqp_connection_close_t *m = r.reply.decoded;
                        snprintf(buf, size, "%s: %u %.*s", what, m->reply_code, (int) m->reply_text.len,
                                 (const char *) m->reply_text.bytes);
                } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
                        amqp_channel_close_t *m = r.reply.decoded;
                        snprintf(buf, size, "%s: %u %.*s", what, m->reply_code, (int) m->reply_text.len,
                                 (const char *) m->reply_text.bytes);
                } else
                        snprintf(buf, size, "%s: unexpected server method 0x%08x", what, r.reply.id);
                break;
        }
}

static bool reply_is_channel_close(amqp_rpc_reply_t r, uint16_t code) {
        return r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD &&
               ((amqp_channel_close_t *) r.reply.decoded)->reply_code == code;
}

/* ---- the worker: one blocking connection setup ---- */

static Attempt *attempt_unref(Attempt *a) {
        bool last;

        if (!a)
                return NULL;
        pthread_mutex_lock(&a->lock);
        last = --a->n_ref == 0;
        pthread_mutex_unlock(&a->lock);
        if (!last)
                return NULL;
        if (a->conn)
                amqp_destroy_connection(a->conn);
        if (a->wake_fd >= 0)
                close(a->wake_fd);
        params_done(&a->params);
        pthread_mutex_destroy(&a->lock);
        free(a);
        return NULL;
}

static int attempt_new(const BrokerParams *p, Attempt **ret) {
        Attempt *a = calloc(1, sizeof *a);

        if (!a)
                return -ENOMEM;
        pthread_mutex_init(&a->lock, NULL);
        a->n_ref = 1;
        a->sock_fd = -1;
        a->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (a->wake_fd < 0 || params_copy(&a->params, p) < 0) {
                int r = a->wake_fd < 0 ? negative_errno() : -ENOMEM;
                attempt_unref(a);
                return r;
        }
        a->started = now_usec(CLOCK_MONOTONIC);
        *ret = a;
        return 0;
}

/* rabbitmq-c 0.11 checks only DNS names of the certificate, so a broker
 * reported by address could never be reached over TLS. OpenSSL checks the
 * name or the IP address during chain verification instead; a mismatch
 * fails the peer verification rabbitmq-c enforces. */
static int expect_peer_name(amqp_socket_t *sock, const char *host) {
        SSL_CTX *ctx = amqp_ssl_socket_get_context(sock);
        X509_VERIFY_PARAM *vp = ctx ? SSL_CTX_get0_param(ctx) : NULL;
        unsigned char addr[sizeof(struct in6_addr)];
        int ok;

        if (!vp)
                return -EINVAL;
        if (inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1)
                ok = X509_VERIFY_PARAM_set1_ip_asc(vp, host);
        else {
                X509_VERIFY_PARAM_set_hostflags(vp, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
                ok = X509_VERIFY_PARAM_set1_host(vp, host, 0);
        }
        if (ok != 1)
                return -EINVAL;
        amqp_ssl_socket_set_verify_hostname(sock, 0);
        return 0;
}

static int setup_socket(Attempt *a, amqp_connection_state_t conn, char *err, size_t errlen) {
        const BrokerParams *p = &a->params;
        struct timeval tv = usec_to_timeval(CONNECT_TIMEOUT_USEC);
        amqp_socket_t *sock;
        int r;

        sock = p->target.tls ? amqp_ssl_socket_new(conn) : amqp_tcp_socket_new(conn);
        if (!sock) {
                snprintf(err, errlen, "cannot create %s socket", p->target.tls ? "TLS" : "TCP");
                return -ENOMEM;
        }
        if (p->target.tls) {
                const char *ca = p->ca_file ? p->ca_file : SYSTEM_CA_FILE;

                amqp_ssl_socket_set_verify_peer(sock, 1);
                amqp_ssl_socket_set_ssl_versions(sock, AMQP_TLSv1_2, AMQP_TLSvLATEST);
                r = expect_peer_name(sock, p->target.host);
                if (r < 0) {
                        snprintf(err, errlen, "TLS: cannot set the expected peer name");
                        return r;
                }
                r = amqp_ssl_socket_set_cacert(sock, ca);
                if (r != AMQP_STATUS_OK) {
                        snprintf(err, errlen, "CA file %s: %s", ca, amqp_error_string2(r));
                        return -EINVAL;
                }
        }
        errno = 0;
        r = amqp_socket_open_noblock(sock, p->target.host, p->target.port, &tv);
        if (r != AMQP_STATUS_OK) {
                /* The library keeps no error of its own; errno is only
                 * meaningful when it is not left over from the async connect. */
                if (r == AMQP_STATUS_SOCKET_ERROR && errno > 0 && errno != EINPROGRESS && errno != EAGAIN)
                        snprintf(err, errlen, "connect: %s", strerror(errno));
                else
                        snprintf(err, errlen, "connect: %s", amqp_error_string2(r));
                return -ECONNREFUSED;
        }

        /* From here on a blocked RPC can be woken by shutdown() from the loop. */
        pthread_mutex_lock(&a->lock);
        /* A duplicate we own: rabbitmq-c may close its own descriptor on an
         * RPC timeout, and the number could then be reused by the loop for
         * an unrelated socket before we stop pointing at it. */
        a->sock_fd = a->abandoned ? -1 : fcntl(amqp_get_sockfd(conn), F_DUPFD_CLOEXEC, 3);
        r = a->abandoned ? -ECANCELED : 0;
        pthread_mutex_unlock(&a->lock);
        if (r < 0)
                snprintf(err, errlen, "abandoned");
        return r;
}

#define CHECK_RPC(conn, what, err, errlen)                                                                  \
        do {                                                                                                \
                amqp_rpc_reply_t _r = amqp_get_rpc_reply(conn);                                             \
                if (_r.reply_type != AMQP_RESPONSE_NORMAL) {                                                \
                        format_rpc_reply(err, errlen, what, _r);                                            \
                        return -EPROTO;                                                                     \
                }                                                                                           \
        } while (0)

/* Declares the events exchange as a durable topic; when it exists with
 * other arguments (406), the server closed the channel: open it again and
 * only check that the exchange is there. */
static int setup_exchange(amqp_connection_state_t conn, const char *exchange, char *err, size_t errlen) {
        amqp_bytes_t ex = amqp_cstring_bytes(exchange), type = amqp_cstring_bytes("topic");
        amqp_channel_close_ok_t close_ok = {};
        amqp_rpc_reply_t r;

        amqp_exchange_declare(conn, CHANNEL, ex, type, 0, 1, 0, 0, amqp_empty_table);
        r = amqp_get_rpc_reply(conn);
        if (r.reply_type == AMQP_RESPONSE_NORMAL)
                return 0;
        /* 406: declared differently; 403: this user may not declare it at
         * all (least privilege). Either way a passive declare suffices. */
        if (!reply_is_channel_close(r, AMQP_PRECONDITION_FAILED) &&
            !reply_is_channel_close(r, AMQP_ACCESS_REFUSED)) {
                format_rpc_reply(err, errlen, "exchange.declare", r);
                return -EPROTO;
        }
        if (amqp_send_method(conn, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &close_ok) != AMQP_STATUS_OK) {
                snprintf(err, errlen, "channel.close-ok: send failed");
                return -EIO;
        }
        amqp_channel_open(conn, CHANNEL);
        CHECK_RPC(conn, "channel.open", err, errlen);
        amqp_exchange_declare(conn, CHANNEL, ex, type, 1, 0, 0, 0, amqp_empty_table);
        CHECK_RPC(conn, "exchange.declare (passive)", err, errlen);
        return 0;
}

static int setup_consumer(amqp_connection_state_t conn, const char *exchange, char *err, size_t errlen) {
        static const char *const keys[] = {"provider.#", "agent.#"};
        amqp_queue_declare_ok_t *q;
        amqp_bytes_t queue;
        int r = 0;

        q = amqp_queue_declare(conn, CHANNEL, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
        CHECK_RPC(conn, "queue.declare", err, errlen);
        /* The reply lives in the connection's pool, which later RPCs recycle. */
        queue = amqp_bytes_malloc_dup(q->queue);
        if (!queue.bytes) {
                snprintf(err, errlen, "out of memory");
                return -ENOMEM;
        }
        for (size_t i = 0; i < ELEMENTSOF(keys) && r == 0; i++) {
                amqp_queue_bind(conn, CHANNEL, queue, amqp_cstring_bytes(exchange),
                                amqp_cstring_bytes(keys[i]), amqp_empty_table);
                amqp_rpc_reply_t rr = amqp_get_rpc_reply(conn);
                if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                        format_rpc_reply(err, errlen, "queue.bind", rr);
                        r = -EPROTO;
                }
        }
        if (r == 0) {
                amqp_basic_qos(conn, CHANNEL, 0, PREFETCH, 0);
                amqp_rpc_reply_t rr = amqp_get_rpc_reply(conn);
                if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                        format_rpc_reply(err, errlen, "basic.qos", rr);
                        r = -EPROTO;
                }
        }
        if (r == 0) {
                amqp_basic_consume(conn, CHANNEL, queue, amqp_empty_bytes, 0, 0, 1, amqp_empty_table);
                amqp_rpc_reply_t rr = amqp_get_rpc_reply(conn);
                if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                        format_rpc_reply(err, errlen, "basic.consume", rr);
                        r = -EPROTO;
                }
        }
        amqp_bytes_free(queue);
        return r;
}

static int attempt_setup(Attempt *a, amqp_connection_state_t conn, char *err, size_t errlen) {
        const BrokerParams *p = &a->params;
        struct timeval tv = usec_to_timeval(rpc_timeout(p->heartbeat));
        amqp_rpc_reply_t rr;
        int r;

        amqp_set_handshake_timeout(conn, &tv);
        amqp_set_rpc_timeout(conn, &tv);
        r = setup_socket(a, conn, err, errlen);
        if (r < 0)
                return r;
        rr = amqp_login(conn, p->target.vhost, 0, FRAME_MAX, heartbeat_seconds(p->heartbeat),
                        AMQP_SASL_METHOD_PLAIN, p->username, p->password);
        if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                format_rpc_reply(err, errlen, "login", rr);
                return -EACCES;
        }
        amqp_channel_open(conn, CHANNEL);
        CHECK_RPC(conn, "channel.open", err, errlen);
        r = setup_exchange(conn, p->exchange, err, errlen);
        if (r < 0)
                return r;
        return setup_consumer(conn, p->exchange, err, errlen);
}

static void *attempt_run(void *userdata) {
        Attempt *a = userdata;
        char reason[REASON_MAX] = "out of memory";
        amqp_connection_state_t conn = amqp_new_connection();
        int r = conn ? attempt_setup(a, conn, reason, sizeof reason) : -ENOMEM;

        pthread_mutex_lock(&a->lock);
        if (a->sock_fd >= 0)
                close(a->sock_fd);
        a->sock_fd = -1;
        if (!a->abandoned) {
                if (r >= 0) {
                        a->conn = conn;
                        conn = NULL;
                } else
                        strscpy(a->reason, sizeof a->reason, reason);
                (void) eventfd_write(a->wake_fd, 1);
        }
        pthread_mutex_unlock(&a->lock);

        /* A failed or abandoned attempt cleans up after itself, here. */
        if (conn)
                amqp_destroy_connection(conn);
        attempt_unref(a);
        workers_add(-1);
        return NULL;
}

/* ---- the loop side ---- */

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
static bool broker_can_send(Broker *b) {
        struct pollfd p = {.fd = amqp_get_sockfd(b->conn), .events = POLLOUT};

        return poll(&p, 1, 0) == 1 && (p.revents & POLLOUT) && !(p.revents & (POLLERR | POLLHUP));
}

/* Forgets the attempt in flight; its worker finishes on its own. */
static void broker_abandon_attempt(Broker *b) {
        amqp_connection_state_t conn;
        Attempt *a = b->attempt;

        if (!a)
                return;
        b->attempt_source = sd_event_source_disable_unref(b->attempt_source);
        pthread_mutex_lock(&a->lock);
        a->abandoned = true;
        if (a->sock_fd >= 0)
                (void) shutdown(a->sock_fd, SHUT_RDWR);
        conn = a->conn;
        a->conn = NULL;
        pthread_mutex_unlock(&a->lock);
        if (conn)
                amqp_destroy_connection(conn);
        b->attempt = attempt_unref(a);
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

static int broker_start_attempt(Broker *b);

static int on_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;

        b->retry_source = sd_event_source_disable_unref(b->retry_source);
        (void) broker_start_attempt(b);
        return 0;
}

static void broker_schedule_retry(Broker *b) {
        usec_t delay = backoff_jitter(b->backoff, random_u64());
        int r;

        b->backoff = b->backoff * 2 > BACKOFF_MAX_USEC ? BACKOFF_MAX_USEC : b->backoff * 2;
        b->retry_source = sd_event_source_disable_unref(b->retry_source);
        r = sd_event_add_time_relative(b->event, &b->retry_source, CLOCK_MONOTONIC, delay,
                                       10 * USEC_PER_MSEC, on_retry, b);
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

        if (!b->loss_logged) {
                log_struct(LOG_WARNING, 0, MID_BROKER_LOST, &(LogFields){.reason = reason},
                           "broker %s:%u unreachable: %s", t->host, t->port, reason);
                b->loss_logged = true;
        } else
                log_debug("broker %s:%u still unreachable: %s", t->host, t->port, reason);
        broker_schedule_retry(b);
        broker_set_state(b, BROKER_DOWN, reason);
}

/* The established connection failed. */
static void broker_lost(Broker *b, const char *reason, bool graceful) {
        const BrokerInfo *t = &b->params.target;

        broker_close_conn(b, graceful);
        log_struct(LOG_WARNING, 0, MID_BROKER_LOST, &(LogFields){.reason = reason},
                   "broker connection to %s:%u lost: %s", t->host, t->port, reason);
        b->loss_logged = true;
        broker_schedule_retry(b);
        broker_set_state(b, BROKER_DOWN, reason);
}

static void broker_lost_status(Broker *b, const char *what, int status) {
        char reason[REASON_MAX];

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
        r = amqp_basic_ack(b->conn, CHANNEL, d.tag, 0);
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
        char reason[REASON_MAX];
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
        case AMQP_FRAME_HEADER:
                return broker_on_header(b, f);
        case AMQP_FRAME_BODY:
                return broker_on_body(b, f);
        default:
                return 0; /* heartbeats: last_rx is already updated */
        }
}

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

static int on_socket(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Broker *b = userdata;
        uint64_t gen = b->conn_gen;

        /* Any byte counts as life, also heartbeats that the library swallows. */
        (void) sd_event_now(b->event, CLOCK_MONOTONIC, &b->last_rx);
        broker_drain(b);
        if (gen == b->conn_gen && b->conn && (revents & (EPOLLHUP | EPOLLERR)) &&
            sd_event_source_get_enabled(b->drain_source, NULL) == 0)
                broker_lost(b, "socket error", false);
        return 0;
}

static int on_heartbeat_send(sd_event_source *s, uint64_t usec, void *userdata) {
        Broker *b = userdata;
        amqp_frame_t f = {.frame_type = AMQP_FRAME_HEARTBEAT, .channel = 0};
        int r;

        /* A peer that has stopped reading for half a heartbeat is lost: the
         * library would otherwise send its own heartbeat inside the next
         * frame read and block there on the full socket. */
        if (!broker_can_send(b)) {
                broker_lost(b, "broker not reading (send buffer full)", false);
                return 0;
        }
        r = amqp_send_frame(b->conn, &f);
        if (r != AMQP_STATUS_OK) {
                broker_lost_status(b, "heartbeat", r);
                return 0;
        }
        (void) sd_event_source_set_time(s, usec + b->heartbeat / 2);
        return 0;
}

/* Fires at last_rx + 2 heartbeats; re-arms itself while data keeps coming. */
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

static int broker_watch(Broker *b) {
        int r, fd = amqp_get_sockfd(b->conn);
        usec_t now;

        (void) sd_event_now(b->event, CLOCK_MONOTONIC, &now);
        b->last_rx = now;
        b->heartbeat = (usec_t) amqp_get_heartbeat(b->conn) * USEC_PER_SEC;
        r = sd_event_add_io(b->event, &b->io_source, fd, EPOLLIN, on_socket, b);
        if (r >= 0)
                r = sd_event_add_defer(b->event, &b->drain_source, on_drain, b);
        if (r >= 0)
                r = sd_event_source_set_enabled(b->drain_source, SD_EVENT_OFF);
        if (r >= 0 && b->heartbeat > 0)
                r = sd_event_add_time(b->event, &b->hb_send_source, CLOCK_MONOTONIC, now + b->heartbeat / 2,
                                      USEC_PER_MSEC, on_heartbeat_send, b);
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
        b->backoff = BACKOFF_MIN_USEC;
        b->loss_logged = false;
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
        Attempt *a = b->attempt;
        char reason[REASON_MAX];
        amqp_connection_state_t conn;
        usec_t elapsed = now_usec(CLOCK_MONOTONIC) - a->started;

        pthread_mutex_lock(&a->lock);
        conn = a->conn;
        a->conn = NULL;
        strscpy(reason, sizeof reason, a->reason);
        pthread_mutex_unlock(&a->lock);
        b->attempt_source = sd_event_source_disable_unref(b->attempt_source);
        b->attempt = attempt_unref(a);

        if (conn)
                broker_connected(b, conn, elapsed);
        else
                broker_attempt_failed(b, reason[0] ? reason : "unknown error");
        return 0;
}

static int broker_spawn(Broker *b, Attempt *a) {
        sigset_t all, old;
        pthread_attr_t attr;
        pthread_t t;
        int r;

        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* The worker must never take a signal meant for the loop (or SIGPIPE). */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        a->n_ref++;
        workers_add(1);
        r = -pthread_create(&t, &attr, attempt_run, a);
        if (r < 0) {
                a->n_ref--;
                workers_add(-1);
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
        return r;
}

static int broker_start_attempt(Broker *b) {
        const BrokerInfo *t = &b->params.target;
        Attempt *a = NULL;
        int r;

        broker_abandon_attempt(b);
        r = attempt_new(&b->params, &a);
        if (r >= 0)
                r = sd_event_add_io(b->event, &b->attempt_source, a->wake_fd, EPOLLIN, on_attempt_done, b);
        if (r >= 0)
                r = broker_spawn(b, a);
        if (r < 0) {
                b->attempt_source = sd_event_source_disable_unref(b->attempt_source);
                attempt_unref(a);
                log_error_errno(r, "broker: cannot start a connection attempt");
                broker_attempt_failed(b, "cannot start a connection attempt");
                return r;
        }
        b->attempt = a;
        log_debug("broker: connecting to %s:%u vhost %s%s", t->host, t->port, t->vhost,
                  t->tls ? " (TLS)" : "");
        return 0;
}

/* A deliberate (re)connect: at once, fresh backoff, reported as connecting. */
static int broker_connect_now(Broker *b) {
        broker_drop_all(b, true);
        b->backoff = BACKOFF_MIN_USEC;
        b->loss_logged = false;
        broker_set_state(b, BROKER_CONNECTING, NULL);
        return broker_start_attempt(b);
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
        b->backoff = BACKOFF_MIN_USEC;
        *ret = b;
        return 0;
}

Broker *broker_free(Broker *b) {
        if (!b)
                return NULL;
        broker_drop_all(b, true);
        workers_wait(WORKER_WAIT_ON_FREE_USEC);
        params_done(&b->params);
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
        params_done(&b->params);
        b->params = p;
        if (!changed || !b->have_target)
                return 0;
        log_info("broker: settings changed, reconnecting to %s:%u", p.target.host, p.target.port);
        return broker_connect_now(b);
}

int broker_set_target(Broker *b, const BrokerInfo *target) {
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
        if (b->have_target && !broker_info_equal(&b->params.target, target))
                log_info("broker: moving from %s:%u to %s:%u", b->params.target.host, b->params.target.port,
                         target->host, target->port);
        b->params.target = *target;
        b->have_target = true;
        return broker_connect_now(b);
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
