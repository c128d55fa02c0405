/* The notify request logic (contract section 6) as a pure function: the
 * route table, methods, the token check and the body validation. No I/O,
 * no clock, no logging, so that the fuzzer and unit tests reach it without
 * a socket. The listener (notify.c) calls it twice per request: once when
 * the headers are in (headers_only; status 0 means "read the body"), and
 * once with the whole body. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define NOTIFY_BODY_MAX    4096
#define NOTIFY_SUMMARY_MAX 320
#define NOTIFY_ERROR_MAX   160

typedef enum NotifyRoute {
        NOTIFY_ROUTE_NONE,
        NOTIFY_ROUTE_NOTIFY,    /* POST /v1/notify */
        NOTIFY_ROUTE_ENDPOINTS, /* PATCH /onboarding/api/agent/rabbitmq/endpoints */
        NOTIFY_ROUTE_STATUS,    /* GET /v1/status */
        NOTIFY_ROUTE_HEALTH,    /* GET /healthz */
        NOTIFY_ROUTE_METRICS,   /* GET /metrics */
} NotifyRoute;

typedef struct NotifyRequest {
        const char *method;
        const char *path;
        const char *authorization; /* the Authorization header; NULL when absent */
        const char *token;         /* the expected token; NULL or "": every token is wrong */
        /* The listener vouches for the peer (the control socket, whose file
         * mode and group decide who may connect): no token is asked for,
         * and auth_retry_after does not apply. Everything else does. */
        bool trusted;
        bool headers_only;       /* first stage: the body is not read yet */
        uint64_t content_length; /* announced; UINT64_MAX when unknown (chunked) */
        const char *body;        /* not NUL-terminated; may be NULL when body_len is 0 */
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
         * 200 on status and metrics: the caller supplies the body (cb->status,
         * cb->metrics). */
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
