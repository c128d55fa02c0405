/* The Provider state document (contract section 3): JSON to plain structs.
 *
 * Every field is checked against the limits of the contract before anything
 * else sees it: these values end up in the broker settings file, in the
 * environment of on_change, in URLs we fetch and in logs, so a value that
 * could break any of those is rejected here, once. Unknown fields are
 * ignored so that a newer Provider can add some without breaking Agents. */

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "macro.h"
#include "provider.h"
#include "util.h"

#ifndef streq
#define streq(a, b) (strcmp((a), (b)) == 0)
#endif

/* Error reporting: the first failure wins, "field: reason". */
typedef struct Parser {
        char *err;
        size_t errlen;
} Parser;

_printf_(3, 4) static int fail(Parser *p, const char *field, const char *fmt, ...) {
        va_list ap;
        int n;

        if (!p->err || p->errlen == 0)
                return -EINVAL;
        n = snprintf(p->err, p->errlen, "%s: ", field);
        if (n >= 0 && (size_t) n < p->errlen) {
                va_start(ap, fmt);
                vsnprintf(p->err + n, p->errlen - (size_t) n, fmt, ap);
                va_end(ap);
        }
        return -EINVAL;
}

static bool is_printable_nonspace(unsigned char c) {
        return c > 0x20 && c < 0x7f;
}

static bool is_id_char(unsigned char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
               c == '_' || c == '-';
}

bool provider_id_valid(const char *s) {
        size_t n;

        if (!s)
                return false;
        n = strlen(s);
        if (n < 1 || n > PROVIDER_ID_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!is_id_char((unsigned char) s[i]))
                        return false;
        return true;
}

/* Plain ASCII without spaces or control characters: the URL is handed to
 * libcurl and printed in logs and in the settings file, where a newline or a
 * space would split it. The scheme (http or https, any letter case, as in
 * the config) is written with "//" and the host right after it (libcurl
 * would also take "https:/h"); libcurl's URL parser judges the rest. */
bool provider_url_valid(const char *s) {
        size_t n, scheme;
        UrlInfo info;

        if (!s)
                return false;
        n = strlen(s);
        if (n > PROVIDER_URL_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!is_printable_nonspace((unsigned char) s[i]))
                        return false;
        scheme = strncasecmp(s, "https://", 8) == 0 ? 8 : strncasecmp(s, "http://", 7) == 0 ? 7 : 0;
        if (scheme == 0 || s[scheme] == 0 || s[scheme] == '/')
                return false;
        return url_inspect(s, &info) == 0;
}

/* Dot-separated labels of [A-Za-z0-9_-], 1-63 characters each, not starting
 * with '-' (it would read as an option to a tool), one trailing dot allowed.
 * An IPv4 literal is such a name too. */
static bool hostname_valid(const char *s, size_t n) {
        size_t label = 0;

        for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char) s[i];

                if (c == '.') {
                        if (label == 0)
                                return false;
                        label = 0;
                        continue;
                }
                if (!is_id_char(c))
                        return false;
                if (label == 0 && c == '-')
                        return false;
                if (++label > 63)
                        return false;
        }
        return n > 0;
}

/* An IPv6 literal, bare ("fd00::1") or bracketed ("[fd00::1]"). */
static bool ipv6_literal_valid(const char *s, size_t n) {
        char buf[INET6_ADDRSTRLEN + 2];
        struct in6_addr a;

        if (n >= 2 && s[0] == '[' && s[n - 1] == ']') {
                s++;
                n -= 2;
        }
        if (n == 0 || n >= sizeof(buf))
                return false;
        memcpy(buf, s, n);
        buf[n] = 0;
        return inet_pton(AF_INET6, buf, &a) == 1;
}

/* An IPv6 literal may come as "[fd00::1]" or "fd00::1": one form inside
 * the daemon (the settings file's and getaddrinfo()'s), without brackets. */
static void unbracket(char *host) {
        size_t n = strlen(host);

        if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
                memmove(host, host + 1, n - 2);
                host[n - 2] = 0;
        }
}

bool provider_host_valid(const char *s) {
        size_t n;

        if (!s)
                return false;
        n = strlen(s);
        if (n < 1 || n > PROVIDER_HOST_MAX)
                return false;
        return hostname_valid(s, n) || ipv6_literal_valid(s, n);
}

