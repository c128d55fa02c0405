/* The notify listener: libmicrohttpd in external-epoll mode on sd-event.
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
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/tcp.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#include "log.h"
#include "macro.h"
#include "notify.h"
#include "provider.h"

#define NOTIFY_MAX_CONNECTIONS 64
/* MHD's own hard limit sits a little above ours: evicted connections are
 * closed on the next MHD_run, and new ones may arrive meanwhile. */
#define NOTIFY_MHD_CONNECTION_SLACK 16
#define NOTIFY_PER_PEER_CONNECTIONS 8
/* MHD counts per address before our accept callback runs, so its limit
 * must sit well above ours (evicted connections still count there until
 * its next run) or it would refuse where we would evict. */
#define NOTIFY_MHD_PER_PEER_BACKSTOP 32
/* Over TLS the handshake bytes hide whether a request has begun: such a
 * connection counts as idle once nothing has arrived for this long. */
#define NOTIFY_TLS_QUIET_MSEC   1000
#define NOTIFY_IDLE_TIMEOUT_SEC 5
/* MHD's timeout restarts at every byte; this one does not. */
#define NOTIFY_REQUEST_DEADLINE_USEC (10 * USEC_PER_SEC)
#define NOTIFY_MEMORY_LIMIT          (16 * 1024)
#define NOTIFY_LISTEN_BACKLOG        256
/* MHD's timeout is often 0 ("run again at once": data left in a buffer);
 * sd-event's default accuracy (250 ms) would stall every such step. */
#define NOTIFY_TIMER_ACCURACY_USEC USEC_PER_MSEC
#define NOTIFY_TLS_FILE_MAX        (64 * 1024)

typedef struct TokenBucket {
        double tokens; /* available */
        double rate;   /* tokens per second */
        double burst;  /* at most this many */
        uint64_t usec; /* CLOCK_MONOTONIC of the last refill */
} TokenBucket;

/* Token bucket for authenticated notify/status requests. */
#define NOTIFY_RATE_PER_SEC 20
#define NOTIFY_RATE_BURST   40
/* Token bucket for failed authentications (401s), shared by all peers. */
#define NOTIFY_AUTH_FAIL_PER_SEC 5
#define NOTIFY_AUTH_FAIL_BURST   10

/* Logging of rejections and acceptances: at most this many lines per
 * window, then one summary line. */
#define LOG_WINDOW_USEC  (10 * USEC_PER_SEC)
#define LOG_WINDOW_LINES 10

#define PEER_MAX (INET6_ADDRSTRLEN + 1)

typedef struct RateLog {
        uint64_t window_start;
        unsigned lines;
        uint64_t suppressed;
} RateLog;

/* One TCP connection, from MHD's STARTED to CLOSED notification. */
typedef struct Conn {
        struct Conn *prev, *next; /* oldest first */
        int fd;                   /* -1 when MHD did not say: never evicted by us */
        struct in6_addr peer;     /* IPv4 as v4-mapped */
        bool busy;                /* a request's headers are in; not evictable */
        bool evicted;             /* shut down by us, MHD closes it on its next run */
        uint64_t since_usec;      /* CLOCK_MONOTONIC: accept, or end of the last request */
        uint64_t rx_idle;         /* bytes received when it last became idle */
} Conn;

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

        NotifyCallbacks cb;
        void *userdata;

        char *token;
        Cidr allow[CONFIG_MAX_ALLOW];
        size_t n_allow;

        char *tls_cert_pem, *tls_key_pem;

        bool tls;

        Conn *conns_head, *conns_tail;
        unsigned n_conns, n_evicted;

        /* Notifies and status reads have a bucket each, so a notify flood
         * never locks support out of `dsm-agent-syncctl status`. Failed
         * authentications have their own, so guessing is slow. */
        TokenBucket notify_bucket, status_bucket, auth_fail_bucket;

        RateLog log_rejected, log_accepted;
};

/* ---- the pure request logic ---------------------------------------- */

static const char *const allow_post = "POST";
static const char *const allow_patch = "PATCH";
static const char *const allow_get = "GET, HEAD";

