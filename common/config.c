/* Configuration: the INI file of contract section 2 into a validated Config.
 *
 * inih does the INI syntax; this file does everything else. A custom reader
 * sits between the file and inih so that we know the line of every key
 * (Debian's inih 55 handler has no line argument), see section headers even
 * when the section is empty, and refuse NUL and control bytes. The parsers
 * of single values live in config_values.c; this file words their errors
 * as FILE:LINE: message and checks what spans keys. */
#include <ctype.h>
#include <curl/curl.h>
#include <ini.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/un.h>

#include "config.h"
#include "macro.h"
#include "util.h"

#define MAX_LINE               65536 /* longest accepted line, bytes */
#define MAX_URL                2048  /* contract: URLs at most 2048 bytes */
#define MAX_STABLE_ROUNDS      1000  /* more would hold updates forever */
#define DEFAULT_UPDATE_COMMAND "/usr/lib/dsm-agent-sync/apply-update"

typedef enum KeyType {
        KEY_URL_LIST,
        KEY_URL,
        KEY_SECRET,
        KEY_PATH,      /* non-empty string */
        KEY_PATH_OPT,  /* empty value: unset */
        KEY_STRING,    /* non-empty, no whitespace */
        KEY_DURATION,  /* > 0 */
        KEY_DURATION0, /* >= 0 */
        KEY_JITTER,
        KEY_MODE,
        KEY_ARGV,
        KEY_LISTEN,
        KEY_ALLOW,
        KEY_BOOL,
        KEY_ROUNDS,
        KEY_WINDOW,
        KEY_LOG_LEVEL,
        KEY_LOG_TARGET,
        KEY_SOCKET,   /* a Unix socket path, or "off" */
        KEY_AGENT_ID, /* 1-64 of [A-Za-z0-9._:-] */
} KeyType;

typedef struct KeyDef {
        const char *section;
        const char *name;
        KeyType type;
        size_t offset;  /* the field written */
        size_t offset2; /* KEY_SECRET: where the secret goes */
} KeyDef;

#define F(field) offsetof(Config, field)

static const KeyDef keys[] = {
        {"provider", "endpoints", KEY_URL_LIST, 0, 0},
        {"provider", "load_balancer", KEY_URL, F(load_balancer), 0},
        {"provider", "token_file", KEY_SECRET, F(provider_token_file), F(provider_token)},
        {"provider", "ca_file", KEY_PATH_OPT, F(provider_ca_file), 0},
        {"provider", "poll_interval", KEY_DURATION, F(poll_interval), 0},
        {"provider", "poll_jitter", KEY_JITTER, F(poll_jitter), 0},
        {"provider", "fast_poll_interval", KEY_DURATION, F(fast_poll_interval), 0},
        {"provider", "hint_spread", KEY_DURATION0, F(hint_spread), 0},
        {"provider", "request_timeout", KEY_DURATION, F(request_timeout), 0},
        {"broker", "username", KEY_STRING, F(broker_username), 0},
        {"broker", "password_file", KEY_SECRET, F(broker_password_file), F(broker_password)},
        {"broker", "exchange", KEY_STRING, F(exchange), 0},
        {"broker", "heartbeat", KEY_DURATION0, F(heartbeat), 0},
        {"broker", "ca_file", KEY_PATH_OPT, F(broker_ca_file), 0},
        {"broker", "settings_file", KEY_PATH, F(settings_file), 0},
        {"broker", "settings_mode", KEY_MODE, F(settings_mode), 0},
        {"broker", "on_change", KEY_ARGV, F(on_change_argv), 0},
        {"broker", "on_change_timeout", KEY_DURATION, F(on_change_timeout), 0},
        {"notify", "listen", KEY_LISTEN, 0, 0},
        {"notify", "allow", KEY_ALLOW, 0, 0},
        {"notify", "token_file", KEY_SECRET, F(notify_token_file), F(notify_token)},
        {"notify", "tls_cert", KEY_PATH_OPT, F(tls_cert), 0},
        {"notify", "tls_key", KEY_PATH_OPT, F(tls_key), 0},
        {"update", "enabled", KEY_BOOL, F(update_enabled), 0},
        {"update", "stable_rounds", KEY_ROUNDS, F(stable_rounds), 0},
        {"update", "max_delay", KEY_DURATION0, F(max_delay), 0},
        {"update", "window", KEY_WINDOW, 0, 0},
        {"update", "agent_version_file", KEY_PATH, F(agent_version_file), 0},
        {"update", "download_dir", KEY_PATH, F(download_dir), 0},
        {"update", "command", KEY_ARGV, F(update_command_argv), 0},
        {"update", "command_timeout", KEY_DURATION, F(command_timeout), 0},
        {"daemon", "state_file", KEY_PATH, F(state_file), 0},
        {"daemon", "log_level", KEY_LOG_LEVEL, F(log_level), 0},
        {"daemon", "log_target", KEY_LOG_TARGET, F(log_target), 0},
        {"daemon", "control_socket", KEY_SOCKET, F(control_socket), 0},
        {"daemon", "agent_id", KEY_AGENT_ID, F(agent_id), 0},
};

