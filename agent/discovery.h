/* Discovery: which nodes to poll besides the configured endpoints and load
 * balancer (contract section 3, rule 1). Pure: the configuration, the
 * persistent state and the latest round in, a list of URLs out. */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "poller.h"
#include "state.h"

#define DISCOVERY_MAX (4 * PROVIDER_NODES_MAX)

/* A discovered URL receives the Provider token: never one with userinfo
 * (contract section 2), never anything but http(s), and plain http only
 * when the configuration itself uses plain http. */
bool discovery_url_acceptable(const Config *c, const char *url);

/* The committed Primary's latest `nodes`, what the load balancer reports,
 * and, while nothing is committed, what any node reports; each URL once,
 * at most max. Returns the number written to urls (pointers into state
 * and round, valid as long as they are). */
size_t discovery_targets(const Config *c, const PersistentState *state, const PollRound *round,
                         const char **urls, size_t max);
