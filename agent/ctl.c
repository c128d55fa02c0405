/* dsm-agent-syncctl: asks the local daemon.
 *
 *   dsm-agent-syncctl [-c FILE] status [--json]
 *   dsm-agent-syncctl [-c FILE] notify
 *
 * It reads the daemon's config. When the control socket ([daemon]
 * control_socket) is there it asks through it, with no token: the
 * socket's mode and group admit root and the service group. Otherwise,
 * or when the socket refuses the connection, it asks the notify listener
 * with the notify token, as the Provider does. Exit status: 0 done, 1 the
 * daemon did not answer or refused, 2 usage, 78 a bad config. */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "config.h"
#include "macro.h"
#include "version.h"

#define CTL_EXIT_FAIL    1
#define CTL_EXIT_USAGE   2
#define CTL_EXIT_CONFIG  78
#define CTL_RESPONSE_MAX (1024 * 1024)
#define CTL_TIMEOUT_MS   5000L
/* request(): the connection itself failed (nothing was sent). */
#define CTL_NO_CONNECTION (-2)

typedef struct Buffer {
        char *data;
        size_t len;
        bool overflow;
} Buffer;

typedef struct Target {
        char url_base[192];    /* "https://127.0.0.1:8631" */
        char display[160];     /* "127.0.0.1:8631", "control socket /run/..." */
        const char *unix_path; /* the control socket; NULL: the notify listener */
} Target;

/* Where to ask: the control socket, the notify listener, or both in
 * this order. */
typedef struct Targets {
        Target control, net;
        bool has_control, has_net;
} Targets;

static void help(void) {
        printf("Usage: dsm-agent-syncctl [-c FILE] COMMAND\n"
               "\n"
               "Asks the local dsm-agent-syncd through its control socket, or its notify\n"
               "listener (with the notify token) when there is no control socket.\n"
               "\n"
               "Commands:\n"
               "  status [--json]   show the daemon's state (--json: the status document)\n"
               "  notify            wake the daemon: it polls every Provider node now\n"
               "\n"
               "Options:\n"
               "  -c, --config FILE  the daemon's config (default %s)\n"
               "  -h, --help         this help\n"
               "      --version      the version\n",
               CONFIG_DEFAULT_PATH);
}

/* The daemon listens on a wildcard address or on one address; a local
 * client talks to loopback in the first case. */
static int target_from_config(const Config *cfg, Target *ret) {
        const struct sockaddr *sa = (const struct sockaddr *) &cfg->notify_addr;
        const char *scheme = cfg->tls_cert ? "https" : "http";
        char host[INET6_ADDRSTRLEN];
        unsigned port;

        if (sa->sa_family == AF_INET) {
                const struct sockaddr_in *in = (const struct sockaddr_in *) sa;
                struct in_addr a = in->sin_addr;

                if (a.s_addr == htonl(INADDR_ANY))
                        a.s_addr = htonl(INADDR_LOOPBACK);
                if (!inet_ntop(AF_INET, &a, host, sizeof(host)))
                        return -EINVAL;
                port = ntohs(in->sin_port);
                (void) snprintf(ret->display, sizeof(ret->display), "%s:%u", host, port);
        } else if (sa->sa_family == AF_INET6) {
                const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *) sa;
                struct in6_addr a = in6->sin6_addr;

                if (IN6_IS_ADDR_UNSPECIFIED(&a))
                        a = in6addr_loopback;
                if (!inet_ntop(AF_INET6, &a, host, sizeof(host)))
                        return -EINVAL;
                port = ntohs(in6->sin6_port);
                (void) snprintf(ret->display, sizeof(ret->display), "[%s]:%u", host, port);
        } else
                return -EAFNOSUPPORT;
        (void) snprintf(ret->url_base, sizeof(ret->url_base), "%s://%s", scheme, ret->display);
        return 0;
}

/* The control socket, when it is there (a user outside its group may
 * not even see it: that user needs the notify token anyway). */
