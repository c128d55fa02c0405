/* libFuzzer target for the notify request logic (notify_handle_request):
 * routing, methods, the token check and the body validation, with no
 * socket. Input: byte 0 picks the method, byte 1 the path, byte 2 flags
 * (among them a trusted peer and a failed-login backoff); then the
 * Authorization header up to the first '\n', then the body.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -Iagent -D_GNU_SOURCE \
 *         tests/fuzz/fuzz_notify.c agent/notify-request.c common/provider.c \
 *         $(pkg-config --cflags --libs jansson) -o build/fuzz_notify
 *   build/fuzz_notify -max_total_time=20 tests/fuzz/corpus/notify */
#include <stdint.h>
#include <string.h>

#include <jansson.h>

#include "notify-request.h"

static const char *const methods[] = {"GET", "POST", "PATCH", "HEAD", "PUT", "DELETE", ""};
static const char *const paths[] = {"/v1/notify",
                                    "/onboarding/api/agent/rabbitmq/endpoints",
                                    "/v1/status",
                                    "/healthz",
                                    "/",
                                    "/v1/notify/",
                                    ""};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char auth[512];
        const uint8_t *nl;
        NotifyRequest req = {};
        NotifyReply r;
        size_t alen;

        if (size < 3)
                return 0;
        req.method = methods[data[0] % (sizeof(methods) / sizeof(methods[0]))];
        req.path = paths[data[1] % (sizeof(paths) / sizeof(paths[0]))];
        req.headers_only = data[2] & 1;
        req.body_too_large = data[2] & 2;
        req.content_length = (data[2] & 4) ? UINT64_MAX : size;
        req.token = (data[2] & 8) ? NULL : "s3cret";
        req.trusted = data[2] & 16;
        req.auth_retry_after = (data[2] & 32) ? 3 : 0;
        data += 3;
        size -= 3;

        nl = memchr(data, '\n', size);
        alen = nl ? (size_t) (nl - data) : 0;
        if (alen >= sizeof(auth))
                alen = sizeof(auth) - 1;
        memcpy(auth, data, alen);
        auth[alen] = 0;
        req.authorization = nl ? auth : NULL;
        if (nl) {
                size -= (size_t) (nl - data) + 1;
                data = nl + 1;
        }
        req.body = (const char *) data;
        req.body_len = size > NOTIFY_BODY_MAX ? NOTIFY_BODY_MAX : size;

        notify_handle_request(&req, &r);
        /* Every answer the caller sends itself is a JSON object. */
        if (!r.run_action || r.status == 202) {
                json_t *j = r.body ? json_loads(r.body, 0, NULL) : NULL;
                if (r.status != 0 && !json_is_object(j))
                        __builtin_trap();
                json_decref(j);
        }
        if (r.status == 405 && !r.allow)
                __builtin_trap();
        notify_reply_done(&r);
        return 0;
}