bool notify_auth_ok(const char *header, const char *token) {
        static const char scheme[] = "Bearer ";
        const char *given;
        size_t glen, tlen, n;
        unsigned char diff;

        if (!header || !token || token[0] == 0)
                return false;
        if (strncasecmp(header, scheme, strlen(scheme)) != 0)
                return false;
        given = header + strlen(scheme);
        while (*given == ' ')
                given++;

        /* Walk the longer of both strings in full: no early exit, so the
         * time does not tell how much of a guess was right. */
        glen = strlen(given);
        tlen = strlen(token);
        n = glen > tlen ? glen : tlen;
        diff = glen != tlen;
        for (size_t i = 0; i < n; i++) {
                unsigned char a = i < glen ? (unsigned char) given[i] : 0;
                unsigned char b = i < tlen ? (unsigned char) token[i] : 0;
                diff |= a ^ b;
        }
        return diff == 0;
}

static char *json_text(json_t *j) {
        char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        return s;
}

static void reply_set(NotifyReply *r, unsigned status, const char *key, const char *msg) {
        r->status = status;
        free(r->body);
        r->body = json_text(json_pack("{s:s}", key, msg));
}

static void reply_error(NotifyReply *r, unsigned status, const char *reason) {
        reply_set(r, status, "error", reason);
        (void) strscpy(r->reason, sizeof(r->reason), reason);
}

static char *take_body(NotifyReply *r) {
        char *b = r->body;

        r->body = NULL;
        return b;
}

/* Copies s for a log line: printable ASCII only, bounded. */
static void sanitize(char *dst, size_t size, const char *s, size_t max) {
        size_t j = 0;

        for (size_t i = 0; s[i] && i < max && j + 1 < size; i++) {
                unsigned char c = (unsigned char) s[i];
                dst[j++] = (c >= 0x20 && c < 0x7f && c != '"') ? (char) c : '?';
        }
        if (j < size)
                dst[j] = 0;
}

static NotifyRoute route_of(const char *path) {
        if (!path)
                return NOTIFY_ROUTE_NONE;
        if (strcmp(path, "/v1/notify") == 0)
                return NOTIFY_ROUTE_NOTIFY;
        if (strcmp(path, "/onboarding/api/agent/rabbitmq/endpoints") == 0)
                return NOTIFY_ROUTE_ENDPOINTS;
        if (strcmp(path, "/v1/status") == 0)
                return NOTIFY_ROUTE_STATUS;
        if (strcmp(path, "/healthz") == 0)
                return NOTIFY_ROUTE_HEALTH;
        return NOTIFY_ROUTE_NONE;
}

/* Returns the Allow header when method is wrong for route, NULL when right. */
static const char *method_mismatch(NotifyRoute route, const char *method) {
        const char *m = method ? method : "";

        switch (route) {
        case NOTIFY_ROUTE_NOTIFY:
                return strcmp(m, "POST") == 0 ? NULL : allow_post;
        case NOTIFY_ROUTE_ENDPOINTS:
                return strcmp(m, "PATCH") == 0 ? NULL : allow_patch;
        case NOTIFY_ROUTE_STATUS:
        case NOTIFY_ROUTE_HEALTH:
                return strcmp(m, "GET") == 0 || strcmp(m, "HEAD") == 0 ? NULL : allow_get;
        default:
                return NULL;
        }
}

static bool body_blank(const char *body, size_t len) {
        for (size_t i = 0; i < len; i++)
                if (!strchr(" \t\r\n", body[i]) || body[i] == 0)
                        return false;
        return true;
}

/* Parses the body as one JSON object. NULL with r->status 400 otherwise. */
static json_t *parse_object(const NotifyRequest *req, NotifyReply *r) {
        json_error_t err;
        json_t *j;

        j = json_loadb(req->body ? req->body : "", req->body_len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY,
                       &err);
        if (!j) {
                char msg[NOTIFY_ERROR_MAX];
                char text[96];

                sanitize(text, sizeof(text), err.text, 80);
                (void) snprintf(msg, sizeof(msg), "body is not valid JSON: %s", text);
                reply_error(r, 400, msg);
                return NULL;
        }
        if (!json_is_object(j)) {
                json_decref(j);
                reply_error(r, 400, "body is not a JSON object");
                return NULL;
        }
        return j;
}

