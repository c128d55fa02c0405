/* The notify listener: libmicrohttpd in external-epoll mode on sd-event.
 * What a request gets is decided by the pure logic in notify-request.c;
 * the connection limits live in notify-conn.c, the token buckets and the
 * log limiter in ratelimit.c. This file is the glue between them and MHD.
 *
 * MHD owns an epoll fd; we watch that fd as one I/O source and run
 * MHD_run() whenever it is readable or MHD's own timeout (from
 * MHD_get_timeout) expires. Everything runs on the manager's loop, so a
 * request never runs concurrently with synchronization; the source has a
 * low priority so a flood of requests cannot starve the poll round.
 *
 * Defences, outermost first:
 *   - peers outside [notify] allow are closed in the accept policy
 *     callback, before a byte is read;
 *   - per-peer and total connection limits, both ours and both evicting
 *     the oldest idle connection (one between requests) before refusing,
 *     so idle sockets cannot lock a peer or everyone out; MHD's own limits
 *     sit above ours as a backstop only;
 *   - MHD's idle timeout plus our whole-request deadline against slow
 *     clients that trickle one byte at a time;
 *   - a small per-connection memory pool and a 4096-byte body cap that is
 *     counted as the body arrives (chunked bodies too);
 *   - a token bucket for authenticated requests, and one for failed
 *     authentications that answers 429 before the token is looked at;
 *   - rate-limited logging of rejections, so a flood cannot flood the
 *     journal either. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>

#include "atomic_file.h"
#include "log.h"
#include "macro.h"
#include "notify-conn.h"
#include "notify.h"
#include "ratelimit.h"
#include "util.h"

/* MHD's own hard limit sits a little above ours: evicted connections are
 * closed on the next MHD_run, and new ones may arrive meanwhile. */
#define NOTIFY_MHD_CONNECTION_SLACK 16
/* MHD counts per address before our accept callback runs, so its limit
 * must sit well above ours (evicted connections still count there until
 * its next run) or it would refuse where we would evict. */
#define NOTIFY_MHD_PER_PEER_BACKSTOP 32
#define NOTIFY_IDLE_TIMEOUT_SEC      5
#define NOTIFY_MEMORY_LIMIT          (16 * 1024)
#define NOTIFY_LISTEN_BACKLOG        256
/* MHD's timeout is often 0 ("run again at once": data left in a buffer);
 * sd-event's default accuracy (250 ms) would stall every such step. */
#define NOTIFY_TIMER_ACCURACY_USEC USEC_PER_MSEC
#define NOTIFY_TLS_FILE_MAX        (64 * 1024)

/* Token bucket for authenticated notify/status requests. */
#define NOTIFY_RATE_PER_SEC 20
#define NOTIFY_RATE_BURST   40
/* Token bucket for failed authentications (401s), one per peer: a peer
 * that keeps guessing is slowed down, and never locks out another peer
 * (contract section 6). */
#define NOTIFY_AUTH_FAIL_PER_SEC 5
#define NOTIFY_AUTH_FAIL_BURST   10

/* Logging of rejections and acceptances: at most this many lines per
 * window, then one summary line. */
#define LOG_WINDOW_USEC  (10 * USEC_PER_SEC)
#define LOG_WINDOW_LINES 10

#define PEER_MAX (INET6_ADDRSTRLEN + 1)

/* One request, from its headers to MHD's completed notification. */
typedef struct Req {
        char *body;
        size_t len;
        bool too_large;
        size_t discarded; /* bytes past the cap, thrown away */
        bool answered;    /* a response was queued before the body ended */
} Req;

struct NotifyServer {
        sd_event *event;
        struct MHD_Daemon *mhd;
        sd_event_source *io, *timer;
        bool activated; /* the listening socket came from systemd */
        /* The control socket (AF_UNIX): its file's mode and group admit
         * the peer, so no allow list and no token; the rest applies. */
        bool local;

