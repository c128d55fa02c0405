/* The notify listener (contract section 6) on libmicrohttpd, driven by the
 * sd-event loop through MHD's epoll fd and a timer. Owns the listening
 * socket (or the one passed by systemd socket activation), the per-peer
 * and total connection limits, the token bucket, the request and body
 * limits, and rate-limited logging of rejections. It never commits
 * anything: a valid notify only asks the manager for a poll round. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "config.h"

#define NOTIFY_BODY_MAX    4096
#define NOTIFY_SUMMARY_MAX 320
#define NOTIFY_ERROR_MAX   160

typedef struct NotifyServer NotifyServer;

typedef struct NotifyCallbacks {
        /* A valid, authenticated notify (or the endpoints PATCH). */
        void (*notify)(NotifyServer *s, const char *peer, const char *summary, void *userdata);
        /* Builds the status document (a new reference). */
        json_t *(*status)(NotifyServer *s, void *userdata);
} NotifyCallbacks;

/* Listens as configured ([notify] listen; or the socket passed by systemd
 * when sd_listen_fds() gives one). Returns 0 with *ret NULL when the
 * listener is off. The old server must be freed before a new one binds the
 * same address (a restart after notify_server_needs_restart()). */
int notify_server_new(sd_event *e, const Config *cfg, const NotifyCallbacks *cb, void *userdata,
                      NotifyServer **ret);
NotifyServer *notify_server_free(NotifyServer *s);

/* True when the listener must be reopened for the new config: listen
 * address, on/off, TLS files (always when TLS is on, so that a SIGHUP picks
 * up a renewed certificate). */
bool notify_server_needs_restart(const Config *old_cfg, const Config *new_cfg);
/* Token and allow list: they do not need a new socket. */
int notify_server_reconfigure(NotifyServer *s, const Config *cfg);

/* The request logic as a pure function (no I/O, no clock, no logging), so
 * that the fuzzer and unit tests reach it without a socket. The MHD glue
 * calls it twice: once when the headers are in (headers_only; status 0
 * means "read the body"), and once with the whole body. */
typedef enum NotifyRoute {
        NOTIFY_ROUTE_NONE,
        NOTIFY_ROUTE_NOTIFY,    /* POST /v1/notify */
        NOTIFY_ROUTE_ENDPOINTS, /* PATCH /onboarding/api/agent/rabbitmq/endpoints */
        NOTIFY_ROUTE_STATUS,    /* GET /v1/status */
        NOTIFY_ROUTE_HEALTH,    /* GET /healthz */
} NotifyRoute;

typedef struct NotifyRequest {
        const char *method;
        const char *path;
        const char *authorization; /* the Authorization header; NULL when absent */
        const char *token;         /* the expected token; NULL or "": every token is wrong */
        bool headers_only;         /* first stage: the body is not read yet */
        uint64_t content_length;   /* announced; UINT64_MAX when unknown (chunked) */
        const char *body;          /* not NUL-terminated; may be NULL when body_len is 0 */
        size_t body_len;
        bool body_too_large; /* the reader stopped after NOTIFY_BODY_MAX bytes */
        /* Non-zero: failed authentications are over their rate limit, so a
         * request that needs the token is answered 429 with this
         * Retry-After (seconds) before the token is looked at. */
        unsigned auth_retry_after;
} NotifyRequest;

typedef struct NotifyReply {
        unsigned status; /* HTTP status; 0 after headers_only: go on reading the body */
        NotifyRoute route;
        /* 202 on notify/endpoints: the caller calls cb->notify with summary.
         * 200 on status: the caller supplies the body (cb->status). */
        bool run_action;
        const char *allow;                /* the Allow header of a 405 */
        unsigned retry_after;             /* the Retry-After header of a 429; 0: none */
        char *body;                       /* malloc'd compact JSON, NULL when the caller supplies it */
        char summary[NOTIFY_SUMMARY_MAX]; /* what a valid notify said, safe to log */
        char reason[NOTIFY_ERROR_MAX];    /* why it was refused, safe to log */
} NotifyReply;

void notify_handle_request(const NotifyRequest *req, NotifyReply *ret);
void notify_reply_done(NotifyReply *r);

/* True when header is "Bearer <token>" (scheme case-insensitive); the token
 * comparison takes the same time wherever the first difference is. */
bool notify_auth_ok(const char *header, const char *token);

/* Test seam, defined only by tests/tools/notify_drive (a weak symbol, NULL
 * in the daemon): maps the fd MHD reports for a new connection, so that a
 * test can make it unknown (-1). */
int notify_test_connection_fd(int fd) __attribute__((weak));