static bool check_notify_body(const NotifyRequest *req, NotifyReply *r) {
        json_t *j, *reason, *epoch, *primary;
        char text[129];
        size_t n = 0;

        if (body_blank(req->body, req->body_len)) {
                (void) strscpy(r->summary, sizeof(r->summary), "empty body");
                return true;
        }
        j = parse_object(req, r);
        if (!j)
                return false;

        reason = json_object_get(j, "reason");
        epoch = json_object_get(j, "epoch");
        primary = json_object_get(j, "primary_id");
        if (reason && !json_is_string(reason) && !json_is_null(reason)) {
                reply_error(r, 400, "reason: not a string");
                goto fail;
        }
        if (epoch && !json_is_null(epoch) && (!json_is_integer(epoch) || json_integer_value(epoch) < 0)) {
                reply_error(r, 400, "epoch: not a non-negative integer");
                goto fail;
        }
        if (primary && !json_is_null(primary) &&
            (!json_is_string(primary) || !provider_id_valid(json_string_value(primary)))) {
                reply_error(r, 400, "primary_id: not a node id");
                goto fail;
        }

        r->summary[0] = 0;
        if (json_is_string(reason)) {
                sanitize(text, sizeof(text), json_string_value(reason), 128);
                n += (size_t) snprintf(r->summary + n, sizeof(r->summary) - n, "reason=\"%s\" ", text);
        }
        if (json_is_integer(epoch) && n < sizeof(r->summary))
                n += (size_t) snprintf(r->summary + n, sizeof(r->summary) - n,
                                       "epoch=%" JSON_INTEGER_FORMAT " ", json_integer_value(epoch));
        if (json_is_string(primary) && n < sizeof(r->summary))
                n += (size_t) snprintf(r->summary + n, sizeof(r->summary) - n, "primary_id=%s ",
                                       json_string_value(primary));
        if (n == 0)
                (void) strscpy(r->summary, sizeof(r->summary), "no details");
        else if (n <= sizeof(r->summary))
                r->summary[n - 1] = 0; /* the trailing blank */
        json_decref(j);
        return true;
fail:
        json_decref(j);
        return false;
}

static bool check_endpoints_body(const NotifyRequest *req, NotifyReply *r) {
        json_t *j, *endpoint, *port;
        bool ok = false;

        j = parse_object(req, r);
        if (!j)
                return false;
        endpoint = json_object_get(j, "endpoint");
        port = json_object_get(j, "port");
        if (!endpoint)
                reply_error(r, 400, "endpoint: missing");
        else if (!json_is_string(endpoint) || !provider_host_valid(json_string_value(endpoint)))
                reply_error(r, 400, "endpoint: not a host name or address of 1-253 characters");
        else if (!port)
                reply_error(r, 400, "port: missing");
        else if (!json_is_integer(port) || json_integer_value(port) < 1 || json_integer_value(port) > 65535)
                reply_error(r, 400, "port: not an integer 1-65535");
        else {
                (void) snprintf(r->summary, sizeof(r->summary), "endpoint=%s port=%" JSON_INTEGER_FORMAT,
                                json_string_value(endpoint), json_integer_value(port));
                ok = true;
        }
        json_decref(j);
        return ok;
}

void notify_handle_request(const NotifyRequest *req, NotifyReply *r) {
        const char *allow;

        *r = (NotifyReply){};
        r->route = route_of(req->path);
        if (r->route == NOTIFY_ROUTE_NONE)
                return reply_error(r, 404, "not found");
        allow = method_mismatch(r->route, req->method);
        if (allow) {
                r->allow = allow;
                return reply_error(r, 405, "method not allowed");
        }
        if (r->route == NOTIFY_ROUTE_HEALTH)
                return reply_set(r, 200, "status", "ok");
        /* Before the token is compared: over the limit, a guess learns
         * nothing, right or wrong. */
        if (req->auth_retry_after > 0) {
                r->retry_after = req->auth_retry_after;
                return reply_error(r, 429, "too many failed authentications");
        }
        if (!notify_auth_ok(req->authorization, req->token))
                return reply_error(r, 401, req->authorization ? "wrong token" : "missing token");
        if (req->body_too_large ||
            (req->content_length != UINT64_MAX && req->content_length > NOTIFY_BODY_MAX))
                return reply_error(r, 413, "body over 4096 bytes");
        if (req->headers_only)
                return; /* status 0: read the body */

        switch (r->route) {
        case NOTIFY_ROUTE_NOTIFY:
                if (!check_notify_body(req, r))
                        return;
                break;
        case NOTIFY_ROUTE_ENDPOINTS:
                if (!check_endpoints_body(req, r))
                        return;
                break;
        case NOTIFY_ROUTE_STATUS:
                r->status = 200;
                r->run_action = true;
                return;
        default:
                assert(false);
                return;
        }
        reply_set(r, 202, "status", "accepted");
        r->run_action = true;
}

