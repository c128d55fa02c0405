/* libFuzzer target for the Provider state parser: any byte string must give
 * 0 or a negative errno with a terminated message, never a crash, and a
 * success must only ever produce values inside the contract's limits. */

#include <assert.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "provider.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_valid(const ProviderState *st) {
        assert(provider_id_valid(st->node.id));
        assert(provider_url_valid(st->node.api_url));
        assert(provider_version_valid(st->version));
        assert(st->epoch >= 1);
        assert(provider_id_valid(st->primary.id));
        assert(provider_url_valid(st->primary.api_url));
        assert(provider_host_valid(st->broker.host));
        assert(st->broker.port >= 1);
        assert(st->n_nodes <= PROVIDER_NODES_MAX);
        for (size_t i = 0; i < st->n_nodes; i++) {
                assert(provider_id_valid(st->nodes[i].id));
                assert(provider_url_valid(st->nodes[i].api_url));
        }
        if (st->update.present) {
                assert(provider_version_valid(st->update.version));
                assert(provider_url_valid(st->update.url));
                assert(strlen(st->update.sha256) == SHA256_HEX_LEN);
                assert(st->update.size >= 1);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static ProviderState st;
        char err[128];
        int r;

        r = provider_state_parse((const char *) data, size, &st, err, sizeof(err));
        assert(r == 0 || r == -EINVAL || r == -E2BIG);
        assert(memchr(err, 0, sizeof(err)));
        if (r == 0)
                check_valid(&st);
        else
                assert(err[0] != 0);
        return 0;
}
