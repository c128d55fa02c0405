/* The persistent state file. The daemon is its only writer, so loading is
 * strict: a file that does not look exactly like what state_format() writes
 * is reported as corrupt (-EBADMSG with a reason) instead of being read as
 * "nothing committed", which would let a restart go back to a lower epoch.
 * Unknown keys are ignored so that a later version may add fields without
 * breaking a downgrade; an incompatible change bumps "version". */
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>

#include "atomic_file.h"
#include "macro.h"
#include "state.h"

#define STATE_VERSION  1
#define STATE_FILE_MAX (1024 * 1024)
#define STATE_MODE     0600

static int fail(char *err, size_t errlen, const char *fmt, ...) _printf_(3, 4);
static int fail(char *err, size_t errlen, const char *fmt, ...) {
        va_list ap;

        if (err && errlen > 0) {
                va_start(ap, fmt);
                vsnprintf(err, errlen, fmt, ap);
                va_end(ap);
        }
        return -EBADMSG;
}

/* Same rule as the Provider parser applies to primary.broker.vhost: it is
 * written into the settings file, so no control characters and no blanks
 * at either end. */
static bool vhost_valid(const char *s) {
        size_t n = strlen(s);

        if (n < 1 || n > PROVIDER_VHOST_MAX || s[0] == ' ' || s[n - 1] == ' ')
                return false;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char) s[i] < 0x20 || s[i] == 0x7f)
                        return false;
        return true;
}

/* "" or a valid version: the update fields are empty when unused. */
static bool version_or_empty_valid(const char *s) {
        return *s == 0 || provider_version_valid(s);
}

typedef struct Parser {
        char *err;
        size_t errlen;
} Parser;

static int get_string(Parser *p, json_t *o, const char *key, const char *where, bool (*valid)(const char *),
                      char *dst, size_t size) {
        json_t *v = json_object_get(o, key);
        const char *s;

        if (!v)
                return fail(p->err, p->errlen, "%s.%s: missing", where, key);
        if (!json_is_string(v))
                return fail(p->err, p->errlen, "%s.%s: not a string", where, key);
        s = json_string_value(v);
        if (strlen(s) >= size || !valid(s))
                return fail(p->err, p->errlen, "%s.%s: invalid value", where, key);
        strscpy(dst, size, s);
        return 0;
}

static int get_uint(Parser *p, json_t *o, const char *key, const char *where, uint64_t max, uint64_t *ret) {
        json_t *v = json_object_get(o, key);

        if (!v)
                return fail(p->err, p->errlen, "%s.%s: missing", where, key);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || (uint64_t) json_integer_value(v) > max)
                return fail(p->err, p->errlen, "%s.%s: not an integer in range", where, key);
        *ret = (uint64_t) json_integer_value(v);
        return 0;
}

static json_t *get_object(Parser *p, json_t *o, const char *key, const char *where, int *r) {
        json_t *v = json_object_get(o, key);

        if (!v || !json_is_object(v)) {
                *r = fail(p->err, p->errlen, "%s%s: %s", where, key, v ? "not an object" : "missing");
                return NULL;
        }
        return v;
}

static int parse_node(Parser *p, json_t *o, const char *where, NodeRef *ret) {
        int r;

        if (!json_is_object(o))
                return fail(p->err, p->errlen, "%s: not an object", where);
        r = get_string(p, o, "id", where, provider_id_valid, ret->id, sizeof(ret->id));
        if (r < 0)
                return r;
        return get_string(p, o, "api_url", where, provider_url_valid, ret->api_url, sizeof(ret->api_url));
}

static int parse_broker(Parser *p, json_t *o, BrokerInfo *ret) {
        const char *where = "primary.broker";
        uint64_t port;
        json_t *tls;
        int r;

        r = get_string(p, o, "host", where, provider_host_valid, ret->host, sizeof(ret->host));
        if (r < 0)
                return r;
        r = get_uint(p, o, "port", where, UINT16_MAX, &port);
        if (r < 0)
                return r;
        if (port == 0)
                return fail(p->err, p->errlen, "%s.port: out of range", where);
        ret->port = (uint16_t) port;
        r = get_string(p, o, "vhost", where, vhost_valid, ret->vhost, sizeof(ret->vhost));
        if (r < 0)
                return r;
        tls = json_object_get(o, "tls");
        if (!json_is_boolean(tls))
                return fail(p->err, p->errlen, "%s.tls: %s", where, tls ? "not a boolean" : "missing");
        ret->tls = json_is_true(tls);
        return 0;
}