        NotifyCallbacks cb;
        void *userdata;

        char *token;
        Cidr allow[CONFIG_MAX_ALLOW];
        size_t n_allow;

        char *tls_cert_pem, *tls_key_pem;

        NotifyConns conns; /* conns.tls: the listener speaks TLS */

        /* Notifies and status reads have a bucket each, so a notify flood
         * never locks support out of `dsm-agent-syncctl status`. Failed
         * authentications have one per peer, so guessing is slow. */
        RateLimit notify_bucket, status_bucket;
        RateLimitTable auth_fail;

        RateLog log_rejected, log_accepted;
};

/* ---- logging, limited -------------------------------------------- */

static uint64_t loop_now_usec(NotifyServer *s) {
        uint64_t t = 0;

        if (sd_event_now(s->event, CLOCK_MONOTONIC, &t) < 0)
                t = now_usec(CLOCK_MONOTONIC);
        return t;
}

/* True when one more line may be logged in the current window. When a
 * window ends with lines suppressed, says so once. */
static bool ratelog_ok(NotifyServer *s, RateLog *rl, const char *mid, const char *what) {
        uint64_t suppressed;
        bool ok = ratelog_check(rl, loop_now_usec(s), &suppressed);

        if (suppressed > 0)
                log_struct(LOG_NOTICE, 0, mid, NULL, "notify: suppressed %" PRIu64 " %s log lines",
                           suppressed, what);
        return ok;
}

static void log_rejected(NotifyServer *s, int prio, const char *peer, const char *reason) {
        LogFields f = {.peer = peer, .reason = reason};

        if (ratelog_ok(s, &s->log_rejected, MID_NOTIFY_REJECTED, "rejected-request"))
                log_struct(prio, 0, MID_NOTIFY_REJECTED, &f, "notify: rejected request from %s: %s", peer,
                           reason);
}

static void log_accepted(NotifyServer *s, const char *peer, const char *summary) {
        LogFields f = {.peer = peer, .reason = summary};

        if (ratelog_ok(s, &s->log_accepted, MID_NOTIFY_ACCEPTED, "accepted-notify"))
                log_struct(LOG_INFO, 0, MID_NOTIFY_ACCEPTED, &f, "notify: accepted from %s: %s", peer,
                           summary);
}

static void mhd_logger(void *cls, const char *fmt, va_list ap) _printf_(2, 0);
static void mhd_logger(void *cls, const char *fmt, va_list ap) {
        /* MHD reports client misbehaviour here too: debug only. */
        log_structv(LOG_DEBUG, 0, NULL, NULL, fmt, ap);
}

/* ---- the token buckets --------------------------------------------- */

/* 0 when b has a token now, else the whole seconds (at least 1) until it
 * has: the Retry-After of a 429. */
static unsigned bucket_wait(NotifyServer *s, RateLimit *b) {
        uint64_t now = loop_now_usec(s), wait = ratelimit_ready_at(b, now) - now;

        if (wait == 0)
                return 0;
        return wait <= USEC_PER_SEC ? 1 : (unsigned) (wait / USEC_PER_SEC) + 1;
}

/* Takes one token; on failure returns false and the seconds until one
 * is back. */
static bool bucket_take(NotifyServer *s, RateLimit *b, unsigned *ret_retry_after) {
        unsigned wait = bucket_wait(s, b);

        if (wait > 0) {
                *ret_retry_after = wait;
                return false;
        }
        return ratelimit_take(b, loop_now_usec(s));
}

/* ---- connections ------------------------------------------------- */