static const char *const sections[] = {"provider", "broker", "notify", "update", "daemon"};

typedef struct Parser {
        Config *c;
        FILE *f;
        char *buf; /* getline buffer */
        size_t bufsize;
        unsigned line;                   /* line inih is processing */
        unsigned seen[ELEMENTSOF(keys)]; /* line of each key, 0: absent */
        int r;                           /* first error, 0: none */
        unsigned err_line;
        char *err;
        size_t errlen;
} Parser;

static void *field(Config *c, size_t offset) {
        return (char *) c + offset;
}

/* Records the first error only: later ones are usually consequences. */
_printf_(4, 5) static int fail(Parser *p, unsigned line, int r, const char *fmt, ...) {
        char msg[CONFIG_ERROR_MAX];
        va_list ap;

        if (p->r != 0)
                return p->r;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        if (p->err && p->errlen > 0)
                snprintf(p->err, p->errlen, "%s:%u: %s", p->c->path, line, msg);
        p->r = r;
        p->err_line = line;
        return r;
}

static char *strip(char *s) {
        size_t n;

        while (*s == ' ' || *s == '\t')
                s++;
        n = strlen(s);
        while (n > 0 && isspace((unsigned char) s[n - 1]))
                s[--n] = 0;
        return s;
}

static bool has_space_or_control(const char *s) {
        for (; *s; s++)
                if (isspace((unsigned char) *s) || iscntrl((unsigned char) *s))
                        return true;
        return false;
}

static int set_string(Parser *p, char **dst, const char *value) {
        char *s = NULL;

        if (value) {
                s = strdup(value);
                if (!s)
                        return fail(p, p->line, -ENOMEM, "out of memory");
        }
        free(*dst);
        *dst = s;
        return 0;
}

/* The URL for an error message, with a user name and password (of a URL
 * that may be invalid otherwise) replaced by "***": a secret pasted into a
 * URL must not reach the log. */
static const char *url_shown(const char *url, char *buf, size_t size) {
        const char *auth = strstr(url, "://"), *at;

        auth = auth ? auth + 3 : url;
        at = memrchr(auth, '@', strcspn(auth, "/?#"));
        if (!at)
                return url;
        snprintf(buf, size, "%.*s***%s", (int) (auth - url), url, at);
        return buf;
}

/* Validates one URL in place (strips trailing '/'); 0 or an error.
 * libcurl's URL parser judges host and port; the scheme must be written
 * out with "//" and the host right after it (libcurl would also take
 * "https:/h" and "https:///h", and guess what was meant). */
