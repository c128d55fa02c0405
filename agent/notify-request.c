/* The notify request logic: see notify-request.h. Pure: what a request
 * gets is decided from its fields alone. */
#include <assert.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "macro.h"
#include "notify-request.h"
#include "provider.h"

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
        if (strcmp(path, "/metrics") == 0)
                return NOTIFY_ROUTE_METRICS;
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
        case NOTIFY_ROUTE_METRICS:
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
        if (!req->trusted && req->auth_retry_after > 0) {
                r->retry_after = req->auth_retry_after;
                return reply_error(r, 429, "too many failed authentications");
        }
        if (!req->trusted && !notify_auth_ok(req->authorization, req->token))
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
        case NOTIFY_ROUTE_METRICS:
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