void notify_reply_done(NotifyReply *r) {
        free(r->body);
        r->body = NULL;
}

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
        uint64_t now = loop_now_usec(s);

        if (now - rl->window_start >= LOG_WINDOW_USEC) {
                if (rl->suppressed > 0)
                        log_struct(LOG_NOTICE, 0, mid, NULL, "notify: suppressed %" PRIu64 " %s log lines",
                                   rl->suppressed, what);
                rl->window_start = now;
                rl->lines = 0;
                rl->suppressed = 0;
        }
        if (rl->lines >= LOG_WINDOW_LINES) {
                rl->suppressed++;
                return false;
        }
        rl->lines++;
        return true;
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

/* ---- the token bucket ---------------------------------------------- */

static TokenBucket bucket_new(NotifyServer *s, double rate, double burst) {
        return (TokenBucket){.tokens = burst, .rate = rate, .burst = burst, .usec = loop_now_usec(s)};
}

/* Refills; returns 0 when a token is available, else the whole seconds
 * (at least 1) until one is. */
static unsigned bucket_wait(NotifyServer *s, TokenBucket *b) {
        uint64_t now = loop_now_usec(s);
        double secs;

        b->tokens += (double) (now - b->usec) * b->rate / (double) USEC_PER_SEC;
        if (b->tokens > b->burst)
                b->tokens = b->burst;
        b->usec = now;
        if (b->tokens >= 1.0)
                return 0;
        secs = (1.0 - b->tokens) / b->rate;
        return secs <= 1.0 ? 1 : (unsigned) secs + 1;
}

/* Takes one token; on failure returns false and the seconds until one
 * is back. */
static bool bucket_take(NotifyServer *s, TokenBucket *b, unsigned *ret_retry_after) {
        unsigned wait = bucket_wait(s, b);

        if (wait > 0) {
                *ret_retry_after = wait;
                return false;
        }
        b->tokens -= 1.0;
        return true;
}

/* ---- connections ------------------------------------------------- */

/* The address of sa as IPv6, IPv4 v4-mapped; false for other families. */
static bool peer_key(const struct sockaddr *sa, struct in6_addr *ret) {
        if (!sa)
                return false;
        if (sa->sa_family == AF_INET) {
                *ret = (struct in6_addr){};
                ret->s6_addr[10] = ret->s6_addr[11] = 0xff;
                memcpy(&ret->s6_addr[12], &((const struct sockaddr_in *) sa)->sin_addr, 4);
                return true;
        }
        if (sa->sa_family == AF_INET6) {
                *ret = ((const struct sockaddr_in6 *) sa)->sin6_addr;
                return true;
        }
        return false;
}

static void peer_string(const struct sockaddr *sa, char *buf, size_t size) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *) sa;

        buf[0] = 0;
        if (!sa)
                (void) strscpy(buf, size, "?");
        else if (sa->sa_family == AF_INET)
                (void) inet_ntop(AF_INET, &((const struct sockaddr_in *) sa)->sin_addr, buf, size);
        else if (sa->sa_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr))
                (void) inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], buf, size);
        else if (sa->sa_family == AF_INET6)
                (void) inet_ntop(AF_INET6, &in6->sin6_addr, buf, size);
        else
                (void) strscpy(buf, size, "?");
}

static void conn_unlink(NotifyServer *s, Conn *c) {
        if (c->prev)
                c->prev->next = c->next;
        else
                s->conns_head = c->next;
        if (c->next)
                c->next->prev = c->prev;
        else
                s->conns_tail = c->prev;
        c->prev = c->next = NULL;
}

static void conn_append(NotifyServer *s, Conn *c) {
        c->prev = s->conns_tail;
        c->next = NULL;
        if (s->conns_tail)
                s->conns_tail->next = c;
        else
                s->conns_head = c;
        s->conns_tail = c;
}

/* Shuts the socket down under MHD's feet: MHD sees EOF on its next run
 * and closes the connection through its normal path. Returns false, and
 * counts nothing, when the socket could not be shut down (no fd known):
 * such a connection is left to MHD's idle timeout. */