static int check_url(Parser *p, const char *key, char *url) {
        size_t n = strlen(url);
        size_t scheme = strncasecmp(url, "https://", 8) == 0  ? 8
                        : strncasecmp(url, "http://", 7) == 0 ? 7
                                                              : 0;
        const char *host = url + scheme;
        char buf[128];
        UrlInfo info;
        int r;

        while (n > scheme && url[n - 1] == '/')
                url[--n] = 0;
        if (n > MAX_URL)
                return fail(p, p->line, -EINVAL, "%s: URL longer than %d bytes", key, MAX_URL);
        if (has_space_or_control(url))
                return fail(p, p->line, -EINVAL, "%s: URL '%.80s' contains whitespace", key,
                            url_shown(url, buf, sizeof(buf)));
        if (scheme == 0)
                return fail(p, p->line, -EINVAL, "%s: URL '%.80s' must start with http:// or https://", key,
                            url_shown(url, buf, sizeof(buf)));
        r = url_inspect(url, &info);
        /* Contract section 2: secrets come from files, never from the INI. */
        if (r >= 0 && info.has_userinfo)
                return fail(p, p->line, -EINVAL,
                            "%s: URL '%.80s' contains credentials (user@ or user:password@); the "
                            "Provider token comes from token_file",
                            key, url_shown(url, buf, sizeof(buf)));
        if (*host == 0 || *host == '/' || *host == ':')
                return fail(p, p->line, -EINVAL, "%s: URL '%.80s' has no host", key,
                            url_shown(url, buf, sizeof(buf)));
        if (r < 0)
                return fail(p, p->line, -EINVAL, "%s: URL '%.80s' has an invalid host or port", key,
                            url_shown(url, buf, sizeof(buf)));
        return 0;
}

/* Path and query of a valid URL as libcurl normalises them, without
 * trailing '/'; NULL when out of memory. */
static char *url_path_query(const char *url) {
        CURLU *h = curl_url();
        char *path = NULL, *query = NULL, *ret = NULL;

        if (h && curl_url_set(h, CURLUPART_URL, url, 0) == CURLUE_OK &&
            curl_url_get(h, CURLUPART_PATH, &path, 0) == CURLUE_OK) {
                size_t n = strlen(path);

                while (n > 0 && path[n - 1] == '/')
                        n--;
                (void) curl_url_get(h, CURLUPART_QUERY, &query, 0);
                if (asprintf(&ret, "%.*s%s%s", (int) n, path, query ? "?" : "", query ?: "") < 0)
                        ret = NULL;
        }
        curl_free(path);
        curl_free(query);
        curl_url_cleanup(h);
        return ret;
}

/* The same place, however written: scheme and host in any letter case,
 * the port implied or explicit, with or without a trailing '/'. */
static bool url_same_target(const char *a, const char *b) {
        _cleanup_(freep) char *pa = NULL, *pb = NULL;

        if (!url_same_origin(a, b))
                return false;
        pa = url_path_query(a);
        pb = url_path_query(b);
        return pa && pb && strcmp(pa, pb) == 0;
}