static void on_connection(void *cls, struct MHD_Connection *connection, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
        NotifyServer *s = cls;
        NotifyConn *c = *socket_context;

        if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
                const union MHD_ConnectionInfo *ci =
                        MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
                const union MHD_ConnectionInfo *ai =
                        MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
                int fd = ci ? ci->connect_fd : -1;

                if (s->local) {
                        char peer[PEER_MAX];

                        notify_local_peer_string(fd, peer, sizeof(peer));
                        log_debug("notify: control socket connection from %s", peer);
                }
                if (notify_test_connection_fd)
                        fd = notify_test_connection_fd(fd);
                /* NULL (no memory): untracked, still bounded by MHD's limit. */
                *socket_context =
                        notify_conns_add(&s->conns, fd, ai ? ai->client_addr : NULL, loop_now_usec(s));
        } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED && c) {
                notify_conns_remove(&s->conns, c);
                *socket_context = NULL;
        }
}

static NotifyConn *conn_of(struct MHD_Connection *connection) {
        const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(connection, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

        return ci ? ci->socket_context : NULL;
}

static enum MHD_Result on_accept(void *cls, const struct sockaddr *addr, socklen_t addrlen) {
        NotifyServer *s = cls;
        char peer[PEER_MAX];
        struct in6_addr key;
        const char *refused;

        /* Local peers are one peer for the connection limits. */
        if (s->local)
                key = in6addr_any;
        if (!s->local &&
            (!addr || !cidr_list_contains(s->allow, s->n_allow, addr) || !notify_peer_key(addr, &key)))
                refused = "peer not allowed";
        else
                refused = notify_conns_admit(&s->conns, &key);
        if (refused) {
                notify_peer_string(addr, peer, sizeof(peer));
                log_rejected(s, LOG_NOTICE, peer, refused);
                return MHD_NO;
        }
        return MHD_YES;
}

/* ---- responses --------------------------------------------------- */

/* Refusals by reason, for every listener of the process: a listener is
 * made anew on a SIGHUP, and a counter must not go back to 0 then. The
 * loop is single-threaded. */
static uint64_t rejected_total[METRICS_REJECT_N];

void notify_rejected_totals(uint64_t ret[METRICS_REJECT_N]) {
        memcpy(ret, rejected_total, sizeof(rejected_total));
}

static void count_rejected(unsigned status) {
        int i = metrics_reject_of_status(status);

        if (i >= 0)
                rejected_total[i]++;
}

static enum MHD_Result respond_typed(struct MHD_Connection *connection, unsigned status, char *body,
                                     const char *allow, unsigned retry_after, const char *type) {
        struct MHD_Response *resp;
        enum MHD_Result ret;
        char buf[16];

        if (!body)
                body = strdup("{\"error\":\"out of memory\"}");
        if (!body)
                return MHD_NO;
        resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
                free(body);
                return MHD_NO;
        }
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
        if (allow)
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
        if (retry_after > 0) {
                (void) snprintf(buf, sizeof(buf), "%u", retry_after);
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, buf);
        }
        /* The rest of an oversized body is not read: the connection cannot
         * carry another request. */
        if (status == 413)
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
        ret = MHD_queue_response(connection, status, resp);
        MHD_destroy_response(resp);
        return ret;
}

static enum MHD_Result respond(struct MHD_Connection *connection, unsigned status, char *body,
                               const char *allow, unsigned retry_after) {
        return respond_typed(connection, status, body, allow, retry_after, "application/json");
}

static char *take_body(NotifyReply *r) {
        char *b = r->body;

        r->body = NULL;
        return b;
}

static void connection_peer(NotifyServer *s, struct MHD_Connection *connection, char *buf, size_t size) {
        const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(connection, s->local ? MHD_CONNECTION_INFO_CONNECTION_FD
                                                             : MHD_CONNECTION_INFO_CLIENT_ADDRESS);

        if (s->local)
                notify_local_peer_string(ci ? ci->connect_fd : -1, buf, size);
        else
                notify_peer_string(ci ? ci->client_addr : NULL, buf, size);
}

/* Answers what the pure logic decided alone (refusals, /healthz), logging
 * what an operator wants to see. */