static bool conn_evict(NotifyServer *s, Conn *c) {
        if (c->evicted)
                return true;
        if (c->fd < 0 || shutdown(c->fd, SHUT_RDWR) < 0)
                return false;
        c->evicted = true;
        s->n_evicted++;
        return true;
}

/* What the kernel says about the connection: bytes received so far and
 * milliseconds since the last data came in. */
static bool conn_tcp_info(const Conn *c, uint64_t *ret_bytes, uint32_t *ret_quiet_ms) {
        struct tcp_info ti = {};
        socklen_t len = sizeof(ti);

        if (c->fd < 0 || getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
            len < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof(ti.tcpi_bytes_received))
                return false;
        *ret_bytes = ti.tcpi_bytes_received;
        *ret_quiet_ms = ti.tcpi_last_data_recv;
        return true;
}

/* Marks the connection as between requests from now on. */
static void conn_set_idle(NotifyServer *s, Conn *c) {
        uint32_t quiet_ms;

        c->busy = false;
        c->since_usec = loop_now_usec(s);
        if (!conn_tcp_info(c, &c->rx_idle, &quiet_ms))
                c->rx_idle = UINT64_MAX;
}

/* True when the connection sits between requests: no request's headers
 * are in and not one byte of the next request has arrived (over TLS,
 * where handshake bytes count too: nothing has arrived for a while).
 * Only such a connection is evicted to make room for another. */
static bool conn_idle(NotifyServer *s, const Conn *c) {
        uint64_t bytes;
        uint32_t quiet_ms;

        if (c->busy || c->evicted || !conn_tcp_info(c, &bytes, &quiet_ms))
                return false;
        if (s->tls)
                return quiet_ms >= NOTIFY_TLS_QUIET_MSEC;
        return bytes == c->rx_idle;
}

/* Makes room under the total limit: the oldest idle connection, else the
 * oldest one still sending its headers (the deadline would drop it soon
 * anyway); never one whose request is being handled. */
static bool evict_for_total(NotifyServer *s) {
        for (Conn *c = s->conns_head; c; c = c->next)
                if (conn_idle(s, c) && conn_evict(s, c))
                        return true;
        for (Conn *c = s->conns_head; c; c = c->next)
                if (!c->busy && !c->evicted && conn_evict(s, c))
                        return true;
        return false;
}

/* Makes room under the per-peer limit: true when peer has fewer than
 * NOTIFY_PER_PEER_CONNECTIONS connections, or had its oldest idle one
 * evicted. A peer whose connections are all inside a request is refused. */
static bool evict_for_peer(NotifyServer *s, const struct in6_addr *peer) {
        Conn *idle = NULL;
        unsigned n = 0;

        for (Conn *c = s->conns_head; c; c = c->next) {
                if (c->evicted || memcmp(&c->peer, peer, sizeof(*peer)) != 0)
                        continue;
                n++;
                if (!idle && conn_idle(s, c))
                        idle = c;
        }
        if (n < NOTIFY_PER_PEER_CONNECTIONS)
                return true;
        return idle && conn_evict(s, idle);
}

static void on_connection(void *cls, struct MHD_Connection *connection, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
        NotifyServer *s = cls;
        Conn *c = *socket_context;

        if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
                const union MHD_ConnectionInfo *ci =
                        MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
                const union MHD_ConnectionInfo *ai =
                        MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CLIENT_ADDRESS);

                c = calloc(1, sizeof(*c));
                if (!c)
                        return; /* untracked: still bounded by MHD's limit */
                c->fd = ci ? ci->connect_fd : -1;
                if (notify_test_connection_fd)
                        c->fd = notify_test_connection_fd(c->fd);
                if (!ai || !peer_key(ai->client_addr, &c->peer))
                        c->peer = in6addr_any;
                /* Whatever arrived before MHD got to this notification is
                 * the start of a request already: 0 bytes marks idle. */
                c->since_usec = loop_now_usec(s);
                c->rx_idle = 0;
                conn_append(s, c);
                s->n_conns++;
                *socket_context = c;
        } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED && c) {
                conn_unlink(s, c);
                s->n_conns--;
                if (c->evicted)
                        s->n_evicted--;
                free(c);
                *socket_context = NULL;
        }
}

