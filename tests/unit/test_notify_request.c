/* Unit tests of agent/notify-request.c for what a listener's trust in its
 * peer changes: a trusted peer (the control socket) needs no token and no
 * failed-login budget, and every other check still applies to it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "macro.h"
#include "notify-request.h"

typedef struct Case {
        const char *method, *path, *authorization, *token, *body;
        bool trusted;
        unsigned auth_retry_after;
        uint64_t content_length;
        unsigned status;
        bool run_action;
} Case;

#define NOCL UINT64_MAX

static const Case cases[] = {
        /* The network listener: the token decides, as before. */
        {"GET", "/v1/status", NULL, "tok", NULL, false, 0, NOCL, 401, false},
        {"GET", "/v1/status", "Bearer nope", "tok", NULL, false, 0, NOCL, 401, false},
        {"GET", "/v1/status", "Bearer tok", "tok", NULL, false, 0, NOCL, 200, true},
        {"GET", "/v1/status", "Bearer tok", "tok", NULL, false, 5, NOCL, 429, false},
        {"POST", "/v1/notify", NULL, NULL, "", false, 0, NOCL, 401, false},
        /* A trusted peer: no token, none configured, no backoff. */
        {"GET", "/v1/status", NULL, NULL, NULL, true, 0, NOCL, 200, true},
        {"GET", "/v1/status", "Bearer wrong", "tok", NULL, true, 0, NOCL, 200, true},
        {"GET", "/v1/status", NULL, NULL, NULL, true, 5, NOCL, 200, true},
        {"POST", "/v1/notify", NULL, NULL, "", true, 0, NOCL, 202, true},
        {"POST", "/v1/notify", NULL, NULL, "{\"reason\":\"x\"}", true, 0, NOCL, 202, true},
        {"PATCH", "/onboarding/api/agent/rabbitmq/endpoints", NULL, NULL,
         "{\"endpoint\":\"p2\",\"port\":5671}", true, 0, NOCL, 202, true},
        /* ... and every other check still applies to it. */
        {"POST", "/v1/notify", NULL, NULL, "[1]", true, 0, NOCL, 400, false},
        {"POST", "/v1/notify", NULL, NULL, "", true, 0, NOTIFY_BODY_MAX + 1, 413, false},
        {"PATCH", "/onboarding/api/agent/rabbitmq/endpoints", NULL, NULL, "{}", true, 0, NOCL, 400, false},
        {"DELETE", "/v1/notify", NULL, NULL, NULL, true, 0, NOCL, 405, false},
        {"GET", "/v1/other", NULL, NULL, NULL, true, 0, NOCL, 404, false},
        {"GET", "/healthz", NULL, NULL, NULL, true, 0, NOCL, 200, false},
};

static void test_trust(void **state) {
        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                const Case *c = &cases[i];
                NotifyRequest req = {
                        .method = c->method,
                        .path = c->path,
                        .authorization = c->authorization,
                        .token = c->token,
                        .trusted = c->trusted,
                        .auth_retry_after = c->auth_retry_after,
                        .content_length = c->content_length,
                        .body = c->body,
                        .body_len = c->body ? strlen(c->body) : 0,
                };
                NotifyReply r;

                notify_handle_request(&req, &r);
                if (r.status != c->status || r.run_action != c->run_action)
                        fail_msg("case %zu: %s %s trusted=%d: got %u/%d, want %u/%d", i, c->method, c->path,
                                 c->trusted, r.status, r.run_action, c->status, c->run_action);
                notify_reply_done(&r);
        }
}

/* The first stage (headers only) lets a trusted peer's body be read. */
static void test_trusted_headers_only(void **state) {
        NotifyRequest req = {.method = "POST",
                             .path = "/v1/notify",
                             .trusted = true,
                             .headers_only = true,
                             .content_length = 10};
        NotifyReply r;

        (void) state;
        notify_handle_request(&req, &r);
        assert_int_equal(r.status, 0);
        notify_reply_done(&r);
        req.trusted = false;
        notify_handle_request(&req, &r);
        assert_int_equal(r.status, 401);
        notify_reply_done(&r);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_trust),
                cmocka_unit_test(test_trusted_headers_only),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