static enum MHD_Result respond_plain(NotifyServer *s, struct MHD_Connection *connection, NotifyReply *r) {
        char peer[PEER_MAX];

        connection_peer(s, connection, peer, sizeof(peer));
        count_rejected(r->status);
        if (r->status == 401) {
                /* Spends a token of the failure bucket; when that was
                 * the last, the next guesses get 429 unread. */
                (void) ratelimit_take(ratelimit_table_get(&s->auth_fail, peer, loop_now_usec(s)),
                                      loop_now_usec(s));
                log_rejected(s, LOG_WARNING, peer, r->reason);
        } else if (r->status == 400 || r->status == 413 || r->status == 429)
                log_rejected(s, LOG_NOTICE, peer, r->reason);
        else if (r->status >= 400)
                log_debug("notify: %u for %s: %s", r->status, peer, r->reason);
        return respond(connection, r->status, take_body(r), r->allow, r->retry_after);
}

static enum MHD_Result respond_action(NotifyServer *s, struct MHD_Connection *connection, NotifyReply *r) {
        char peer[PEER_MAX];
        unsigned retry_after = 0;

        connection_peer(s, connection, peer, sizeof(peer));
        /* A scrape shares the status bucket: both are reads. */
        RateLimit *b = r->route == NOTIFY_ROUTE_NOTIFY || r->route == NOTIFY_ROUTE_ENDPOINTS
                               ? &s->notify_bucket
                               : &s->status_bucket;
        if (!bucket_take(s, b, &retry_after)) {
                count_rejected(429);
                log_rejected(s, LOG_NOTICE, peer, "rate limited");
                return respond(connection, 429, strdup("{\"error\":\"too many requests\"}"), NULL,
                               retry_after);
        }
        if (r->route == NOTIFY_ROUTE_METRICS) {
                char *text = s->cb.metrics ? s->cb.metrics(s, s->userdata) : NULL;

                if (!text)
                        return respond(connection, 503, strdup("{\"error\":\"metrics unavailable\"}"), NULL,
                                       0);
                return respond_typed(connection, 200, text, NULL, 0, METRICS_CONTENT_TYPE);
        }
        if (r->route == NOTIFY_ROUTE_STATUS) {
                json_t *doc = s->cb.status ? s->cb.status(s, s->userdata) : NULL;

                if (!doc)
                        return respond(connection, 503, strdup("{\"error\":\"status unavailable\"}"), NULL,
                                       0);
                char *body = json_dumps(doc, JSON_COMPACT);

                json_decref(doc);
                return respond(connection, 200, body, NULL, 0);
        }
        log_accepted(s, peer, r->summary);
        if (s->cb.notify)
                s->cb.notify(s, peer, r->summary, s->userdata);
        return respond(connection, r->status, take_body(r), NULL, 0);
}

static void request_init(NotifyServer *s, struct MHD_Connection *connection, const char *url,
                         const char *method, NotifyRequest *req) {
        const char *cl =
                MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        char *end = NULL;
        unsigned long long v;

        *req = (NotifyRequest){
                .method = method,
                .path = url,
                .authorization = MHD_lookup_connection_value(connection, MHD_HEADER_KIND,
                                                             MHD_HTTP_HEADER_AUTHORIZATION),
                .token = s->token,
                .trusted = s->local,
                .content_length = UINT64_MAX,
        };
        if (cl) {
                errno = 0;
                v = strtoull(cl, &end, 10);
                if (errno == 0 && end != cl && *end == 0)
                        req->content_length = v;
        }
}