bool provider_version_valid(const char *s) {
        size_t n;

        if (!s)
                return false;
        n = strlen(s);
        if (n < 1 || n > PROVIDER_VERSION_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!is_printable_nonspace((unsigned char) s[i]))
                        return false;
        return true;
}

/* A vhost goes into the settings file as "vhost = ...": no control
 * characters (a newline would inject a key) and no leading or trailing
 * blank (an INI reader would strip it). */
static bool vhost_valid(const char *s) {
        size_t n = strlen(s);

        if (n < 1 || n > PROVIDER_VHOST_MAX)
                return false;
        if (s[0] == ' ' || s[n - 1] == ' ')
                return false;
        for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char) s[i];
                if (c < 0x20 || c == 0x7f)
                        return false;
        }
        return true;
}

static bool sha256_hex_valid(const char *s) {
        if (strlen(s) != SHA256_HEX_LEN)
                return false;
        for (size_t i = 0; i < SHA256_HEX_LEN; i++)
                if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
                        return false;
        return true;
}

bool broker_info_equal(const BrokerInfo *a, const BrokerInfo *b) {
        return streq_ptr(a->host, b->host) && a->port == b->port && streq_ptr(a->vhost, b->vhost) &&
               a->tls == b->tls;
}

/* ---- typed field access ---- */

static int get_member(Parser *p, json_t *obj, const char *key, const char *field, json_t **ret) {
        json_t *v = json_object_get(obj, key);

        if (!v || json_is_null(v))
                return fail(p, field, "missing");
        *ret = v;
        return 0;
}

/* A string field: present, a string without embedded NUL, of at most
 * size-1 bytes, accepted by valid(). */
static int get_string(Parser *p, json_t *obj, const char *key, const char *field,
                      bool (*valid)(const char *), char *dst, size_t size) {
        const char *s;
        json_t *v = NULL;
        size_t n;
        int r;

        r = get_member(p, obj, key, field, &v);
        if (r < 0)
                return r;
        if (!json_is_string(v))
                return fail(p, field, "not a string");
        s = json_string_value(v);
        n = json_string_length(v);
        if (strlen(s) != n)
                return fail(p, field, "contains a NUL byte");
        if (n >= size)
                return fail(p, field, "too long (%zu bytes, at most %zu)", n, size - 1);
        if (!valid(s))
                return fail(p, field, "invalid");
        memcpy(dst, s, n + 1);
        return 0;
}

/* An integer field in [min, max]. Floats, strings and booleans are rejected;
 * jansson already refuses integers that do not fit a json_int_t. */
static int get_uint(Parser *p, json_t *obj, const char *key, const char *field, uint64_t min, uint64_t max,
                    uint64_t *ret) {
        json_int_t i;
        json_t *v = NULL;
        int r;

        r = get_member(p, obj, key, field, &v);
        if (r < 0)
                return r;
        if (!json_is_integer(v))
                return fail(p, field, "not an integer");
        i = json_integer_value(v);
        if (i < 0 || (uint64_t) i < min || (uint64_t) i > max)
                return fail(p, field, "out of range");
        *ret = (uint64_t) i;
        return 0;
}

static int get_object(Parser *p, json_t *obj, const char *key, const char *field, json_t **ret) {
        json_t *v = NULL;
        int r;

        r = get_member(p, obj, key, field, &v);
        if (r < 0)
                return r;
        if (!json_is_object(v))
                return fail(p, field, "not an object");
        *ret = v;
        return 0;
}

/* ---- the document, section by section ---- */

static int parse_node(Parser *p, json_t *root, ProviderState *st) {
        char role[16];
        json_t *o = NULL;
        int r;

        r = get_object(p, root, "node", "node", &o);
        if (r < 0)
                return r;
        r = get_string(p, o, "id", "node.id", provider_id_valid, st->node.id, sizeof(st->node.id));
        if (r < 0)
                return r;
        r = get_string(p, o, "role", "node.role", provider_id_valid, role, sizeof(role));
        if (r < 0)
                return r;
        if (streq(role, "primary"))
                st->role = NODE_ROLE_PRIMARY;
        else if (streq(role, "standby"))
                st->role = NODE_ROLE_STANDBY;
        else
                return fail(p, "node.role", "must be \"primary\" or \"standby\"");
        r = get_string(p, o, "version", "node.version", provider_version_valid, st->version,
                       sizeof(st->version));
        if (r < 0)
                return r;
        return get_string(p, o, "api_url", "node.api_url", provider_url_valid, st->node.api_url,
                          sizeof(st->node.api_url));
}