static Conn *conn_of(struct MHD_Connection *connection) {
        const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(connection, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

        return ci ? ci->socket_context : NULL;
}

static enum MHD_Result on_accept(void *cls, const struct sockaddr *addr, socklen_t addrlen) {
        NotifyServer *s = cls;
        char peer[PEER_MAX];
        struct in6_addr key;

        if (!addr || !cidr_list_contains(s->allow, s->n_allow, addr) || !peer_key(addr, &key)) {
                peer_string(addr, peer, sizeof(peer));
                log_rejected(s, LOG_NOTICE, peer, "peer not allowed");
                return MHD_NO;
        }
        /* At a limit, the oldest connection that has not sent a request
         * makes room: idle sockets cannot lock out a peer with something
         * to say. */
        if (!evict_for_peer(s, &key)) {
                peer_string(addr, peer, sizeof(peer));
                log_rejected(s, LOG_NOTICE, peer, "per-peer connection limit reached");
                return MHD_NO;
        }
        if (s->n_conns - s->n_evicted >= NOTIFY_MAX_CONNECTIONS && !evict_for_total(s)) {
                peer_string(addr, peer, sizeof(peer));
                log_rejected(s, LOG_NOTICE, peer, "connection limit reached");
                return MHD_NO;
        }
        return MHD_YES;
}

/* Drops connections whose request has been going on for too long, and
 * returns the earliest deadline still pending (USEC_INFINITY: none). */
static uint64_t sweep_deadlines(NotifyServer *s) {
        uint64_t now = loop_now_usec(s), next = USEC_INFINITY;

        for (Conn *c = s->conns_head; c; c = c->next) {
                uint64_t deadline = c->since_usec + NOTIFY_REQUEST_DEADLINE_USEC;

                if (c->evicted)
                        continue;
                if (deadline <= now) {
                        /* Not evictable (no fd): left to MHD's idle timeout,
                         * and no timer for it, or the timer would spin. */
                        (void) conn_evict(s, c);
                } else if (deadline < next)
                        next = deadline;
        }
        return next;
}

/* ---- responses --------------------------------------------------- */

static enum MHD_Result respond(struct MHD_Connection *connection, unsigned status, char *body,
                               const char *allow, unsigned retry_after) {
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
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
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

static void connection_peer(struct MHD_Connection *connection, char *buf, size_t size) {
        const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CLIENT_ADDRESS);

        peer_string(ci ? ci->client_addr : NULL, buf, size);
}

/* Answers what the pure logic decided alone (refusals, /healthz), logging
 * what an operator wants to see. */
static enum MHD_Result respond_plain(NotifyServer *s, struct MHD_Connection *connection, NotifyReply *r) {
        char peer[PEER_MAX];

        connection_peer(connection, peer, sizeof(peer));
        if (r->status == 401) {
                unsigned ignored;

                /* Spends a token of the failure bucket; when that was
                 * the last, the next guesses get 429 unread. */
                (void) bucket_take(s, &s->auth_fail_bucket, &ignored);
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

        connection_peer(connection, peer, sizeof(peer));
        TokenBucket *b = r->route == NOTIFY_ROUTE_STATUS ? &s->status_bucket : &s->notify_bucket;
        if (!bucket_take(s, b, &retry_after)) {
                log_rejected(s, LOG_NOTICE, peer, "rate limited");
                return respond(connection, 429, strdup("{\"error\":\"too many requests\"}"), NULL,
                               retry_after);
        }
        if (r->route == NOTIFY_ROUTE_STATUS) {
                json_t *doc = s->cb.status ? s->cb.status(s, s->userdata) : NULL;

                if (!doc)
                        return respond(connection, 503, strdup("{\"error\":\"status unavailable\"}"), NULL,
                                       0);
                return respond(connection, 200, json_text(doc), NULL, 0);
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
        Conn *c = conn_of(connection);
        Req *q;
        enum MHD_Result ret;

        q = calloc(1, sizeof(*q));
        if (!q)
                return MHD_NO;
        *con_cls = q;
        if (c)
                c->busy = true;

        request_init(s, connection, url, method, &req);
        req.headers_only = true;
        req.auth_retry_after = bucket_wait(s, &s->auth_fail_bucket);
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
        Conn *c = conn_of(connection);

        if (q) {
                free(q->body);
                free(q);
                *con_cls = NULL;
        }
        /* Keep-alive: idle again, and its deadline restarts. */
        if (c && !c->evicted) {
                conn_set_idle(s, c);
                conn_unlink(s, c);
                conn_append(s, c);
        }
}

/* ---- the event loop glue ------------------------------------------- */

static int on_timer(sd_event_source *es, uint64_t usec, void *userdata);

static void notify_rearm(NotifyServer *s) {
        MHD_UNSIGNED_LONG_LONG ms;
        uint64_t next = sweep_deadlines(s), now = loop_now_usec(s);
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

static int read_small_file(const char *path, char **ret) {
        _cleanup_(closep) int fd = -1;
        struct stat st;
        char *buf;
        ssize_t n;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return negative_errno();
        if (fstat(fd, &st) < 0)
                return negative_errno();
        if (!S_ISREG(st.st_mode) || st.st_size <= 0 || st.st_size > NOTIFY_TLS_FILE_MAX)
                return -EFBIG;
        buf = calloc(1, (size_t) st.st_size + 1);
        if (!buf)
                return -ENOMEM;
        n = read(fd, buf, (size_t) st.st_size);
        if (n != st.st_size) {
                free(buf);
                return n < 0 ? negative_errno() : -EIO;
        }
        *ret = buf;
        return 0;
}

static char *secret_free(char *s) {
        if (s) {
                explicit_bzero(s, strlen(s));
                free(s);
        }
        return NULL;
}

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

static int load_tls(NotifyServer *s, const Config *cfg) {
        int r;

        if (!cfg->tls_cert || !cfg->tls_key)
                return 0;
        if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
                return log_error_errno(-EOPNOTSUPP, "notify: libmicrohttpd was built without TLS");
        r = read_small_file(cfg->tls_cert, &s->tls_cert_pem);
        if (r < 0)
                return log_error_errno(r, "notify: cannot read tls_cert %s", cfg->tls_cert);
        r = read_small_file(cfg->tls_key, &s->tls_key_pem);
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

int notify_server_new(sd_event *e, const Config *cfg, const NotifyCallbacks *cb, void *userdata,
                      NotifyServer **ret) {
        NotifyServer *s;
        int fd = -1, epfd, r, tls;

        r = activated_socket(&fd);
        if (r < 0)
                return r;
        if (r == 0 && !cfg->notify_enabled) {
                *ret = NULL;
                return 0;
        }

        s = calloc(1, sizeof(*s));
        if (!s)
                return log_error_errno(-ENOMEM, "notify: out of memory");
        s->event = sd_event_ref(e);
        s->cb = cb ? *cb : (NotifyCallbacks){};
        s->userdata = userdata;
        s->activated = r > 0;
        s->notify_bucket = s->status_bucket = bucket_new(s, NOTIFY_RATE_PER_SEC, NOTIFY_RATE_BURST);
        s->auth_fail_bucket = bucket_new(s, NOTIFY_AUTH_FAIL_PER_SEC, NOTIFY_AUTH_FAIL_BURST);

        r = copy_settings(s, cfg);
        if (r < 0)
                goto fail;
        tls = r = load_tls(s, cfg);
        if (r < 0)
                goto fail;
        s->tls = tls > 0;
        if (!s->activated) {
                r = listen_socket_new(cfg, &fd);
                if (r < 0)
                        goto fail;
        }
        epfd = r = start_mhd(s, fd, tls > 0);
        if (r < 0) {
                if (!s->activated && !s->mhd)
                        close(fd);
                goto fail;
        }

        r = sd_event_add_io(e, &s->io, epfd, EPOLLIN, on_io, s);
        if (r >= 0)
                r = sd_event_add_time(e, &s->timer, CLOCK_MONOTONIC, USEC_INFINITY,
                                      NOTIFY_TIMER_ACCURACY_USEC, on_timer, s);
        if (r >= 0)
                r = sd_event_source_set_priority(s->io, SD_EVENT_PRIORITY_IDLE - 10);
        if (r >= 0)
                r = sd_event_source_set_priority(s->timer, SD_EVENT_PRIORITY_IDLE - 10);
        if (r < 0) {
                log_error_errno(r, "notify: cannot add to the event loop");
                goto fail;
        }
        (void) sd_event_source_set_description(s->io, "notify-io");
        (void) sd_event_source_set_description(s->timer, "notify-timer");
        notify_rearm(s);

        log_info("notify: listening on %s%s",
                 s->activated ? "the socket passed by systemd" : cfg->notify_listen,
                 tls > 0 ? " (https)" : "");
        *ret = s;
        return 0;
fail:
        notify_server_free(s);
        return r;
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