/* First call of a request: headers only. */
static enum MHD_Result request_begin(NotifyServer *s, struct MHD_Connection *connection, const char *url,
                                     const char *method, void **con_cls) {
        NotifyRequest req;
        NotifyReply r;
        NotifyConn *c = conn_of(connection);
        char peer[PEER_MAX];
        Req *q;
        enum MHD_Result ret;

        q = calloc(1, sizeof(*q));
        if (!q)
                return MHD_NO;
        *con_cls = q;
        if (c)
                notify_conn_busy(c);

        request_init(s, connection, url, method, &req);
        req.headers_only = true;
        connection_peer(s, connection, peer, sizeof(peer));
        req.auth_retry_after = bucket_wait(s, ratelimit_table_get(&s->auth_fail, peer, loop_now_usec(s)));
        notify_handle_request(&req, &r);
        if (r.status == 0)
                return MHD_YES; /* read the body */
        q->answered = true;
        ret = respond_plain(s, connection, &r);
        notify_reply_done(&r);
        return ret;
}

static enum MHD_Result request_body(Req *q, const char *data, size_t *size) {
        if (q->answered) {
                *size = 0; /* MHD closes the connection after the answer */
                return MHD_YES;
        }
        if (q->too_large) {
                /* libmicrohttpd 0.9.75 queues a response only when the
                 * headers are in or the whole body is (MHD_queue_response
                 * refuses in the body-reading states), and a chunked body
                 * announces no size with its headers. So a chunked body
                 * over the cap is drained, never stored, to its end and
                 * then answered 413 (Connection: close). Draining is
                 * bounded in time, not bytes: by the whole-request
                 * deadline and MHD's idle timeout, after which the
                 * connection is closed without an answer; returning MHD_NO
                 * earlier would also close it without one. */
                q->discarded += *size;
                *size = 0;
                return MHD_YES;
        }
        if (q->len + *size > NOTIFY_BODY_MAX) {
                q->too_large = true;
                q->discarded = q->len + *size - NOTIFY_BODY_MAX;
                *size = 0;
                return MHD_YES;
        }
        if (!q->body) {
                q->body = malloc(NOTIFY_BODY_MAX);
                if (!q->body)
                        return MHD_NO;
        }
        memcpy(q->body + q->len, data, *size);
        q->len += *size;
        *size = 0;
        return MHD_YES;
}

static enum MHD_Result request_end(NotifyServer *s, struct MHD_Connection *connection, const char *url,
                                   const char *method, Req *q) {
        NotifyRequest req;
        NotifyReply r;
        enum MHD_Result ret;

        if (q->answered)
                return MHD_YES;
        request_init(s, connection, url, method, &req);
        req.body = q->body;
        req.body_len = q->len;
        req.body_too_large = q->too_large;
        notify_handle_request(&req, &r);
        q->answered = true;
        ret = r.run_action ? respond_action(s, connection, &r) : respond_plain(s, connection, &r);
        notify_reply_done(&r);
        return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *connection, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls) {
        NotifyServer *s = cls;

        if (!*con_cls)
                return request_begin(s, connection, url, method, con_cls);
        if (*upload_data_size > 0)
                return request_body(*con_cls, upload_data, upload_data_size);
        return request_end(s, connection, url, method, *con_cls);
}

static void on_completed(void *cls, struct MHD_Connection *connection, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
        NotifyServer *s = cls;
        Req *q = *con_cls;
        NotifyConn *c = conn_of(connection);

        if (q) {
                free(q->body);
                free(q);
                *con_cls = NULL;
        }
        /* Keep-alive: idle again, and its deadline restarts. */
        if (c)
                notify_conns_request_done(&s->conns, c, loop_now_usec(s));
}

/* ---- the event loop glue ------------------------------------------- */

static int on_timer(sd_event_source *es, uint64_t usec, void *userdata);

