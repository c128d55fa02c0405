/* libFuzzer target for the state file parser: whatever the bytes, no
 * crash, and anything accepted formats and parses back to the same. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "state.h"

static bool node_equal(const NodeRef *a, const NodeRef *b) {
        return strcmp(a->id, b->id) == 0 && strcmp(a->api_url, b->api_url) == 0;
}

static bool committed_same(const Committed *a, const Committed *b) {
        return a->epoch == b->epoch && node_equal(&a->primary, &b->primary) &&
               broker_info_equal(&a->broker, &b->broker);
}

static bool update_record_equal(const UpdateRecord *a, const UpdateRecord *b) {
        return strcmp(a->applied_version, b->applied_version) == 0 &&
               strcmp(a->delay_version, b->delay_version) == 0 &&
               a->delay_not_before_usec == b->delay_not_before_usec &&
               strcmp(a->failed_version, b->failed_version) == 0 && a->failures == b->failures &&
               a->retry_not_before_usec == b->retry_not_before_usec;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        PersistentState a, b;
        char err[256], *json = NULL;

        if (state_parse((const char *) data, size, &a, err, sizeof(err)) < 0)
                return 0;
        if (state_format(&a, &json) < 0)
                abort();
        if (state_parse(json, strlen(json), &b, err, sizeof(err)) < 0)
                abort();
        if (!committed_same(&a.committed, &b.committed) || a.n_nodes != b.n_nodes ||
            !update_record_equal(&a.update, &b.update))
                abort();
        for (size_t i = 0; i < a.n_nodes; i++)
                if (!node_equal(&a.nodes[i], &b.nodes[i]))
                        abort();
        free(json);
        return 0;
}