/* Calls fn for every comma-separated element, trimmed; refuses empty ones. */
static int for_each_item(Parser *p, const char *key, const char *value, int (*fn)(Parser *, char *)) {
        _cleanup_(freep) char *copy = strdup(value);
        char *item, *next;

        if (!copy)
                return fail(p, p->line, -ENOMEM, "out of memory");
        for (item = copy; item; item = next) {
                int r;

                next = strchr(item, ',');
                if (next)
                        *next++ = 0;
                item = strip(item);
                if (*item == 0)
                        return fail(p, p->line, -EINVAL, "%s: empty element in list", key);
                r = fn(p, item);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int add_endpoint(Parser *p, char *url) {
        Config *c = p->c;
        int r;

        r = check_url(p, "endpoints", url);
        if (r < 0)
                return r;
        if (c->n_endpoints >= CONFIG_MAX_ENDPOINTS)
                return fail(p, p->line, -EINVAL, "endpoints: more than %d URLs", CONFIG_MAX_ENDPOINTS);
        for (size_t i = 0; i < c->n_endpoints; i++)
                if (url_same_target(c->endpoints[i], url))
                        return fail(p, p->line, -EINVAL, "endpoints: '%.80s' listed twice", url);
        c->endpoints[c->n_endpoints] = strdup(url);
        if (!c->endpoints[c->n_endpoints])
                return fail(p, p->line, -ENOMEM, "out of memory");
        c->n_endpoints++;
        return 0;
}

static int add_allow(Parser *p, char *item) {
        Config *c = p->c;
        Cidr cidr;

        if (parse_cidr(item, &cidr) < 0)
                return fail(p, p->line, -EINVAL, "allow: invalid network '%.80s' (want CIDR or address)",
                            item);
        if (c->n_allow >= CONFIG_MAX_ALLOW)
                return fail(p, p->line, -EINVAL, "allow: more than %d networks", CONFIG_MAX_ALLOW);
        c->allow[c->n_allow++] = cidr;
        return 0;
}

static int parse_window_key(Parser *p, const char *value) {
        Config *c = p->c;
        unsigned start, end;

        if (*value == 0) {
                c->window_set = false;
                return set_string(p, &c->window, NULL);
        }
        if (parse_window(value, &start, &end) < 0)
                return fail(p, p->line, -EINVAL, "window: '%.40s' is not HH:MM-HH:MM", value);
        if (start == end)
                return fail(p, p->line, -EINVAL, "window: start and end are equal (%.40s)", value);
        c->window_set = true;
        c->window_start_min = start;
        c->window_end_min = end;
        return set_string(p, &c->window, value);
}

static int parse_listen(Parser *p, const char *value) {
        Config *c = p->c;

        if (strcmp(value, "off") == 0) {
                c->notify_enabled = false;
                memset(&c->notify_addr, 0, sizeof(c->notify_addr));
                c->notify_addrlen = 0;
        } else if (parse_listen_address(value, &c->notify_addr, &c->notify_addrlen) >= 0)
                c->notify_enabled = true;
        else
                return fail(p, p->line, -EINVAL, "listen: '%.80s' is not \"off\", IPv4:port or [IPv6]:port",
                            value);
        return set_string(p, &c->notify_listen, value);
}

static int parse_socket_key(Parser *p, const KeyDef *k, const char *value) {
        char **dst = field(p->c, k->offset);
        int r;

        if (strcmp(value, "off") == 0)
                return set_string(p, dst, NULL);
        r = parse_socket_path(value);
        if (r == -ENAMETOOLONG)
                return fail(p, p->line, -EINVAL,
                            "%s: '%.80s' is longer than %zu bytes (the limit of a Unix socket path)",
                            k->name, value, sizeof(((struct sockaddr_un *) NULL)->sun_path) - 1);
        if (r < 0)
                return fail(p, p->line, -EINVAL, "%s: '%.80s' is not \"off\" or an absolute file path",
                            k->name, value);
        return set_string(p, dst, value);
}

static int parse_secret_key(Parser *p, const KeyDef *k, const char *value) {
        char **path = field(p->c, k->offset), **secret = field(p->c, k->offset2);
        char *s = NULL;
        int r;

        if (*value) {
                r = read_secret_file(value, &s);
                if (r == -ENODATA)
                        return fail(p, p->line, -EINVAL, "%s: secret file %s is empty", k->name, value);
                if (r == -E2BIG)
                        return fail(p, p->line, -EINVAL,
                                    "%s: secret file %s: first line longer than %d bytes", k->name, value,
                                    CONFIG_MAX_SECRET);
                if (r < 0)
                        return fail(p, p->line, r, "%s: cannot read secret file %s: %s", k->name, value,
                                    strerror(-r));
        }
        r = set_string(p, path, *value ? value : NULL);
        if (r < 0) {
                secret_free(s);
                return r;
        }
        secret_free(*secret);
        *secret = s;
        return 0;
}

static int parse_duration_key(Parser *p, const KeyDef *k, const char *value) {
        usec_t *dst = field(p->c, k->offset), v;
        int r;

        r = parse_duration(value, &v);
        if (r == -ERANGE)
                return fail(p, p->line, -EINVAL, "%s: duration '%.40s' is too large (max 366 days)", k->name,
                            value);
        if (r < 0)
                return fail(p, p->line, -EINVAL,
                            "%s: invalid duration '%.40s' (want a number with ms, s, m or h)", k->name,
                            value);
        if (v == 0 && k->type == KEY_DURATION)
                return fail(p, p->line, -EINVAL, "%s: duration must be greater than 0", k->name);
        if (k->offset == F(heartbeat) && v > 65535 * USEC_PER_SEC)
                return fail(p, p->line, -EINVAL, "%s: duration '%.40s' is too large (max 65535s)", k->name,
                            value);
        *dst = v;
        return 0;
}

static int parse_argv_key(Parser *p, const KeyDef *k, const char *value) {
        char ***dst = field(p->c, k->offset), **argv = NULL;
        int r;

        r = parse_argv(value, &argv);
        if (r == -E2BIG)
                return fail(p, p->line, -EINVAL, "%s: more than %d arguments", k->name, CONFIG_MAX_ARGV);
        if (r < 0)
                return fail(p, p->line, r, "out of memory");
        /* Run without a shell and without a PATH search: say exactly what. */
        if (argv && argv[0][0] != '/') {
                strv_free(argv);
                return fail(p, p->line, -EINVAL, "%s: program must be an absolute path", k->name);
        }
        strv_free(*dst);
        *dst = argv;
        return 0;
}

static int parse_scalar_key(Parser *p, const KeyDef *k, const char *value) {
        Config *c = p->c;
        int r;

        switch (k->type) {
        case KEY_JITTER: {
                char *end;
                double d;

                errno = 0;
                d = strtod(value, &end);
                if (*value == 0 || *end || errno != 0 || !isfinite(d) || d < 0 || d >= 1)
                        return fail(p, p->line, -EINVAL, "%s: '%.40s' is not a number with 0 <= x < 1",
                                    k->name, value);
                c->poll_jitter = d;
                return 0;
        }
        case KEY_MODE:
                if (parse_mode(value, &c->settings_mode) < 0)
                        return fail(p, p->line, -EINVAL, "%s: '%.40s' is not an octal mode <= 07777",
                                    k->name, value);
                return 0;
        case KEY_BOOL:
                r = parse_bool(value);
                if (r < 0)
                        return fail(p, p->line, -EINVAL, "%s: '%.40s' is not a boolean (true/false)",
                                    k->name, value);
                c->update_enabled = r;
                return 0;
        case KEY_ROUNDS: {
                unsigned long v = 0;
                char *end = NULL;

                if (isdigit((unsigned char) value[0]) && strlen(value) <= 4)
                        v = strtoul(value, &end, 10);
                if (!end || *end || v < 1 || v > MAX_STABLE_ROUNDS)
                        return fail(p, p->line, -EINVAL, "%s: '%.40s' is not an integer from 1 to %d",
                                    k->name, value, MAX_STABLE_ROUNDS);
                c->stable_rounds = (unsigned) v;
                return 0;
        }
        case KEY_LOG_LEVEL:
                r = log_level_from_string(value);
                if (r < 0) {
                        char names[64];
                        size_t pos = 0;

                        /* The names log_level_from_string() takes, most verbose first. */
                        for (int i = LOG_DEBUG; i >= LOG_ERR; i--)
                                pos += (size_t) snprintf(names + pos, sizeof(names) - pos, "%s%s",
                                                         log_priority_to_string(i), i > LOG_ERR ? ", " : "");
                        return fail(p, p->line, -EINVAL, "%s: '%.40s' is not one of %s", k->name, value,
                                    names);
                }
                c->log_level = r;
                return 0;
        case KEY_LOG_TARGET:
                if (strcmp(value, "auto") == 0)
                        c->log_target = LOG_TARGET_AUTO;
                else if (strcmp(value, "journal") == 0)
                        c->log_target = LOG_TARGET_JOURNAL;
                else if (strcmp(value, "stderr") == 0)
                        c->log_target = LOG_TARGET_STDERR;
                else
                        return fail(p, p->line, -EINVAL, "%s: '%.40s' is not one of auto, journal, stderr",
                                    k->name, value);
                return 0;
        default:
                return fail(p, p->line, -EINVAL, "internal error: no parser for %s", k->name);
        }
}

static int parse_key(Parser *p, const KeyDef *k, const char *value) {
        char **str = field(p->c, k->offset);

        switch (k->type) {
        case KEY_URL_LIST:
                if (*value == 0)
                        return 0; /* unset; the required-key check runs at the end */
                return for_each_item(p, k->name, value, add_endpoint);
        case KEY_URL: {
                _cleanup_(freep) char *url = strdup(value);

                if (!url)
                        return fail(p, p->line, -ENOMEM, "out of memory");
                if (*url && check_url(p, k->name, url) < 0)
                        return p->r;
                return set_string(p, str, *url ? url : NULL);
        }
        case KEY_SECRET:
                return parse_secret_key(p, k, value);
        case KEY_PATH:
        case KEY_STRING:
                if (*value == 0)
                        return fail(p, p->line, -EINVAL, "%s must not be empty", k->name);
                if (k->type == KEY_STRING && has_space_or_control(value))
                        return fail(p, p->line, -EINVAL, "%s: '%.80s' contains whitespace", k->name, value);
                return set_string(p, str, value);
        case KEY_PATH_OPT:
                return set_string(p, str, *value ? value : NULL);
        case KEY_DURATION:
        case KEY_DURATION0:
                return parse_duration_key(p, k, value);
        case KEY_ARGV:
                return parse_argv_key(p, k, value);
        case KEY_LISTEN:
                return parse_listen(p, value);
        case KEY_ALLOW:
                p->c->n_allow = 0; /* replaces the default */
                if (*value == 0)
                        return fail(p, p->line, -EINVAL,
                                    "allow: empty (use listen = off to refuse everyone)");
                return for_each_item(p, k->name, value, add_allow);
        case KEY_WINDOW:
                return parse_window_key(p, value);
        case KEY_SOCKET:
                return parse_socket_key(p, k, value);
        case KEY_AGENT_ID:
                if (!config_agent_id_valid(value))
                        return fail(p, p->line, -EINVAL,
                                    "agent_id: '%.80s' is not 1-%d characters of A-Z a-z 0-9 . _ : -", value,
                                    CONFIG_AGENT_ID_MAX);
                return set_string(p, str, value);
        default:
                return parse_scalar_key(p, k, value);
        }
}

static int handle_key(Parser *p, const char *section, const char *name, const char *value) {
        if (!*section)
                return fail(p, p->line, -EINVAL, "key '%.64s' outside of a [section]", name);
        for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
                if (strcmp(keys[i].section, section) != 0 || strcmp(keys[i].name, name) != 0)
                        continue;
                if (p->seen[i])
                        return fail(p, p->line, -EINVAL, "duplicate key '%s' in [%s] (first at line %u)",
                                    name, section, p->seen[i]);
                p->seen[i] = p->line;
                return parse_key(p, &keys[i], value);
        }
        /* The value is not shown: a secret pasted under a wrong key must not leak. */
        return fail(p, p->line, -EINVAL, "unknown key '%.64s' in [%s]", name, section);
}

/* inih callback: 0 tells inih this line is the error line. */
static int handler(void *userdata, const char *section, const char *name, const char *value) {
        Parser *p = userdata;

        if (p->r != 0)
                return 1; /* first error wins; skip the rest quietly */
        return handle_key(p, section ? section : "", name, value ? value : "") < 0 ? 0 : 1;
}

static bool section_known(const char *name, size_t n) {
        for (size_t i = 0; i < ELEMENTSOF(sections); i++)
                if (strlen(sections[i]) == n && strncmp(sections[i], name, n) == 0)
                        return true;
        return false;
}

/* An ini_reader that counts lines and checks what inih cannot: NUL and
 * control bytes, over-long lines, and unknown (possibly empty) sections. */
static char *reader(char *str, int num, void *userdata) {
        Parser *p = userdata;
        const char *s;
        ssize_t n;

        if (p->r != 0)
                return NULL;
        errno = 0;
        n = getline(&p->buf, &p->bufsize, p->f);
        if (n < 0) {
                if (errno != 0)
                        fail(p, p->line, negative_errno(), "read error: %s", strerror(errno));
                return NULL;
        }
        p->line++;
        if (n >= MAX_LINE || n >= num) {
                fail(p, p->line, -EINVAL, "line too long (max %d bytes)", MAX_LINE);
                return NULL;
        }
        for (ssize_t i = 0; i < n; i++) {
                unsigned char ch = (unsigned char) p->buf[i];
                if (ch == 0 || (iscntrl(ch) && ch != '\t' && ch != '\n' && ch != '\r')) {
                        fail(p, p->line, -EINVAL, "control character in line");
                        return NULL;
                }
        }
        s = p->buf;
        if (p->line == 1 && strncmp(s, "\xEF\xBB\xBF", 3) == 0)
                s += 3; /* a UTF-8 BOM; inih skips it too */
        while (*s == ' ' || *s == '\t')
                s++;
        if (*s == '[') {
                size_t len = strcspn(s + 1, "]");
                if (s[1 + len] != ']') {
                        fail(p, p->line, -EINVAL, "section header without ']'");
                        return NULL;
                }
                if (!section_known(s + 1, len)) {
                        fail(p, p->line, -EINVAL, "unknown section [%.*s]", (int) (len > 64 ? 64 : len),
                             s + 1);
                        return NULL;
                }
        }
        memcpy(str, p->buf, (size_t) n + 1);
        return str;
}

static int set_defaults(Config *c) {
        static const char *const allow[] = {"127.0.0.0/8", "::1"};

        c->poll_interval = 30 * USEC_PER_SEC;
        c->poll_jitter = 0.2;
        c->fast_poll_interval = 500 * USEC_PER_MSEC;
        c->request_timeout = 5 * USEC_PER_SEC;
        c->heartbeat = 10 * USEC_PER_SEC;
        c->settings_mode = 0640;
        c->on_change_timeout = 30 * USEC_PER_SEC;
        c->stable_rounds = 2;
        c->max_delay = 5 * 60 * USEC_PER_SEC;
        c->update_enabled = true;
        c->command_timeout = 10 * 60 * USEC_PER_SEC;
        c->log_level = LOG_INFO;
        c->log_target = LOG_TARGET_AUTO;
        for (size_t i = 0; i < ELEMENTSOF(allow); i++)
                (void) parse_cidr(allow[i], &c->allow[c->n_allow++]);
        c->notify_enabled = true;
        (void) parse_listen_address("0.0.0.0:8631", &c->notify_addr, &c->notify_addrlen);

        if (!(c->broker_username = strdup("guest")) || !(c->exchange = strdup("dsm.provider.events")) ||
            !(c->settings_file = strdup("/etc/dsm-agent/rabbitmq.ini")) ||
            !(c->notify_listen = strdup("0.0.0.0:8631")) ||
            !(c->agent_version_file = strdup("/etc/dsm-agent/VERSION")) ||
            !(c->download_dir = strdup("/var/lib/dsm-agent-sync/updates")) ||
            !(c->state_file = strdup("/var/lib/dsm-agent-sync/state.json")) ||
            !(c->control_socket = strdup(CONFIG_DEFAULT_CONTROL_SOCKET)))
                return -ENOMEM;
        return parse_argv(DEFAULT_UPDATE_COMMAND, &c->update_command_argv);
}

static unsigned seen_line(const Parser *p, const char *section, const char *name) {
        for (size_t i = 0; i < ELEMENTSOF(keys); i++)
                if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].name, name) == 0)
                        return p->seen[i];
        return 0;
}