static void notify_rearm(NotifyServer *s) {
        MHD_UNSIGNED_LONG_LONG ms;
        uint64_t now = loop_now_usec(s), next = notify_conns_sweep(&s->conns, now);
        int r;

        if (MHD_get_timeout(s->mhd, &ms) == MHD_YES) {
                uint64_t t = now + (uint64_t) ms * USEC_PER_MSEC;
                if (t < next)
                        next = t;
        }
        if (next == USEC_INFINITY) {
                (void) sd_event_source_set_enabled(s->timer, SD_EVENT_OFF);
                return;
        }
        r = sd_event_source_set_time(s->timer, next);
        if (r >= 0)
                r = sd_event_source_set_enabled(s->timer, SD_EVENT_ONESHOT);
        if (r < 0)
                log_warning_errno(r, "notify: cannot arm the timer");
}

static void notify_run(NotifyServer *s) {
        if (MHD_run(s->mhd) != MHD_YES)
                log_debug("notify: MHD_run failed");
        notify_rearm(s);
}

static int on_io(sd_event_source *es, int fd, uint32_t revents, void *userdata) {
        notify_run(userdata);
        return 0;
}

static int on_timer(sd_event_source *es, uint64_t usec, void *userdata) {
        notify_run(userdata);
        return 0;
}

/* ---- setup ------------------------------------------------------- */

static int listen_socket_new(const Config *cfg, int *ret) {
        _cleanup_(closep) int fd = -1;
        const struct sockaddr *sa = (const struct sockaddr *) &cfg->notify_addr;
        int one = 1, zero = 0;

        fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(negative_errno(), "notify: cannot create a socket for %s",
                                       cfg->notify_listen);
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
                return log_error_errno(negative_errno(), "notify: SO_REUSEADDR");
        /* "[::]" serves IPv4 too, whatever net.ipv6.bindv6only says. */
        if (sa->sa_family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) < 0)
                return log_error_errno(negative_errno(), "notify: IPV6_V6ONLY");
        if (bind(fd, sa, cfg->notify_addrlen) < 0)
                return log_error_errno(negative_errno(), "notify: cannot listen on %s", cfg->notify_listen);
        if (listen(fd, NOTIFY_LISTEN_BACKLOG) < 0)
                return log_error_errno(negative_errno(), "notify: cannot listen on %s", cfg->notify_listen);
        *ret = fd;
        fd = -1;
        return 0;
}

/* The socket systemd passed, if any. It stays open across a listener
 * restart: it is the process's, not one server's. */
static int activated_socket(int *ret) {
        int n = sd_listen_fds(0);

        if (n <= 0)
                return 0;
        if (n > 1)
                log_warning("notify: %d sockets passed by systemd, using the first", n);
        if (sd_is_socket(SD_LISTEN_FDS_START, AF_UNSPEC, SOCK_STREAM, 1) <= 0)
                return log_error_errno(-ENOTSOCK, "notify: the passed fd is not a listening stream socket");
        if (fcntl(SD_LISTEN_FDS_START, F_SETFL, fcntl(SD_LISTEN_FDS_START, F_GETFL) | O_NONBLOCK) < 0)
                return log_error_errno(negative_errno(),
                                       "notify: cannot make the passed socket non-blocking");
        *ret = SD_LISTEN_FDS_START;
        return 1;
}

/* A certificate or key file, whole. An empty one is refused here (as too
 * large a one is), not by the TLS library later. */
static int read_pem(const char *path, char **ret) {
        char *buf;
        size_t len;
        int r;

        r = read_file_full(path, NOTIFY_TLS_FILE_MAX, &buf, &len);
        if (r < 0)
                return r;
        if (len == 0) {
                free(buf);
                return -EFBIG;
        }
        *ret = buf;
        return 0;
}

static int load_tls(NotifyServer *s, const Config *cfg) {
        int r;

        if (!cfg->tls_cert || !cfg->tls_key)
                return 0;
        if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
                return log_error_errno(-EOPNOTSUPP, "notify: libmicrohttpd was built without TLS");
        r = read_pem(cfg->tls_cert, &s->tls_cert_pem);
        if (r < 0)
                return log_error_errno(r, "notify: cannot read tls_cert %s", cfg->tls_cert);
        r = read_pem(cfg->tls_key, &s->tls_key_pem);
        if (r < 0)
                return log_error_errno(r, "notify: cannot read tls_key %s", cfg->tls_key);
        return 1;
}