static bool control_target(const Config *cfg, Target *ret) {
        struct stat st;

        if (!cfg->control_socket || stat(cfg->control_socket, &st) < 0 || !S_ISSOCK(st.st_mode))
                return false;
        *ret = (Target){.unix_path = cfg->control_socket};
        (void) strscpy(ret->url_base, sizeof(ret->url_base), "http://localhost");
        (void) snprintf(ret->display, sizeof(ret->display), "control socket %s", cfg->control_socket);
        return true;
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *userdata) {
        Buffer *b = userdata;
        size_t n = size * nmemb;
        char *p;

        if (b->len + n > CTL_RESPONSE_MAX) {
                b->overflow = true;
                return 0;
        }
        p = realloc(b->data, b->len + n + 1);
        if (!p)
                return 0;
        memcpy(p + b->len, ptr, n);
        b->data = p;
        b->len += n;
        b->data[b->len] = 0;
        return n;
}

/* One request to the daemon. Returns the HTTP status, or after printing
 * why the daemon did not answer -1, or CTL_NO_CONNECTION when it could
 * not even be reached (so nothing was sent). */
static long request(const Config *cfg, const Target *t, const char *method, const char *path,
                    const char *body, Buffer *out) {
        char url[256], auth[1024], errbuf[CURL_ERROR_SIZE] = "";
        struct curl_slist *headers = NULL;
        CURL *c;
        CURLcode rc;
        long status = -1, os_errno = 0;

        (void) snprintf(url, sizeof(url), "%s%s", t->url_base, path);
        /* The control socket asks for no token: none leaves the tool. */
        if (t->unix_path)
                auth[0] = 0;
        else if (snprintf(auth, sizeof(auth), "Authorization: Bearer %s",
                          cfg->notify_token ? cfg->notify_token : "") >= (int) sizeof(auth)) {
                fprintf(stderr, "dsm-agent-syncctl: the notify token is too long\n");
                return -1;
        }
        c = curl_easy_init();
        if (!c) {
                fprintf(stderr, "dsm-agent-syncctl: cannot initialize libcurl\n");
                return -1;
        }
        if (auth[0])
                headers = curl_slist_append(headers, auth);
        if (body)
                headers = curl_slist_append(headers, "Content-Type: application/json");
        explicit_bzero(auth, sizeof(auth));

        (void) curl_easy_setopt(c, CURLOPT_URL, url);
        (void) curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
        (void) curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
        (void) curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        (void) curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
        (void) curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, CTL_TIMEOUT_MS);
        (void) curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, CTL_TIMEOUT_MS);
        (void) curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
        (void) curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
        (void) curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
        if (body)
                (void) curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        if (t->unix_path)
                (void) curl_easy_setopt(c, CURLOPT_UNIX_SOCKET_PATH, t->unix_path);
        else if (cfg->tls_cert) {
                /* The daemon's own certificate is the trust anchor (curl
                 * accepts a partial chain), so the peer is still verified.
                 * The host name is not: we connect to a loopback address,
                 * which the certificate, made for the Provider's view of
                 * this host, does not name. */
                (void) curl_easy_setopt(c, CURLOPT_CAINFO, cfg->tls_cert);
                (void) curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
                (void) curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 0L);
        }

        rc = curl_easy_perform(c);
        if (rc == CURLE_OK)
                (void) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        else {
                (void) curl_easy_getinfo(c, CURLINFO_OS_ERRNO, &os_errno);
                if (t->unix_path && (os_errno == EACCES || os_errno == EPERM))
                        fprintf(stderr,
                                "dsm-agent-syncctl: no permission to use the %s: %s (root and its group "
                                "may)\n",
                                t->display, strerror((int) os_errno));
                else
                        fprintf(stderr, "dsm-agent-syncd is not answering on %s: %s\n", t->display,
                                os_errno > 0 ? strerror((int) os_errno)
                                             : (errbuf[0] ? errbuf : curl_easy_strerror(rc)));
                if (rc == CURLE_COULDNT_CONNECT)
                        status = CTL_NO_CONNECTION;
        }
        curl_slist_free_all(headers);
        curl_easy_cleanup(c);
        return status;
}