/* Checks that span keys; LINE is the most relevant key's line, else 0. */
static int validate(Parser *p) {
        Config *c = p->c;

        if (c->n_endpoints == 0 && !c->load_balancer)
                return fail(p, 0, -EINVAL, "[provider] needs endpoints or load_balancer");
        /* The load balancer answers from any node: counted as a node it
         * would cast a vote of whichever node it reached. */
        for (size_t i = 0; c->load_balancer && i < c->n_endpoints; i++)
                if (url_same_target(c->load_balancer, c->endpoints[i]))
                        return fail(p, seen_line(p, "provider", "load_balancer"), -EINVAL,
                                    "load_balancer '%.80s' is also in endpoints ('%.80s'); discovery "
                                    "through a load balancer must not count as a node",
                                    c->load_balancer, c->endpoints[i]);
        if (c->fast_poll_interval > c->poll_interval) {
                unsigned line = seen_line(p, "provider", "fast_poll_interval");
                return fail(p, line ? line : seen_line(p, "provider", "poll_interval"), -EINVAL,
                            "fast_poll_interval must not exceed poll_interval");
        }
        if (c->hint_spread > c->poll_interval)
                return fail(p, seen_line(p, "provider", "hint_spread"), -EINVAL,
                            "hint_spread must not exceed poll_interval");
        if (!c->tls_cert != !c->tls_key) {
                unsigned line = seen_line(p, "notify", c->tls_cert ? "tls_cert" : "tls_key");
                return fail(p, line, -EINVAL, "[notify] tls_cert and tls_key must be set together");
        }
        if (c->update_enabled && !c->update_command_argv)
                return fail(p, seen_line(p, "update", "command"), -EINVAL,
                            "[update] command is empty but enabled = true");
        if (!c->broker_password && !(c->broker_password = strdup("guest")))
                return fail(p, 0, -ENOMEM, "out of memory");
        return 0;
}

