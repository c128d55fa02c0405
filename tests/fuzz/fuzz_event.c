/* libFuzzer target for the AMQP event body check (provider_event_check) of
 * contract section 4. Input: byte 0 picks the routing key (the three known
 * ones, an unknown one, one that only shares a prefix, an empty one), the
 * rest is the body. Whatever the bytes: no crash, no leak, and an accepted
 * body is a JSON object whose fields fit the routing key's row, checked
 * again here independently with the same jansson flags. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "provider.h"

#define BODY_MAX (64 * 1024) /* larger bodies never reach the check */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const keys[] = {
        "provider.primary.changed", "provider.version.changed", "agent.update.available",
        "agent.update.unknown",     "provider.primary",         "",
};

static const char *str(json_t *o, const char *k) {
        return json_string_value(json_object_get(o, k));
}

/* The row of contract section 4, restated. */
static void check_accepted(size_t key, json_t *o) {
        json_t *e;

        if (!json_is_object(o))
                abort();
        switch (key) {
        case 0:
                e = json_object_get(o, "epoch");
                if (!json_is_integer(e) || json_integer_value(e) < 1 ||
                    !provider_id_valid(str(o, "primary_id")) || !provider_url_valid(str(o, "api_url")))
                        abort();
                break;
        case 1:
                if (!provider_id_valid(str(o, "node_id")) || !provider_version_valid(str(o, "version")))
                        abort();
                break;
        case 2:
                if (!provider_version_valid(str(o, "version")))
                        abort();
                break;
        default:
                abort(); /* unknown routing keys are never accepted */
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const char *why, *why2;
        size_t key;
        char *body;
        json_t *o;

        if (size < 1 || size - 1 > BODY_MAX)
                return 0;
        key = data[0] % (sizeof(keys) / sizeof(keys[0]));
        /* An exactly-sized heap copy: ASan catches any read past len. */
        body = malloc(size - 1 ? size - 1 : 1);
        if (!body)
                abort();
        memcpy(body, data + 1, size - 1);

        why = provider_event_check(keys[key], body, size - 1);
        if (why) {
                if (!why[0])
                        abort();
        } else {
                o = json_loadb(body, size - 1, JSON_REJECT_DUPLICATES, NULL);
                check_accepted(key, o);
                json_decref(o);
        }
        /* Pure: the same answer twice. */
        why2 = provider_event_check(keys[key], body, size - 1);
        if (!why != !why2 || (why && strcmp(why, why2) != 0))
                abort();
        free(body);
        return 0;
}
