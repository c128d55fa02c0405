/* One broker connection attempt on a worker thread (see broker-connect.h).
 *
 * Why a thread: rabbitmq-c is a blocking library, and its connection setup
 * (TCP connect, TLS handshake, login, channel, declare, bind, consume) is a
 * chain of blocking RPCs that can take seconds against a slow or stalled
 * broker. The loop must never wait on it (a blocking call must never stall
 * synchronization), so each attempt runs in a short-lived detached thread
 * that owns its own amqp connection and touches nothing else; it hands the
 * finished connection to the loop through an eventfd. Everything after the
 * hand-off (frames, heartbeats, acks, loss) is agent/broker.c, on the loop.
 *
 * Abandoning an attempt (new target, reconfigure, free) marks it and shuts
 * its socket down so that a blocked RPC returns at once; the worker then
 * destroys its own connection. */

#include <errno.h>
#include <openssl/x509v3.h>
#include <openssl/ssl.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include "broker-connect.h"
#include "log.h"
#include "macro.h"

#define CONNECT_TIMEOUT_USEC          (10 * USEC_PER_SEC)
#define RPC_TIMEOUT_MIN_USEC          (2 * USEC_PER_SEC)
#define RPC_TIMEOUT_MAX_USEC          (30 * USEC_PER_SEC)
#define RPC_TIMEOUT_NO_HEARTBEAT_USEC (10 * USEC_PER_SEC)
/* Events are a few hundred bytes; rabbitmq-c keeps one inbound buffer of
 * frame_max bytes for the connection's life, so a small frame_max is most
 * of the daemon's idle heap saved. Larger bodies arrive in several frames. */
#define FRAME_MAX      16384
#define PREFETCH       100
#define SYSTEM_CA_FILE "/etc/ssl/certs/ca-certificates.crt"

struct BrokerAttempt {
        pthread_mutex_t lock;
        unsigned n_ref; /* the loop's and the worker's */
        int wake_fd;    /* eventfd: written once when a result is ready */
        BrokerParams params;
        usec_t started; /* CLOCK_MONOTONIC */