/* One request through the control socket when it is there, else (or
 * when it cannot be reached) through the notify listener; *ret_used is
 * the target asked last. Returns as request() does. */
static long ask(const Config *cfg, const Targets *ts, const char *method, const char *path, const char *body,
                Buffer *out, const Target **ret_used) {
        long status;

        if (ts->has_control) {
                *ret_used = &ts->control;
                status = request(cfg, &ts->control, method, path, body, out);
                if (status != CTL_NO_CONNECTION)
                        return status;
                if (!ts->has_net) {
                        fprintf(stderr, "dsm-agent-syncctl: [notify] listen is off: nothing else to try\n");
                        return status;
                }
                fprintf(stderr, "dsm-agent-syncctl: trying the notify listener %s (with the notify token)\n",
                        ts->net.display);
        }
        *ret_used = &ts->net;
        status = request(cfg, &ts->net, method, path, body, out);
        if (status < 0 && !ts->has_control && cfg->control_socket)
                fprintf(stderr,
                        "dsm-agent-syncctl: there is no control socket at %s either (is the daemon "
                        "running?)\n",
                        cfg->control_socket);
        return status;
}

/* Prints why the daemon refused, from its {"error": ...} answer. */
static int refused(const Target *t, long status, const Buffer *b) {
        json_t *j = b->data ? json_loadb(b->data, b->len, 0, NULL) : NULL;
        const char *msg = json_string_value(json_object_get(j, "error"));

        fprintf(stderr, "dsm-agent-syncd on %s refused the request: HTTP %ld%s%s\n", t->display, status,
                msg ? ": " : "", msg ? msg : "");
        if (status == 401)
                fprintf(stderr, "(is [notify] token_file the one the daemon reads?)\n");
        json_decref(j);
        return CTL_EXIT_FAIL;
}

static const char *str(json_t *o, const char *key) {
        const char *s = json_string_value(json_object_get(o, key));
        return s ? s : "-";
}

static void print_counters(json_t *doc) {
        json_t *c = json_object_get(doc, "counters");
        const char *key;
        json_t *v;
        bool first = true;

        printf("Counters:    ");
        json_object_foreach(c, key, v) {
                printf("%s%s %" JSON_INTEGER_FORMAT, first ? "" : ", ", key, json_integer_value(v));
                first = false;
        }
        printf("%s\n", first ? "-" : "");
}

static void print_nodes(json_t *doc) {
        json_t *nodes = json_object_get(doc, "nodes"), *n;
        size_t i;

        printf("Nodes:%s\n", json_array_size(nodes) ? "" : "       none known");
        if (json_array_size(nodes) == 0)
                return;
        printf("  %-16s %-8s %-12s %-6s %-21s %s\n", "ID", "ROLE", "VERSION", "EPOCH", "LAST SEEN", "ERROR");
        json_array_foreach(nodes, i, n) {
                char epoch[24] = "-";

                if (json_is_integer(json_object_get(n, "epoch")))
                        (void) snprintf(epoch, sizeof(epoch), "%" JSON_INTEGER_FORMAT,
                                        json_integer_value(json_object_get(n, "epoch")));
                printf("  %-16s %-8s %-12s %-6s %-21s %s\n",
                       json_is_string(json_object_get(n, "id")) ? str(n, "id") : str(n, "api_url"),
                       str(n, "role"), str(n, "version"), epoch, str(n, "last_seen"), str(n, "error"));
        }
}

/* What a support engineer does about a reason or warning the daemon
 * reports, for the first screen of `status`: the cause is the daemon's own
 * words, the hint points at the fix (docs/operations.md has the runbook). */