static int start_mhd(NotifyServer *s, int listen_fd, bool tls) {
        unsigned flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG | (tls ? MHD_USE_TLS : 0);
        const union MHD_DaemonInfo *info;
        struct MHD_OptionItem tls_opts[] = {
                {MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls_cert_pem},
                {MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls_key_pem},
                {MHD_OPTION_END, 0, NULL},
        };

        s->mhd = MHD_start_daemon(
                flags, 0, on_accept, s, on_request, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, s,
                MHD_OPTION_LISTEN_SOCKET, listen_fd, MHD_OPTION_CONNECTION_LIMIT,
                (unsigned) (NOTIFY_MAX_CONNECTIONS + NOTIFY_MHD_CONNECTION_SLACK),
                MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned) NOTIFY_MHD_PER_PEER_BACKSTOP,
                MHD_OPTION_CONNECTION_TIMEOUT, (unsigned) NOTIFY_IDLE_TIMEOUT_SEC,
                MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t) NOTIFY_MEMORY_LIMIT,
                MHD_OPTION_NOTIFY_CONNECTION, on_connection, s, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                MHD_OPTION_ARRAY, tls ? tls_opts : tls_opts + 2, MHD_OPTION_END);
        if (!s->mhd)
                return log_error_errno(-EIO, "notify: cannot start the HTTP server");

        info = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_EPOLL_FD);
        if (!info)
                return log_error_errno(-EIO, "notify: no epoll fd from the HTTP server");
        return info->epoll_fd;
}

static int copy_settings(NotifyServer *s, const Config *cfg) {
        char *token = NULL;

        if (cfg->notify_token && cfg->notify_token[0]) {
                token = strdup(cfg->notify_token);
                if (!token)
                        return -ENOMEM;
        } else
                log_warning("notify: no token_file set: every request but /healthz is refused");
        secret_free(s->token);
        s->token = token;
        memcpy(s->allow, cfg->allow, sizeof(s->allow));
        s->n_allow = cfg->n_allow;
        return 0;
}

static NotifyServer *server_alloc(sd_event *e, const NotifyCallbacks *cb, void *userdata) {
        NotifyServer *s = calloc(1, sizeof(*s));

        if (!s)
                return NULL;
        s->event = sd_event_ref(e);
        s->cb = cb ? *cb : (NotifyCallbacks){};
        s->userdata = userdata;
        s->notify_bucket = s->status_bucket =
                ratelimit_init(NOTIFY_RATE_BURST, NOTIFY_RATE_PER_SEC, loop_now_usec(s));
        s->auth_fail = ratelimit_table_init(NOTIFY_AUTH_FAIL_BURST, NOTIFY_AUTH_FAIL_PER_SEC);
        s->log_rejected = s->log_accepted = ratelog_init(LOG_WINDOW_USEC, LOG_WINDOW_LINES);
        return s;
}

/* Serves the listening socket fd on the loop. On failure fd is closed,
 * unless it is systemd's. */
static int server_attach(NotifyServer *s, int fd, bool tls) {
        int epfd, r;

        epfd = r = start_mhd(s, fd, tls);
        if (r < 0) {
                if (!s->activated && !s->mhd)
                        close(fd);
                return r;
        }
        r = sd_event_add_io(s->event, &s->io, epfd, EPOLLIN, on_io, s);
        if (r >= 0)
                r = sd_event_add_time(s->event, &s->timer, CLOCK_MONOTONIC, USEC_INFINITY,
                                      NOTIFY_TIMER_ACCURACY_USEC, on_timer, s);
        if (r >= 0)
                r = sd_event_source_set_priority(s->io, SD_EVENT_PRIORITY_IDLE - 10);
        if (r >= 0)
                r = sd_event_source_set_priority(s->timer, SD_EVENT_PRIORITY_IDLE - 10);
        if (r < 0)
                return log_error_errno(r, "notify: cannot add to the event loop");
        (void) sd_event_source_set_description(s->io, s->local ? "control-io" : "notify-io");
        (void) sd_event_source_set_description(s->timer, s->local ? "control-timer" : "notify-timer");
        notify_rearm(s);
        return 0;
}