/* epoch 0 means nothing committed: then there must be no primary. */
static int parse_committed(Parser *p, json_t *root, Committed *ret) {
        json_t *primary, *broker;
        int r = 0;

        r = get_uint(p, root, "epoch", "state", INT64_MAX, &ret->epoch);
        if (r < 0)
                return r;
        primary = json_object_get(root, "primary");
        if (ret->epoch == 0) {
                if (primary && !json_is_null(primary))
                        return fail(p->err, p->errlen, "primary: set while epoch is 0");
                return 0;
        }
        if (!primary || !json_is_object(primary))
                return fail(p->err, p->errlen, "primary: %s at epoch %llu",
                            primary && !json_is_null(primary) ? "not an object" : "missing",
                            (unsigned long long) ret->epoch);
        r = parse_node(p, primary, "primary", &ret->primary);
        if (r < 0)
                return r;
        broker = get_object(p, primary, "broker", "primary.", &r);
        if (!broker)
                return r;
        return parse_broker(p, broker, &ret->broker);
}

static int parse_nodes(Parser *p, json_t *root, PersistentState *s) {
        json_t *nodes = json_object_get(root, "nodes"), *n;
        size_t i;

        if (!nodes || !json_is_array(nodes))
                return fail(p->err, p->errlen, "nodes: %s", nodes ? "not an array" : "missing");
        if (json_array_size(nodes) > PROVIDER_NODES_MAX)
                return fail(p->err, p->errlen, "nodes: more than %d", PROVIDER_NODES_MAX);
        json_array_foreach(nodes, i, n) {
                char where[32];
                int r;

                snprintf(where, sizeof(where), "nodes[%zu]", i);
                r = parse_node(p, n, where, &s->nodes[i]);
                if (r < 0)
                        return r;
        }
        s->n_nodes = json_array_size(nodes);
        return 0;
}

static int parse_update(Parser *p, json_t *root, UpdateRecord *s) {
        const char *w = "update";
        uint64_t failures;
        json_t *u;
        int r = 0;

        u = get_object(p, root, "update", "", &r);
        if (!u)
                return r;
        if ((r = get_string(p, u, "applied_version", w, version_or_empty_valid, s->applied_version,
                            sizeof(s->applied_version))) < 0 ||
            (r = get_string(p, u, "delay_version", w, version_or_empty_valid, s->delay_version,
                            sizeof(s->delay_version))) < 0 ||
            (r = get_uint(p, u, "delay_not_before_usec", w, INT64_MAX, &s->delay_not_before_usec)) < 0 ||
            (r = get_string(p, u, "failed_version", w, version_or_empty_valid, s->failed_version,
                            sizeof(s->failed_version))) < 0 ||
            (r = get_uint(p, u, "failures", w, UINT32_MAX, &failures)) < 0 ||
            (r = get_uint(p, u, "retry_not_before_usec", w, INT64_MAX, &s->retry_not_before_usec)) < 0)
                return r;
        s->failures = (unsigned) failures;
        return 0;
}

static int parse_root(Parser *p, json_t *root, PersistentState *s) {
        uint64_t version;
        int r;

        if (!json_is_object(root))
                return fail(p->err, p->errlen, "not a JSON object");
        r = get_uint(p, root, "version", "state", INT64_MAX, &version);
        if (r < 0)
                return r;
        if (version != STATE_VERSION)
                return fail(p->err, p->errlen, "state.version: %llu not supported",
                            (unsigned long long) version);
        r = parse_committed(p, root, &s->committed);
        if (r < 0)
                return r;
        r = parse_nodes(p, root, s);
        if (r < 0)
                return r;
        return parse_update(p, root, &s->update);
}

int state_parse(const char *json, size_t len, PersistentState *ret, char *err, size_t errlen) {
        Parser p = {.err = err, .errlen = errlen};
        PersistentState s = {};
        json_error_t jerr;
        json_t *root;
        int r;

        if (!json || !ret)
                return -EINVAL;
        if (len > STATE_FILE_MAX)
                return fail(err, errlen, "larger than %d bytes", STATE_FILE_MAX);
        root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!root)
                return fail(err, errlen, "line %d: %s", jerr.line, jerr.text);
        r = parse_root(&p, root, &s);
        json_decref(root);
        if (r < 0)
                return r;
        *ret = s;
        return 0;
}