static const char *hint_for(const char *text) {
        static const struct {
                const char *match, *hint;
                bool anywhere; /* match inside the text, not only at its start */
        } hints[] = {
                {"version_skew:",
                 "applied once every Provider node runs the offered version: finish the "
                 "Provider update",
                 false},
                {"node_unreachable:", "applied once every Provider node answers at its own api_url", false},
                {"outside_window:", "applied inside [update] window", false},
                {"settling:", "applied after [update] stable_rounds rounds in agreement", false},
                {"stale primary",
                 "ignored by this Agent; Provider operators should demote or resynchronize "
                 "that node",
                 false},
                {"primary conflict", "nothing is followed until the Provider operators resolve it", false},
                {"cluster size", "check the Provider's HA cluster (3 or 4 nodes)", false},
                {"ACCESS_REFUSED", "check [broker] username and password_file", true},
        };

        for (size_t i = 0; text && i < ELEMENTSOF(hints); i++)
                if (hints[i].anywhere ? strstr(text, hints[i].match) != NULL
                                      : strncmp(text, hints[i].match, strlen(hints[i].match)) == 0)
                        return hints[i].hint;
        return NULL;
}

static void print_hint(const char *text) {
        const char *hint = hint_for(text);

        if (hint)
                printf("    -> %s\n", hint);
}

static void print_human(json_t *doc) {
        json_t *p = json_object_get(doc, "primary"), *b = json_object_get(p, "broker");
        json_t *u = json_object_get(doc, "update"), *w = json_object_get(doc, "warnings"), *v;
        size_t i;

        if (json_is_object(p))
                printf("Primary:     %s (%s), epoch %" JSON_INTEGER_FORMAT "\n", str(p, "id"),
                       str(p, "api_url"), json_integer_value(json_object_get(doc, "epoch")));
        else
                printf("Primary:     none committed yet\n");
        if (json_is_object(b))
                printf("Broker:      %s:%" JSON_INTEGER_FORMAT " vhost %s%s, %s\n", str(b, "host"),
                       json_integer_value(json_object_get(b, "port")), str(b, "vhost"),
                       json_is_true(json_object_get(b, "tls")) ? " (tls)" : "",
                       str(doc, "broker_connection"));
        else
                printf("Broker:      %s\n", str(doc, "broker_connection"));
        if (json_is_string(json_object_get(doc, "broker_error"))) {
                printf("  last error: %s\n", str(doc, "broker_error"));
                print_hint(str(doc, "broker_error"));
        }
        printf("Last poll:   %s\n", str(doc, "last_poll"));
        printf("Last change: %s\n", str(doc, "last_change"));
        print_nodes(doc);
        printf("Warnings:%s\n", json_array_size(w) ? "" : "    none");
        json_array_foreach(w, i, v) {
                printf("  %s\n", json_string_value(v) ? json_string_value(v) : "?");
                print_hint(json_string_value(v));
        }
        printf("Update:      %s%s%s%s, target %s, installed %s\n", str(u, "state"),
               json_is_string(json_object_get(u, "reason")) ? " (" : "",
               json_is_string(json_object_get(u, "reason")) ? str(u, "reason") : "",
               json_is_string(json_object_get(u, "reason")) ? ")" : "", str(u, "target"),
               str(u, "installed"));
        if (json_is_string(json_object_get(u, "reason")))
                print_hint(str(u, "reason"));
        print_counters(doc);
        printf("Daemon:      %s\n", str(doc, "daemon_version"));
}

