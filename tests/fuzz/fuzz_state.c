/* libFuzzer target for the state file parser: whatever the bytes, no
 * crash, and anything accepted formats and parses back to the same. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "state.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        PersistentState a, b;
        char err[256], *json = NULL;

        if (state_parse((const char *) data, size, &a, err, sizeof(err)) < 0)
                return 0;
        if (state_format(&a, &json) < 0)
                abort();
        if (state_parse(json, strlen(json), &b, err, sizeof(err)) < 0)
                abort();
        if (!committed_equal(&a.committed, &b.committed) || a.n_nodes != b.n_nodes ||
            strcmp(a.applied_version, b.applied_version) != 0 || a.failures != b.failures)
                abort();
        free(json);
        return 0;
}