int config_load(const char *path, Config **ret, char *err, size_t errlen) {
        Parser p = {.err = err, .errlen = errlen};
        Config *c;
        int r;

        if (err && errlen > 0)
                err[0] = 0;
        if (!path || !ret)
                return -EINVAL;
        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        p.c = c;
        c->path = strdup(path);
        if (!c->path) {
                free(c);
                return -ENOMEM;
        }
        if (set_defaults(c) < 0) {
                config_free(c);
                return -ENOMEM;
        }

        p.f = fopen(path, "re");
        if (!p.f) {
                r = negative_errno();
                fail(&p, 0, r, "cannot open: %s", strerror(-r));
                config_free(c);
                return r;
        }

        /* Debian's inih exposes its build options as variables: one heap line
         * buffer of MAX_LINE lets URL lists pass the 200-byte default (the
         * reader refuses longer lines instead of letting inih split them), and without
         * multi-line values an indented line is an ordinary line. */
        ini_use_stack = false;
        ini_allow_realloc = false;
        ini_initial_alloc = MAX_LINE + 3;
        ini_max_line = MAX_LINE + 3;
        ini_allow_multiline = false;
        ini_allow_inline_comments = true;

        r = ini_parse_stream(reader, &p, handler, &p);
        fclose(p.f);
        free(p.buf);
        /* inih returns the first bad line, ours or a syntax error of its own. */
        if (r > 0 && (p.r == 0 || (unsigned) r != p.err_line)) {
                p.r = 0;
                fail(&p, (unsigned) r, -EINVAL, "syntax error (want [section] or key = value)");
        } else if (p.r == 0 && r < 0)
                fail(&p, 0, -ENOMEM, "out of memory");
        if (p.r == 0)
                validate(&p);
        if (p.r != 0) {
                r = p.r;
                config_free(c);
                return r;
        }
        *ret = c;
        return 0;
}

Config *config_free(Config *c) {
        if (!c)
                return NULL;
        free(c->path);
        for (size_t i = 0; i < c->n_endpoints; i++)
                free(c->endpoints[i]);
        free(c->load_balancer);
        secret_free(c->provider_token);
        free(c->provider_token_file);
        free(c->provider_ca_file);
        free(c->broker_username);
        secret_free(c->broker_password);
        free(c->broker_password_file);
        free(c->exchange);
        free(c->broker_ca_file);
        free(c->settings_file);
        strv_free(c->on_change_argv);
        free(c->notify_listen);
        secret_free(c->notify_token);
        free(c->notify_token_file);
        free(c->tls_cert);
        free(c->tls_key);
        free(c->window);
        free(c->agent_version_file);
        free(c->download_dir);
        strv_free(c->update_command_argv);
        free(c->state_file);
        free(c->control_socket);
        free(c->agent_id);
        free(c);
        return NULL;
}
