/* Discovery of poll targets; see discovery.h. */
#include "discovery.h"

#include <string.h>

#include "util.h"

static bool url_listed(const char *const *list, size_t n, const char *url) {
        for (size_t i = 0; i < n; i++)
                if (strcmp(list[i], url) == 0)
                        return true;
        return false;
}

bool discovery_url_acceptable(const Config *c, const char *url) {
        bool config_plain = url_is_plain_http(c->load_balancer);
        UrlInfo u;

        if (url_inspect(url, &u) < 0 || u.has_userinfo)
                return false;
        for (size_t i = 0; i < c->n_endpoints; i++)
                if (url_is_plain_http(c->endpoints[i]))
                        config_plain = true;
        return u.https || config_plain;
}

static void add_nodes(const Config *c, const char **urls, size_t *n, size_t max, const NodeRef *nodes,
                      size_t n_nodes) {
        for (size_t i = 0; i < n_nodes && *n < max; i++)
                if (!url_listed(urls, *n, nodes[i].api_url) && discovery_url_acceptable(c, nodes[i].api_url))
                        urls[(*n)++] = nodes[i].api_url;
}

size_t discovery_targets(const Config *c, const PersistentState *state, const PollRound *round,
                         const char **urls, size_t max) {
        size_t n = 0;

        add_nodes(c, urls, &n, max, state->nodes, state->n_nodes);
        for (size_t i = 0; round && i < round->n_answers; i++) {
                const PollAnswer *a = &round->answers[i];
                if (!a->ok || (!a->via_load_balancer && state->committed.epoch > 0))
                        continue;
                add_nodes(c, urls, &n, max, a->state.nodes, a->state.n_nodes);
        }
        return n;
}