        /* Under lock. */
        bool abandoned;
        int sock_fd;                    /* the worker's socket while it may block on it, else -1 */
        amqp_connection_state_t conn;   /* the result on success, until taken */
        char reason[BROKER_REASON_MAX]; /* the result on failure */
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

void broker_attempts_wait(usec_t timeout) {
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

/* ---- parameters ---- */

void broker_params_done(BrokerParams *p) {
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

int broker_params_copy(BrokerParams *dst, const BrokerParams *src) {
        *dst = (BrokerParams){.target = src->target, .heartbeat = src->heartbeat};
        if (strdup_opt(src->username, &dst->username) < 0 || strdup_opt(src->password, &dst->password) < 0 ||
            strdup_opt(src->exchange, &dst->exchange) < 0 || strdup_opt(src->ca_file, &dst->ca_file) < 0) {
                broker_params_done(dst);
                return -ENOMEM;
        }
        return 0;
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

/* ---- the attempt, shared by the loop and its worker ---- */

BrokerAttempt *broker_attempt_unref(BrokerAttempt *a) {
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
        broker_params_done(&a->params);
        pthread_mutex_destroy(&a->lock);
        free(a);
        return NULL;
}

int broker_attempt_new(const BrokerParams *p, BrokerAttempt **ret) {
        BrokerAttempt *a = calloc(1, sizeof *a);

        if (!a)
                return -ENOMEM;
        pthread_mutex_init(&a->lock, NULL);
        a->n_ref = 1;
        a->sock_fd = -1;
        a->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (a->wake_fd < 0 || broker_params_copy(&a->params, p) < 0) {
                int r = a->wake_fd < 0 ? negative_errno() : -ENOMEM;
                broker_attempt_unref(a);
                return r;
        }
        a->started = now_usec(CLOCK_MONOTONIC);
        *ret = a;
        return 0;
}

int broker_attempt_fd(const BrokerAttempt *a) {
        return a->wake_fd;
}

usec_t broker_attempt_started(const BrokerAttempt *a) {
        return a->started;
}

amqp_connection_state_t broker_attempt_take(BrokerAttempt *a, char *reason, size_t size) {
        amqp_connection_state_t conn;

        pthread_mutex_lock(&a->lock);
        conn = a->conn;
        a->conn = NULL;
        strscpy(reason, size, a->reason);
        pthread_mutex_unlock(&a->lock);
        return conn;
}

BrokerAttempt *broker_attempt_abandon(BrokerAttempt *a) {
        amqp_connection_state_t conn;

        if (!a)
                return NULL;
        pthread_mutex_lock(&a->lock);
        a->abandoned = true;
        if (a->sock_fd >= 0)
                (void) shutdown(a->sock_fd, SHUT_RDWR);
        conn = a->conn;
        a->conn = NULL;
        pthread_mutex_unlock(&a->lock);
        if (conn)
                amqp_destroy_connection(conn);
        return broker_attempt_unref(a);
}

/* ---- the worker: one blocking connection setup ---- */

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

static int setup_socket(BrokerAttempt *a, amqp_connection_state_t conn, char *err, size_t errlen) {
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

        amqp_exchange_declare(conn, BROKER_CHANNEL, ex, type, 0, 1, 0, 0, amqp_empty_table);
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
        if (amqp_send_method(conn, BROKER_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &close_ok) !=
            AMQP_STATUS_OK) {
                snprintf(err, errlen, "channel.close-ok: send failed");
                return -EIO;
        }
        amqp_channel_open(conn, BROKER_CHANNEL);
        CHECK_RPC(conn, "channel.open", err, errlen);
        amqp_exchange_declare(conn, BROKER_CHANNEL, ex, type, 1, 0, 0, 0, amqp_empty_table);
        CHECK_RPC(conn, "exchange.declare (passive)", err, errlen);
        return 0;
}

static int setup_consumer(amqp_connection_state_t conn, const char *exchange, char *err, size_t errlen) {
        static const char *const keys[] = {"provider.#", "agent.#"};
        amqp_queue_declare_ok_t *q;
        amqp_bytes_t queue;
        int r = 0;

        q = amqp_queue_declare(conn, BROKER_CHANNEL, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
        CHECK_RPC(conn, "queue.declare", err, errlen);
        /* The reply lives in the connection's pool, which later RPCs recycle. */
        queue = amqp_bytes_malloc_dup(q->queue);
        if (!queue.bytes) {
                snprintf(err, errlen, "out of memory");
                return -ENOMEM;
        }
        for (size_t i = 0; i < ELEMENTSOF(keys) && r == 0; i++) {
                amqp_queue_bind(conn, BROKER_CHANNEL, queue, amqp_cstring_bytes(exchange),
                                amqp_cstring_bytes(keys[i]), amqp_empty_table);
                amqp_rpc_reply_t rr = amqp_get_rpc_reply(conn);
                if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                        format_rpc_reply(err, errlen, "queue.bind", rr);
                        r = -EPROTO;
                }
        }
        if (r == 0) {
                amqp_basic_qos(conn, BROKER_CHANNEL, 0, PREFETCH, 0);
                amqp_rpc_reply_t rr = amqp_get_rpc_reply(conn);
                if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                        format_rpc_reply(err, errlen, "basic.qos", rr);
                        r = -EPROTO;
                }
        }
        if (r == 0) {
                amqp_basic_consume(conn, BROKER_CHANNEL, queue, amqp_empty_bytes, 0, 0, 1, amqp_empty_table);
                amqp_rpc_reply_t rr = amqp_get_rpc_reply(conn);
                if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                        format_rpc_reply(err, errlen, "basic.consume", rr);
                        r = -EPROTO;
                }
        }
        amqp_bytes_free(queue);
        return r;
}

static int attempt_setup(BrokerAttempt *a, amqp_connection_state_t conn, char *err, size_t errlen) {
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
        amqp_channel_open(conn, BROKER_CHANNEL);
        CHECK_RPC(conn, "channel.open", err, errlen);
        r = setup_exchange(conn, p->exchange, err, errlen);
        if (r < 0)
                return r;
        r = setup_consumer(conn, p->exchange, err, errlen);
        if (r < 0)
                return r;
        amqp_channel_open(conn, BROKER_PUBLISH_CHANNEL);
        CHECK_RPC(conn, "channel.open (publishing)", err, errlen);
        amqp_confirm_select(conn, BROKER_PUBLISH_CHANNEL);
        CHECK_RPC(conn, "confirm.select", err, errlen);
        return 0;
}

static void *attempt_run(void *userdata) {
        BrokerAttempt *a = userdata;
        char reason[BROKER_REASON_MAX] = "out of memory";
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
        broker_attempt_unref(a);
        workers_add(-1);
        return NULL;
}

/* ---- starting a worker ---- */

int broker_attempt_spawn(BrokerAttempt *a) {
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