int notify_server_new(sd_event *e, const Config *cfg, const NotifyCallbacks *cb, void *userdata,
                      NotifyServer **ret) {
        NotifyServer *s;
        int fd = -1, r, tls;

        r = activated_socket(&fd);
        if (r < 0)
                return r;
        if (r == 0 && !cfg->notify_enabled) {
                *ret = NULL;
                return 0;
        }

        s = server_alloc(e, cb, userdata);
        if (!s)
                return log_error_errno(-ENOMEM, "notify: out of memory");
        s->activated = r > 0;

        r = copy_settings(s, cfg);
        if (r < 0)
                goto fail;
        tls = r = load_tls(s, cfg);
        if (r < 0)
                goto fail;
        s->conns.tls = tls > 0;
        if (!s->activated) {
                r = listen_socket_new(cfg, &fd);
                if (r < 0)
                        goto fail;
        }
        r = server_attach(s, fd, tls > 0);
        if (r < 0)
                goto fail;

        log_info("notify: listening on %s%s",
                 s->activated ? "the socket passed by systemd" : cfg->notify_listen,
                 tls > 0 ? " (https)" : "");
        *ret = s;
        return 0;
fail:
        notify_server_free(s);
        return r;
}

int notify_server_new_local(sd_event *e, int fd, const NotifyCallbacks *cb, void *userdata,
                            NotifyServer **ret) {
        NotifyServer *s = server_alloc(e, cb, userdata);
        int r;

        if (!s) {
                close(fd);
                return log_error_errno(-ENOMEM, "notify: out of memory");
        }
        s->local = true;
        r = server_attach(s, fd, false);
        if (r < 0) {
                notify_server_free(s);
                return r;
        }
        *ret = s;
        return 0;
}

NotifyServer *notify_server_free(NotifyServer *s) {
        if (!s)
                return NULL;
        s->io = sd_event_source_disable_unref(s->io);
        s->timer = sd_event_source_disable_unref(s->timer);
        if (s->mhd) {
                /* Keep systemd's socket open for the next server. */
                if (s->activated)
                        (void) MHD_quiesce_daemon(s->mhd);
                MHD_stop_daemon(s->mhd);
        }
        secret_free(s->token);
        secret_free(s->tls_key_pem);
        free(s->tls_cert_pem);
        sd_event_unref(s->event);
        free(s);
        return NULL;
}

bool notify_server_needs_restart(const Config *old_cfg, const Config *new_cfg) {
        if (old_cfg->notify_enabled != new_cfg->notify_enabled)
                return true;
        if (!new_cfg->notify_enabled)
                return false;
        if (old_cfg->notify_addrlen != new_cfg->notify_addrlen ||
            memcmp(&old_cfg->notify_addr, &new_cfg->notify_addr, new_cfg->notify_addrlen) != 0)
                return true;
        if (!streq_ptr(old_cfg->tls_cert, new_cfg->tls_cert) ||
            !streq_ptr(old_cfg->tls_key, new_cfg->tls_key))
                return true;
        /* The same files may hold a renewed certificate: reload on every
         * SIGHUP while TLS is on. */
        return new_cfg->tls_cert != NULL;
}

int notify_server_reconfigure(NotifyServer *s, const Config *cfg) {
        int r;

        if (!s)
                return 0;
        r = copy_settings(s, cfg);
        if (r < 0)
                return log_error_errno(r, "notify: cannot apply the new settings");
        return 0;
}