static int parse_broker(Parser *p, json_t *primary, BrokerInfo *b) {
        uint64_t port;
        json_t *o = NULL, *tls = NULL;
        int r;

        r = get_object(p, primary, "broker", "primary.broker", &o);
        if (r < 0)
                return r;
        r = get_string(p, o, "host", "primary.broker.host", provider_host_valid, b->host, sizeof(b->host));
        if (r < 0)
                return r;
        unbracket(b->host);
        r = get_uint(p, o, "port", "primary.broker.port", 1, 65535, &port);
        if (r < 0)
                return r;
        b->port = (uint16_t) port;
        r = get_string(p, o, "vhost", "primary.broker.vhost", vhost_valid, b->vhost, sizeof(b->vhost));
        if (r < 0)
                return r;
        r = get_member(p, o, "tls", "primary.broker.tls", &tls);
        if (r < 0)
                return r;
        if (!json_is_boolean(tls))
                return fail(p, "primary.broker.tls", "not a boolean");
        b->tls = json_is_true(tls);
        return 0;
}

static int parse_primary(Parser *p, json_t *root, ProviderState *st) {
        json_t *o = NULL;
        int r;

        r = get_object(p, root, "primary", "primary", &o);
        if (r < 0)
                return r;
        r = get_string(p, o, "id", "primary.id", provider_id_valid, st->primary.id, sizeof(st->primary.id));
        if (r < 0)
                return r;
        r = get_string(p, o, "api_url", "primary.api_url", provider_url_valid, st->primary.api_url,
                       sizeof(st->primary.api_url));
        if (r < 0)
                return r;
        return parse_broker(p, o, &st->broker);
}

static int parse_node_ref(Parser *p, json_t *v, size_t i, NodeRef *ref) {
        char field[64];
        int r;

        snprintf(field, sizeof(field), "nodes[%zu]", i);
        if (!json_is_object(v))
                return fail(p, field, "not an object");
        snprintf(field, sizeof(field), "nodes[%zu].id", i);
        r = get_string(p, v, "id", field, provider_id_valid, ref->id, sizeof(ref->id));
        if (r < 0)
                return r;
        snprintf(field, sizeof(field), "nodes[%zu].api_url", i);
        return get_string(p, v, "api_url", field, provider_url_valid, ref->api_url, sizeof(ref->api_url));
}

/* A node listed twice (by id or by address) would count twice towards a
 * majority, so it is an error rather than something to merge. */
static int check_duplicate(Parser *p, const ProviderState *st, size_t i) {
        char field[64];

        for (size_t j = 0; j < i; j++) {
                if (streq(st->nodes[j].id, st->nodes[i].id)) {
                        snprintf(field, sizeof(field), "nodes[%zu].id", i);
                        return fail(p, field, "duplicate of nodes[%zu]", j);
                }
                if (streq(st->nodes[j].api_url, st->nodes[i].api_url)) {
                        snprintf(field, sizeof(field), "nodes[%zu].api_url", i);
                        return fail(p, field, "duplicate of nodes[%zu]", j);
                }
        }
        return 0;
}

static int parse_nodes(Parser *p, json_t *root, ProviderState *st) {
        json_t *a = NULL;
        size_t n;
        int r;

        r = get_member(p, root, "nodes", "nodes", &a);
        if (r < 0)
                return r;
        if (!json_is_array(a))
                return fail(p, "nodes", "not an array");
        n = json_array_size(a);
        if (n > PROVIDER_NODES_MAX)
                return fail(p, "nodes", "more than %d", PROVIDER_NODES_MAX);
        for (size_t i = 0; i < n; i++) {
                r = parse_node_ref(p, json_array_get(a, i), i, &st->nodes[i]);
                if (r < 0)
                        return r;
                r = check_duplicate(p, st, i);
                if (r < 0)
                        return r;
        }
        st->n_nodes = n;
        return 0;
}