int state_load(const char *path, PersistentState *ret, char *err, size_t errlen) {
        _cleanup_(freep) char *buf = NULL;
        size_t len;
        int r;

        r = read_file_full(path, STATE_FILE_MAX, &buf, &len);
        if (r == -ENOENT) {
                *ret = (PersistentState){};
                return 0;
        }
        if (r == -EFBIG)
                return fail(err, errlen, "larger than %d bytes", STATE_FILE_MAX);
        if (r < 0) {
                if (err && errlen > 0)
                        snprintf(err, errlen, "%s", strerror(-r));
                return r;
        }
        /* An empty file is what a crash before the first fsync of a
         * non-atomic writer leaves; ours never does, so it is corrupt too. */
        r = state_parse(buf, len, ret, err, errlen);
        if (r < 0)
                *ret = (PersistentState){};
        return r;
}

static json_t *node_to_json(const NodeRef *n) {
        return json_pack("{s:s, s:s}", "id", n->id, "api_url", n->api_url);
}

static json_t *state_to_json(const PersistentState *s) {
        const Committed *c = &s->committed;
        const UpdateRecord *u = &s->update;
        json_t *root, *nodes, *primary = NULL;

        if (c->epoch > 0)
                primary = json_pack("{s:s, s:s, s:{s:s, s:i, s:s, s:b}}", "id", c->primary.id, "api_url",
                                    c->primary.api_url, "broker", "host", c->broker.host, "port",
                                    (int) c->broker.port, "vhost", c->broker.vhost, "tls", c->broker.tls);
        else
                primary = json_null();
        nodes = json_array();
        if (!primary || !nodes)
                goto oom;
        for (size_t i = 0; i < s->n_nodes && i < PROVIDER_NODES_MAX; i++)
                if (json_array_append_new(nodes, node_to_json(&s->nodes[i])) < 0)
                        goto oom;
        root = json_pack("{s:i, s:I, s:o, s:o, s:{s:s, s:s, s:I, s:s, s:I, s:I}}", "version", STATE_VERSION,
                         "epoch", (json_int_t) c->epoch, "primary", primary, "nodes", nodes, "update",
                         "applied_version", u->applied_version, "delay_version", u->delay_version,
                         "delay_not_before_usec", (json_int_t) u->delay_not_before_usec, "failed_version",
                         u->failed_version, "failures", (json_int_t) u->failures, "retry_not_before_usec",
                         (json_int_t) u->retry_not_before_usec);
        /* json_pack's "o" steals the references even on failure. */
        return root;
oom:
        json_decref(primary);
        json_decref(nodes);
        return NULL;
}

int state_format(const PersistentState *s, char **ret_json) {
        _cleanup_(freep) char *text = NULL;
        json_t *root;
        size_t n;

        if (!s || !ret_json)
                return -EINVAL;
        /* What we write must load again: refuse values the loader rejects. */
        if (s->committed.epoch > INT64_MAX || s->update.delay_not_before_usec > INT64_MAX ||
            s->update.retry_not_before_usec > INT64_MAX || s->n_nodes > PROVIDER_NODES_MAX)
                return -ERANGE;
        /* json_pack() fails on invalid UTF-8 as well as on OOM; the
         * former is the likely one. */
        root = state_to_json(s);
        if (!root)
                return -EINVAL;
        text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        json_decref(root);
        if (!text)
                return -ENOMEM;
        /* A trailing newline, for people who cat the file. */
        n = strlen(text);
        *ret_json = realloc(text, n + 2);
        if (!*ret_json)
                return -ENOMEM;
        text = NULL;
        memcpy(*ret_json + n, "\n", 2);
        return 0;
}

int state_save(const char *path, const PersistentState *s) {
        _cleanup_(freep) char *json = NULL;
        PersistentState check;
        int r;

        r = state_format(s, &json);
        if (r < 0)
                return r;
        /* A file the next start refuses to load is worse than no write. */
        if (state_parse(json, strlen(json), &check, NULL, 0) < 0)
                return -EINVAL;
        r = atomic_file_write(path, json, strlen(json), STATE_MODE);
        /* Renamed but the directory not synced: not durable yet, and the
         * epoch fence depends on durability, so the caller retries. */
        return r > 0 ? -r : r;
}
