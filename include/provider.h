/* The Provider state document of contract section 3, as plain structs,
 * strictly validated. Pure: no I/O, no logging, no allocation beyond the
 * caller's struct. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PROVIDER_ID_MAX      64
#define PROVIDER_URL_MAX     2048
#define PROVIDER_HOST_MAX    253
#define PROVIDER_VHOST_MAX   255
#define PROVIDER_VERSION_MAX 64
#define PROVIDER_NODES_MAX   8 /* the product supports 4; leave room to warn */
#define PROVIDER_BODY_MAX    (1024 * 1024)
#define SHA256_HEX_LEN       64

typedef enum NodeRole {
        NODE_ROLE_STANDBY,
        NODE_ROLE_PRIMARY,
} NodeRole;

typedef struct NodeRef {
        char id[PROVIDER_ID_MAX + 1];
        char api_url[PROVIDER_URL_MAX + 1];
} NodeRef;

typedef struct BrokerInfo {
        char host[PROVIDER_HOST_MAX + 1];
        uint16_t port;
        char vhost[PROVIDER_VHOST_MAX + 1];
        bool tls;
} BrokerInfo;

typedef struct AgentUpdate {
        bool present; /* false: absent or null */
        char version[PROVIDER_VERSION_MAX + 1];
        char url[PROVIDER_URL_MAX + 1];
        char sha256[SHA256_HEX_LEN + 1];
        uint64_t size;
} AgentUpdate;

typedef struct ProviderState {
        NodeRef node;
        NodeRole role;
        char version[PROVIDER_VERSION_MAX + 1];
        uint64_t epoch;
        NodeRef primary;
        BrokerInfo broker; /* primary.broker */
        NodeRef nodes[PROVIDER_NODES_MAX];
        size_t n_nodes;
        AgentUpdate update;
} ProviderState;

/* Parses one GET /api/v1/ha/state body. On success fills *ret and returns
 * 0. On failure returns -EINVAL (or -E2BIG for a body over the limit) and
 * writes a short reason such as "epoch: not a positive integer" into err. */
int provider_state_parse(const char *body, size_t len, ProviderState *ret, char *err, size_t errlen);

/* Field validators, shared with the event and notify parsers. */
bool provider_id_valid(const char *s);
bool provider_url_valid(const char *s);  /* http:// or https://, <= 2048 bytes */
bool provider_host_valid(const char *s); /* 1-253 chars, host name or address */
bool provider_version_valid(const char *s);

bool broker_info_equal(const BrokerInfo *a, const BrokerInfo *b);

/* NULL when body (len bytes, not NUL-terminated) is a well-formed event for
 * routing_key: a JSON object fitting its row of contract section 4 (extra
 * fields allowed), else why not (a short static string). An unknown routing
 * key is never well-formed. Pure; the broker drops (acks and ignores) what
 * it rejects, and keeps bodies over 64 KiB from reaching it. */
const char *provider_event_check(const char *routing_key, const void *body, size_t len);