static int parse_update(Parser *p, json_t *root, AgentUpdate *u) {
        json_t *o = json_object_get(root, "agent_update");
        int r;

        if (!o || json_is_null(o)) {
                u->present = false;
                return 0;
        }
        if (!json_is_object(o))
                return fail(p, "agent_update", "not an object");
        r = get_string(p, o, "version", "agent_update.version", provider_version_valid, u->version,
                       sizeof(u->version));
        if (r < 0)
                return r;
        r = get_string(p, o, "url", "agent_update.url", provider_url_valid, u->url, sizeof(u->url));
        if (r < 0)
                return r;
        r = get_string(p, o, "sha256", "agent_update.sha256", sha256_hex_valid, u->sha256,
                       sizeof(u->sha256));
        if (r < 0)
                return r;
        r = get_uint(p, o, "size", "agent_update.size", 1, UINT64_MAX, &u->size);
        if (r < 0)
                return r;
        u->present = true;
        return 0;
}

static int parse_root(Parser *p, json_t *root, ProviderState *st) {
        int r;

        if (!json_is_object(root))
                return fail(p, "body", "not a JSON object");
        r = parse_node(p, root, st);
        if (r < 0)
                return r;
        r = get_uint(p, root, "epoch", "epoch", 1, UINT64_MAX, &st->epoch);
        if (r < 0)
                return r;
        r = parse_primary(p, root, st);
        if (r < 0)
                return r;
        r = parse_nodes(p, root, st);
        if (r < 0)
                return r;
        return parse_update(p, root, &st->update);
}

int provider_state_parse(const char *body, size_t len, ProviderState *ret, char *err, size_t errlen) {
        /* Parsed into a local so that *ret is written only on success. */
        ProviderState st = {};
        Parser p = {.err = err, .errlen = errlen};
        json_error_t jerr;
        json_t *root;
        int r;

        if (err && errlen > 0)
                err[0] = 0;
        if (len > PROVIDER_BODY_MAX) {
                fail(&p, "body", "larger than %d bytes", PROVIDER_BODY_MAX);
                return -E2BIG;
        }
        if (!body)
                return fail(&p, "body", "missing");

        /* NULs are let through the decoder so that the field holding one
         * is named in the error; get_string() rejects them. */
        root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
        if (!root)
                return fail(&p, "body", "not JSON: %s (line %d, column %d)", jerr.text, jerr.line,
                            jerr.column);
        r = parse_root(&p, root, &st);
        json_decref(root);
        if (r < 0)
                return r;
        *ret = st;
        return 0;
}

/* ---- events (contract section 4): checked with the same field validators ---- */

static const char *json_str(json_t *o, const char *key) {
        return json_string_value(json_object_get(o, key));
}

/* NULL when the body fits the routing key's row of contract section 4,
 * else what is wrong. Extra fields are allowed (newer Providers). */
static const char *event_fields_check(const char *key, json_t *o) {
        if (streq_ptr(key, "provider.primary.changed")) {
                json_t *e = json_object_get(o, "epoch");
                if (!json_is_integer(e) || json_integer_value(e) < 1)
                        return "epoch: not a positive integer";
                if (!provider_id_valid(json_str(o, "primary_id")))
                        return "primary_id: missing or invalid";
                if (!provider_url_valid(json_str(o, "api_url")))
                        return "api_url: missing or invalid";
                return NULL;
        }
        if (streq_ptr(key, "provider.version.changed")) {
                if (!provider_id_valid(json_str(o, "node_id")))
                        return "node_id: missing or invalid";
                if (!provider_version_valid(json_str(o, "version")))
                        return "version: missing or invalid";
                return NULL;
        }
        if (streq_ptr(key, "agent.update.available"))
                return provider_version_valid(json_str(o, "version")) ? NULL : "version: missing or invalid";
        return "unknown routing key";
}

const char *provider_event_check(const char *routing_key, const void *body, size_t len) {
        json_error_t jerr;
        const char *why;
        json_t *o;

        o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!o || !json_is_object(o)) {
                json_decref(o);
                return "body is not a JSON object";
        }
        why = event_fields_check(routing_key, o);
        json_decref(o);
        return why;
}