static int cmd_status(const Config *cfg, const Targets *ts, bool json_out) {
        const Target *t = NULL;
        Buffer b = {};
        json_t *doc;
        long status;
        int r = CTL_EXIT_FAIL;

        status = ask(cfg, ts, "GET", "/v1/status", NULL, &b, &t);
        if (status < 0)
                goto out;
        if (status != 200) {
                r = refused(t, status, &b);
                goto out;
        }
        doc = json_loadb(b.data ? b.data : "", b.len, 0, NULL);
        if (!json_is_object(doc)) {
                fprintf(stderr, "dsm-agent-syncd on %s sent a status that is not a JSON object\n",
                        t->display);
                json_decref(doc);
                goto out;
        }
        if (json_out) {
                (void) json_dumpf(doc, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
                putchar('\n');
        } else
                print_human(doc);
        json_decref(doc);
        r = 0;
out:
        free(b.data);
        return r;
}

static int cmd_notify(const Config *cfg, const Targets *ts) {
        const Target *t = NULL;
        Buffer b = {};
        long status;
        int r = CTL_EXIT_FAIL;

        status = ask(cfg, ts, "POST", "/v1/notify", "{\"reason\":\"dsm-agent-syncctl\"}", &b, &t);
        if (status == 202) {
                printf("dsm-agent-syncd accepted the notify: a poll round starts now\n");
                r = 0;
        } else if (status >= 0)
                r = refused(t, status, &b);
        free(b.data);
        return r;
}

int main(int argc, char **argv) {
        static const struct option opts[] = {
                {"config", required_argument, NULL, 'c'},
                {"help", no_argument, NULL, 'h'},
                {"version", no_argument, NULL, 'V'},
                {},
        };
        const char *path = CONFIG_DEFAULT_PATH, *cmd;
        char err[CONFIG_ERROR_MAX] = "";
        bool json_out = false;
        Config *cfg = NULL;
        Targets ts = {};
        int c, r;

        while ((c = getopt_long(argc, argv, "+c:h", opts, NULL)) >= 0)
                switch (c) {
                case 'c':
                        path = optarg;
                        break;
                case 'h':
                        help();
                        return 0;
                case 'V':
                        printf("dsm-agent-syncctl %s\n", DAEMON_VERSION);
                        return 0;
                default:
                        return CTL_EXIT_USAGE;
                }
        if (optind >= argc) {
                fprintf(stderr, "dsm-agent-syncctl: missing command (status or notify); see --help\n");
                return CTL_EXIT_USAGE;
        }
        cmd = argv[optind++];
        if (strcmp(cmd, "status") == 0 && optind < argc && strcmp(argv[optind], "--json") == 0) {
                json_out = true;
                optind++;
        }
        if ((strcmp(cmd, "status") != 0 && strcmp(cmd, "notify") != 0) || optind < argc) {
                fprintf(stderr, "dsm-agent-syncctl: unknown command or argument '%s'; see --help\n",
                        optind < argc ? argv[optind] : cmd);
                return CTL_EXIT_USAGE;
        }

        r = config_load(path, &cfg, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "%s\n", err[0] ? err : path);
                return CTL_EXIT_CONFIG;
        }
        ts.has_control = control_target(cfg, &ts.control);
        ts.has_net = cfg->notify_enabled;
        if (!ts.has_control && !ts.has_net) {
                fprintf(stderr,
                        "dsm-agent-syncctl: [notify] listen is off in %s and there is no control "
                        "socket%s%s: "
                        "the daemon cannot be asked\n",
                        path, cfg->control_socket ? " at " : "",
                        cfg->control_socket ? cfg->control_socket : "");
                config_free(cfg);
                return CTL_EXIT_FAIL;
        }
        if (ts.has_net && target_from_config(cfg, &ts.net) < 0) {
                fprintf(stderr, "dsm-agent-syncctl: unusable [notify] listen address in %s\n", path);
                config_free(cfg);
                return CTL_EXIT_CONFIG;
        }

        curl_global_init(CURL_GLOBAL_DEFAULT);
        r = strcmp(cmd, "status") == 0 ? cmd_status(cfg, &ts, json_out) : cmd_notify(cfg, &ts);
        curl_global_cleanup();
        config_free(cfg);
        return r;
}
