/* Unit tests of common/config.c: every key good and bad, the value parsers,
 * secrets, structural errors, the contract's example and the shipped file. */
#include <arpa/inet.h>
#include <dirent.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <setjmp.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cmocka.h>

#include "config.h"
#include "macro.h"

static char tmpdir[64];
static char cfg_path[128];
static char err[CONFIG_ERROR_MAX];

/* ---- fixtures ---- */

static int rm_rf(const char *dir) {
        DIR *d = opendir(dir);
        struct dirent *de;
        char p[512];

        if (!d)
                return -1;
        while ((de = readdir(d))) {
                if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                        continue;
                snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
                unlink(p);
        }
        closedir(d);
        return rmdir(dir);
}

static int setup(void **state) {
        (void) state;
        strscpy(tmpdir, sizeof(tmpdir), "/tmp/test_config.XXXXXX");
        if (!mkdtemp(tmpdir))
                return -1;
        snprintf(cfg_path, sizeof(cfg_path), "%s/agent-sync.ini", tmpdir);
        return 0;
}

static int teardown(void **state) {
        (void) state;
        return rm_rf(tmpdir);
}

static const char *tmp_file(const char *name, const char *content) {
        static char path[8][256];
        static unsigned next;
        char *p = path[next++ % ELEMENTSOF(path)];
        FILE *f;

        snprintf(p, sizeof(path[0]), "%s/%s", tmpdir, name);
        f = fopen(p, "w");
        assert_non_null(f);
        fputs(content, f);
        assert_int_equal(fclose(f), 0);
        return p;
}

/* Writes content as the config file and loads it. */
static int load(const char *content, Config **ret) {
        Config *c = NULL;
        int r;

        tmp_file("agent-sync.ini", content);
        err[0] = 0;
        r = config_load(cfg_path, &c, err, sizeof(err));
        if (ret)
                *ret = c;
        else
                config_free(c);
        if (r >= 0)
                assert_string_equal(err, "");
        return r;
}

/* One key in an otherwise minimal config; the key is always on line 4. */
static int load_key(const char *section, const char *key, const char *value, Config **ret) {
        char buf[8192];
        const char *base = strcmp(key, "load_balancer") == 0 ? "endpoints = http://127.0.0.1:1"
                                                             : "load_balancer = http://127.0.0.1:1";

        snprintf(buf, sizeof(buf), "[provider]\n%s\n[%s]\n%s = %s\n", base, section, key, value);
        return load(buf, ret);
}

static void assert_error(int r, unsigned line, const char *word) {
        char prefix[256];

        snprintf(prefix, sizeof(prefix), "%s:%u: ", cfg_path, line);
        if (r >= 0 || strncmp(err, prefix, strlen(prefix)) != 0 || !strstr(err, word))
                fail_msg("want error '%s...%s', got r=%d '%s'", prefix, word, r, err);
}

/* ---- keys, good ---- */

typedef struct KeyCase {
        const char *section, *key, *value, *word;
} KeyCase;

static const KeyCase good_keys[] = {
        {"provider", "endpoints", "https://p1.example:8443", NULL},
        {"provider", "endpoints", " http://a:1/ ,https://b:2,  https://c", NULL},
        {"provider", "endpoints", "", NULL},
        {"provider", "load_balancer", "https://dsm.example:8443/", NULL},
        {"provider", "load_balancer", "HTTPS://dsm.example", NULL},
        {"provider", "load_balancer", "https://[fd00::1]:8443/api", NULL},
        {"provider", "endpoints", "https://a, https://a:8443, http://a, https://a/x, https://a/y", NULL},
        {"provider", "token_file", "", NULL},
        {"provider", "ca_file", "/etc/ssl/ca.pem", NULL},
        {"provider", "ca_file", "", NULL},
        {"provider", "poll_interval", "1h", NULL},
        {"provider", "poll_interval", "45", NULL},
        {"provider", "poll_jitter", "0", NULL},
        {"provider", "poll_jitter", "0.99", NULL},
        {"provider", "fast_poll_interval", "30s", NULL},
        {"provider", "fast_poll_interval", "1ms", NULL},
        {"provider", "request_timeout", "250ms", NULL},
        {"provider", "hint_spread", "0", NULL},
        {"provider", "hint_spread", "3s", NULL},
        {"provider", "hint_spread", "30s", NULL},
        {"broker", "username", "agent-42", NULL},
        {"broker", "password_file", "", NULL},
        {"broker", "exchange", "x.y", NULL},
        {"broker", "heartbeat", "0", NULL},
        {"broker", "heartbeat", "65535s", NULL},
        {"broker", "ca_file", "", NULL},
        {"broker", "settings_file", "/tmp/x.ini", NULL},
        {"broker", "settings_mode", "600", NULL},
        {"broker", "settings_mode", "07777", NULL},
        {"broker", "settings_mode", "0", NULL},
        {"broker", "on_change", "", NULL},
        {"broker", "on_change", "/bin/true a  b\tc", NULL},
        {"broker", "on_change_timeout", "1m", NULL},
        {"notify", "listen", "off", NULL},
        {"notify", "listen", "127.0.0.1:0", NULL},
        {"notify", "listen", "[::1]:8631", NULL},
        {"notify", "allow", "10.0.0.0/8 , ::1,fe80::/10, 192.168.1.7", NULL},
        {"notify", "tls_cert", "", NULL},
        {"notify", "tls_key", "", NULL},
        {"update", "enabled", "true", NULL},
        {"update", "enabled", "No", NULL},
        {"update", "enabled", "on", NULL},
        {"update", "enabled", "0", NULL},
        {"update", "stable_rounds", "1", NULL},
        {"update", "stable_rounds", "1000", NULL},
        {"update", "max_delay", "0", NULL},
        {"update", "window", "", NULL},
        {"update", "window", "22:00-02:00", NULL},
        {"update", "window", "00:00-23:59", NULL},
        {"update", "agent_version_file", "/tmp/V", NULL},
        {"update", "download_dir", "/tmp/d", NULL},
        {"update", "command", "/usr/bin/env X=1 /bin/true", NULL},
        {"update", "command_timeout", "2h", NULL},
        {"daemon", "state_file", "/tmp/state.json", NULL},
        {"daemon", "log_level", "debug", NULL},
        {"daemon", "log_level", "notice", NULL},
        {"daemon", "log_level", "warning", NULL},
        {"daemon", "log_level", "err", NULL},
        {"daemon", "log_target", "journal", NULL},
        {"daemon", "log_target", "stderr", NULL},
        {"daemon", "control_socket", "off", NULL},
        {"daemon", "control_socket", "/run/x/control.sock", NULL},
        {"daemon", "control_socket", "/tmp/c", NULL},
};

static void test_good_keys(void **state) {
        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(good_keys); i++) {
                const KeyCase *k = &good_keys[i];
                int r = load_key(k->section, k->key, k->value, NULL);
                if (r < 0)
                        fail_msg("[%s] %s = %s: %s", k->section, k->key, k->value, err);
        }
}

/* ---- keys, bad: each error names line 4 and says what is wrong ---- */

static const KeyCase bad_keys[] = {
        {"provider", "endpoints", "ftp://p1", "http"},
        {"provider", "endpoints", "p1.example:8443", "http"},
        {"provider", "endpoints", "https://a, , https://b", "empty element"},
        {"provider", "endpoints", "https://a,", "empty element"},
        {"provider", "endpoints", "https://a b", "whitespace"},
        {"provider", "endpoints", "https://a, https://a/", "twice"},
        {"provider", "endpoints", "https://", "no host"},
        {"provider", "endpoints", "https:///path", "no host"},
        {"provider", "endpoints", "https:/a", "http"},
        {"provider", "endpoints", "https://a:99999", "invalid host or port"},
        {"provider", "endpoints", "https://a:0", "invalid host or port"},
        {"provider", "endpoints", "http://[::1", "invalid host or port"},
        {"provider", "endpoints", "https://a, HTTPS://A:443/", "twice"},
        {"provider", "endpoints", "http://a:80/x/, http://A/x", "twice"},
        {"provider", "endpoints", "http://agent:pw@host", "credentials"},
        {"provider", "load_balancer", "https://agent@dsm.example", "credentials"},
        {"provider", "load_balancer", "dsm.example", "http"},
        {"provider", "load_balancer", "https://a\tb", "whitespace"},
        {"provider", "token_file", "/nonexistent/provider.token", "/nonexistent/provider.token"},
        {"provider", "poll_interval", "0", "greater than 0"},
        {"provider", "poll_interval", "-5s", "invalid duration"},
        {"provider", "poll_interval", "abc", "invalid duration"},
        {"provider", "poll_interval", "1.5s", "invalid duration"},
        {"provider", "poll_interval", "5d", "invalid duration"},
        {"provider", "poll_interval", "", "invalid duration"},
        {"provider", "poll_interval", "99999999999999999999999", "too large"},
        {"provider", "poll_interval", "9000h", "too large"},
        {"provider", "poll_jitter", "1", "0 <= x < 1"},
        {"provider", "poll_jitter", "-0.1", "0 <= x < 1"},
        {"provider", "poll_jitter", "nan", "0 <= x < 1"},
        {"provider", "poll_jitter", "0.2x", "0 <= x < 1"},
        {"provider", "poll_jitter", "", "0 <= x < 1"},
        {"provider", "fast_poll_interval", "31s", "exceed poll_interval"},
        {"provider", "hint_spread", "31s", "exceed poll_interval"},
        {"provider", "hint_spread", "-1s", "hint_spread"},
        {"provider", "request_timeout", "0ms", "greater than 0"},
        {"broker", "username", "", "empty"},
        {"broker", "username", "a b", "whitespace"},
        {"broker", "password_file", "/nonexistent/broker.password", "/nonexistent/broker.password"},
        {"broker", "exchange", "", "empty"},
        {"broker", "heartbeat", "65536s", "too large"},
        {"broker", "heartbeat", "x", "invalid duration"},
        {"broker", "settings_file", "", "empty"},
        {"broker", "settings_mode", "10000", "octal"},
        {"broker", "settings_mode", "0648", "octal"},
        {"broker", "settings_mode", "rw-r-----", "octal"},
        {"broker", "settings_mode", "-640", "octal"},
        {"broker", "settings_mode", "", "octal"},
        {"broker", "on_change", "systemctl restart x", "absolute"},
        {"broker", "on_change",
         "/bin/a 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32",
         "more than"},
        {"broker", "on_change_timeout", "0", "greater than 0"},
        {"notify", "listen", "1.2.3.4", "listen"},
        {"notify", "listen", "on", "listen"},
        {"notify", "listen", "[::1]:65536", "listen"},
        {"notify", "listen", "::1:8631", "listen"},
        {"notify", "listen", "localhost:8631", "listen"},
        {"notify", "listen", "", "listen"},
        {"notify", "allow", "", "empty"},
        {"notify", "allow", "10.0.0.0/33", "invalid network"},
        {"notify", "allow", "10.0.0.0/8,,::1", "empty element"},
        {"notify", "allow", "example.com", "invalid network"},
        {"notify", "token_file", "/nonexistent/notify.token", "/nonexistent/notify.token"},
        {"notify", "tls_cert", "/tmp/cert.pem", "together"},
        {"notify", "tls_key", "/tmp/key.pem", "together"},
        {"update", "enabled", "maybe", "boolean"},
        {"update", "enabled", "", "boolean"},
        {"update", "stable_rounds", "0", "integer"},
        {"update", "stable_rounds", "1001", "integer"},
        {"update", "stable_rounds", "-1", "integer"},
        {"update", "stable_rounds", "2x", "integer"},
        {"update", "stable_rounds", "", "integer"},
        {"update", "max_delay", "soon", "invalid duration"},
        {"update", "window", "2:00-04:00", "HH:MM-HH:MM"},
        {"update", "window", "02:00-02:00", "equal"},
        {"update", "window", "24:00-01:00", "HH:MM-HH:MM"},
        {"update", "window", "02:60-03:00", "HH:MM-HH:MM"},
        {"update", "window", "02:00 03:00", "HH:MM-HH:MM"},
        {"update", "window", "02:00-03:00x", "HH:MM-HH:MM"},
        {"update", "agent_version_file", "", "empty"},
        {"update", "download_dir", "", "empty"},
        {"update", "command", "", "command is empty"},
        {"update", "command", "apply-update", "absolute"},
        {"update", "command_timeout", "0", "greater than 0"},
        {"daemon", "state_file", "", "empty"},
        {"daemon", "log_level", "warn", "debug, info"},
        {"daemon", "log_level", "INFO", "debug, info"},
        {"daemon", "log_level", "error", "debug, info, notice, warning, err"},
        {"daemon", "log_level", "crit", "debug, info, notice, warning, err"},
        {"daemon", "log_target", "syslog", "auto, journal"},
        {"daemon", "control_socket", "", "absolute"},
        {"daemon", "control_socket", "run/control.sock", "absolute"},
        {"daemon", "control_socket", "/run/x/", "absolute"},
        {"daemon", "control_socket", "/run/x y", "absolute"},
        {"daemon", "control_socket", "Off", "absolute"},
        {"daemon", "control_socket",
         "/run/dsm-agent-sync/a-directory-name-long-enough-to-exceed-the-limit/of-the-path-of-a-unix-socket/"
         "control.sock",
         "longer than 107 bytes"},
        {"daemon", "bogus", "1", "unknown key"},
};

static void test_bad_keys(void **state) {
        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(bad_keys); i++) {
                const KeyCase *k = &bad_keys[i];
                Config *c = (Config *) 1;
                int r = load_key(k->section, k->key, k->value, &c);
                if (r >= 0)
                        fail_msg("[%s] %s = %s: accepted", k->section, k->key, k->value);
                assert_null(c);
                assert_error(r, 4, k->word);
        }
}

static void test_list_limits(void **state) {
        char value[4096] = "", item[64];

        (void) state;
        for (int i = 0; i <= CONFIG_MAX_ENDPOINTS; i++) {
                snprintf(item, sizeof(item), "%shttps://p%d.example:8443", i ? ", " : "", i);
                strncat(value, item, sizeof(value) - strlen(value) - 1);
        }
        assert_error(load_key("provider", "endpoints", value, NULL), 4, "more than 16");

        value[0] = 0;
        for (int i = 0; i <= CONFIG_MAX_ALLOW; i++) {
                snprintf(item, sizeof(item), "%s10.0.%d.0/24", i ? "," : "", i);
                strncat(value, item, sizeof(value) - strlen(value) - 1);
        }
        assert_error(load_key("notify", "allow", value, NULL), 4, "more than 32");
}

/* inih's stock line limit is 200 bytes; real endpoint lists are longer. */
static void test_long_lines(void **state) {
        char url[2100], buf[8192];
        Config *c = NULL;

        (void) state;
        /* 2048 bytes, most of them path: a host name has at most 253. */
        memcpy(url, "https://lb.example/", 19);
        memset(url + 19, 'a', 2048 - 19);
        url[2048] = 0;
        snprintf(buf, sizeof(buf),
                 "[provider]\n"
                 "endpoints = https://provider-node-01.datacenter-east.corp.example.com:8443, "
                 "https://provider-node-02.datacenter-east.corp.example.com:8443, "
                 "https://provider-node-03.datacenter-east.corp.example.com:8443, "
                 "https://provider-node-04.datacenter-east.corp.example.com:8443   ; four nodes\n"
                 "load_balancer = %s/\n",
                 url);
        assert_int_equal(load(buf, &c), 0);
        assert_int_equal(c->n_endpoints, 4);
        assert_string_equal(c->endpoints[3],
                            "https://provider-node-04.datacenter-east.corp.example.com:8443");
        assert_string_equal(c->load_balancer, url);
        config_free(c);

        /* 2049 bytes is one too many. */
        snprintf(buf, sizeof(buf), "[provider]\nload_balancer = %sb\n", url);
        assert_error(load(buf, NULL), 2, "longer than 2048");
}

static void test_values(void **state) {
        Config *c = NULL;

        (void) state;
        assert_int_equal(load("[provider]\n"
                              "  endpoints =  http://a:1/ ,https://b:2//  ; inline comment\n"
                              "poll_interval = 2m\n"
                              "poll_jitter = 0.5\n"
                              "fast_poll_interval = 1500ms\r\n"
                              "[broker]\n"
                              "settings_mode = 600\n"
                              "on_change = /bin/echo  a\tb\n"
                              "heartbeat = 0\n"
                              "[notify]\n"
                              "listen = [::1]:0\n"
                              "allow = 10.1.2.3/8, ::1\n"
                              "[update]\n"
                              "enabled = off\n"
                              "command =\n"
                              "window = 22:30-02:15\n"
                              "[daemon]\n"
                              "log_level = warning\n"
                              "log_target = stderr\n",
                              &c),
                         0);
        assert_int_equal(c->n_endpoints, 2);
        assert_string_equal(c->endpoints[0], "http://a:1");
        assert_string_equal(c->endpoints[1], "https://b:2");
        assert_null(c->load_balancer);
        assert_int_equal(c->poll_interval, 120 * USEC_PER_SEC);
        assert_true(c->poll_jitter == 0.5);
        assert_int_equal(c->fast_poll_interval, 1500 * USEC_PER_MSEC);
        assert_int_equal(c->settings_mode, 0600);
        assert_non_null(c->on_change_argv);
        assert_string_equal(c->on_change_argv[0], "/bin/echo");
        assert_string_equal(c->on_change_argv[1], "a");
        assert_string_equal(c->on_change_argv[2], "b");
        assert_null(c->on_change_argv[3]);
        assert_int_equal(c->heartbeat, 0);
        assert_true(c->notify_enabled);
        assert_string_equal(c->notify_listen, "[::1]:0");
        assert_int_equal(c->notify_addr.ss_family, AF_INET6);
        assert_int_equal(c->notify_addrlen, sizeof(struct sockaddr_in6));
        assert_int_equal(c->n_allow, 2);
        assert_int_equal(c->allow[0].family, AF_INET);
        assert_int_equal(c->allow[0].prefixlen, 8);
        assert_int_equal(c->allow[0].addr[1], 0); /* host bits cleared */
        assert_false(c->update_enabled);
        assert_null(c->update_command_argv);
        assert_true(c->window_set);
        assert_int_equal(c->window_start_min, 22 * 60 + 30);
        assert_int_equal(c->window_end_min, 2 * 60 + 15);
        assert_string_equal(c->window, "22:30-02:15");
        assert_int_equal(c->log_level, LOG_WARNING);
        assert_int_equal(c->log_target, LOG_TARGET_STDERR);
        assert_string_equal(c->broker_password, "guest");
        config_free(c);

        assert_int_equal(load("\xEF\xBB\xBF[provider]\nendpoints = http://a\n[notify]\nlisten = off\n", &c),
                         0);
        assert_int_equal(c->n_endpoints, 1);
        assert_false(c->notify_enabled);
        assert_string_equal(c->notify_listen, "off");
        config_free(c);
}

static void test_defaults(void **state) {
        Config *c = NULL;
        struct sockaddr_in *sa;

        (void) state;
        assert_int_equal(load("[provider]\nload_balancer = https://lb\n", &c), 0);
        assert_string_equal(c->path, cfg_path);
        assert_int_equal(c->n_endpoints, 0);
        assert_null(c->provider_token);
        assert_null(c->provider_ca_file);
        assert_int_equal(c->poll_interval, 30 * USEC_PER_SEC);
        assert_true(c->poll_jitter == 0.2);
        assert_int_equal(c->fast_poll_interval, 500 * USEC_PER_MSEC);
        assert_int_equal(c->request_timeout, 5 * USEC_PER_SEC);
        assert_string_equal(c->broker_username, "guest");
        assert_string_equal(c->broker_password, "guest");
        assert_null(c->broker_password_file);
        assert_string_equal(c->exchange, "dsm.provider.events");
        assert_int_equal(c->heartbeat, 10 * USEC_PER_SEC);
        assert_string_equal(c->settings_file, "/etc/dsm-agent/rabbitmq.ini");
        assert_int_equal(c->settings_mode, 0640);
        assert_null(c->on_change_argv);
        assert_int_equal(c->on_change_timeout, 30 * USEC_PER_SEC);
        assert_true(c->notify_enabled);
        assert_string_equal(c->notify_listen, "0.0.0.0:8631");
        sa = (struct sockaddr_in *) &c->notify_addr;
        assert_int_equal(sa->sin_family, AF_INET);
        assert_int_equal(ntohs(sa->sin_port), 8631);
        assert_int_equal(sa->sin_addr.s_addr, htonl(INADDR_ANY));
        assert_int_equal(c->n_allow, 2);
        assert_null(c->notify_token);
        assert_null(c->tls_cert);
        assert_true(c->update_enabled);
        assert_int_equal(c->stable_rounds, 2);
        assert_int_equal(c->max_delay, 300 * USEC_PER_SEC);
        assert_false(c->window_set);
        assert_null(c->window);
        assert_string_equal(c->agent_version_file, "/etc/dsm-agent/VERSION");
        assert_string_equal(c->download_dir, "/var/lib/dsm-agent-sync/updates");
        assert_string_equal(c->update_command_argv[0], "/usr/lib/dsm-agent-sync/apply-update");
        assert_null(c->update_command_argv[1]);
        assert_int_equal(c->command_timeout, 600 * USEC_PER_SEC);
        assert_string_equal(c->state_file, "/var/lib/dsm-agent-sync/state.json");
        assert_int_equal(c->log_level, LOG_INFO);
        assert_int_equal(c->log_target, LOG_TARGET_AUTO);
        assert_string_equal(c->control_socket, "/run/dsm-agent-sync/control.sock");
        config_free(c);
}

/* [daemon] control_socket: "off" is NULL, a path is kept as written, and
 * a path exactly at the sockaddr_un limit is still accepted. */
static void test_control_socket(void **state) {
        char path[sizeof(((struct sockaddr_un *) NULL)->sun_path) + 1], text[512];
        Config *c = NULL;

        (void) state;
        assert_int_equal(
                load("[provider]\nload_balancer = https://lb\n[daemon]\ncontrol_socket = off\n", &c), 0);
        assert_null(c->control_socket);
        config_free(c);

        memset(path, 'a', sizeof(path) - 1);
        path[0] = '/';
        path[sizeof(path) - 2] = 0; /* 107 bytes */
        snprintf(text, sizeof(text),
                 "[provider]\nload_balancer = https://lb\n[daemon]\ncontrol_socket = %s\n", path);
        assert_int_equal(load(text, &c), 0);
        assert_string_equal(c->control_socket, path);
        config_free(c);

        assert_int_equal(parse_socket_path(path), 0);
        path[sizeof(path) - 2] = 'a'; /* 108 bytes: no room for the NUL */
        path[sizeof(path) - 1] = 0;
        assert_int_equal(parse_socket_path(path), -ENAMETOOLONG);
        assert_int_equal(parse_socket_path(NULL), -EINVAL);
        assert_int_equal(parse_socket_path("/"), -EINVAL);
        assert_int_equal(parse_socket_path("/a\tb"), -EINVAL);
        assert_int_equal(parse_socket_path("/a/b"), 0);
}

/* ---- whole-file errors ---- */

typedef struct FileCase {
        const char *content;
        unsigned line;
        const char *word;
} FileCase;

static const FileCase bad_files[] = {
        {"", 0, "needs endpoints or load_balancer"},
        {"[provider]\nendpoints =\n", 0, "needs endpoints or load_balancer"},
        {"[provider]\nload_balancer = http://a\n[provdier]\n", 3, "unknown section [provdier]"},
        {"[provider]\nload_balancer = http://a\n\n[extra]\nx = 1\n", 4, "unknown section"},
        {"[provider]\nload_balancer = http://a\npoll_intervall = 5s\n", 3, "unknown key 'poll_intervall'"},
        {"[provider]\nload_balancer = http://a\n[broker]\nusername = a\n[broker]\nusername = b\n", 6,
         "duplicate key 'username' in [broker] (first at line 4)"},
        {"load_balancer = http://a\n", 1, "outside of a [section]"},
        {"[provider]\nload_balancer = http://a\njust some words\n", 3, "syntax error"},
        {"[provider\nload_balancer = http://a\n", 1, "without ']'"},
        {"[provider]\nload_balancer = http://a\x01\n", 2, "control character"},
        /* First error wins: the syntax error on line 2 comes before the bad key on line 3. */
        {"[provider]\noops\nload_balancer = nope\n", 2, "syntax error"},
        {"[provider]\nload_balancer = nope\noops\n", 2, "http"},
        {"[provider]\nload_balancer = http://a\npoll_interval = x\n[nope]\n", 3, "invalid duration"},
        {"[provider]\nload_balancer = http://a\n[notify]\ntls_key = /k\n", 4, "together"},
        {"[provider]\nload_balancer = http://a\npoll_interval = 100ms\n", 3, "exceed poll_interval"},
        /* A load balancer that is also an endpoint: its line, however written. */
        {"[provider]\nendpoints = https://p1:8443, https://p2\nload_balancer = https://p2\n", 3,
         "load_balancer 'https://p2' is also in endpoints"},
        {"[provider]\nload_balancer = HTTPS://P1.Example:443/\nendpoints = https://p1.example\n", 2,
         "also in endpoints ('https://p1.example')"},
        {"[provider]\nendpoints = http://p1/api/\n\nload_balancer = http://p1:80/api\n", 4,
         "also in endpoints"},
};

static void test_bad_files(void **state) {
        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(bad_files); i++) {
                int r = load(bad_files[i].content, NULL);
                assert_int_equal(r, -EINVAL);
                assert_error(r, bad_files[i].line, bad_files[i].word);
        }
}

static void test_unreadable_and_huge(void **state) {
        char *big;
        Config *c = (Config *) 1;
        int r;

        (void) state;
        r = config_load("/nonexistent/agent-sync.ini", &c, err, sizeof(err));
        assert_int_equal(r, -ENOENT);
        assert_ptr_equal(c, (Config *) 1); /* untouched on failure */
        assert_non_null(strstr(err, "/nonexistent/agent-sync.ini:0: cannot open"));

        big = malloc(70000 + 64);
        assert_non_null(big);
        strscpy(big, 64, "[provider]\nload_balancer = http://a\n# ");
        memset(big + strlen(big), 'x', 70000);
        big[70000 + 30] = 0;
        assert_error(load(big, NULL), 3, "line too long");
        free(big);

        /* A tiny err buffer truncates, never overflows. */
        {
                char small[8];
                tmp_file("agent-sync.ini", "[nope]\n");
                c = NULL;
                assert_int_equal(config_load(cfg_path, &c, small, sizeof(small)), -EINVAL);
                assert_int_equal(strlen(small), sizeof(small) - 1);
                assert_null(c);
        }
}

/* ---- secrets ---- */

static void test_secrets(void **state) {
        char buf[1024];
        const char *tok, *pw, *empty, *blank;
        Config *c = NULL;

        (void) state;
        tok = tmp_file("provider.token", "s3cr3t-token \t\r\nsecond line\n");
        assert_int_equal(load_key("provider", "token_file", tok, &c), 0);
        assert_string_equal(c->provider_token, "s3cr3t-token");
        assert_string_equal(c->provider_token_file, tok);
        config_free(c);

        pw = tmp_file("broker.password", "hunter2");
        assert_int_equal(load_key("broker", "password_file", pw, &c), 0);
        assert_string_equal(c->broker_password, "hunter2");
        config_free(c);

        empty = tmp_file("empty.token", "");
        assert_error(load_key("notify", "token_file", empty, NULL), 4, empty);
        assert_non_null(strstr(err, "empty"));
        blank = tmp_file("blank.token", "   \n\nsecret-on-line-3\n");
        assert_error(load_key("notify", "token_file", blank, NULL), 4, blank);
        assert_null(strstr(err, "secret-on-line-3"));

        /* A directory is not a secret file. */
        assert_error(load_key("notify", "token_file", tmpdir, NULL), 4, "cannot read secret file");

        /* An error after a secret was read frees it (ASan) and never shows it. */
        snprintf(buf, sizeof(buf),
                 "[provider]\nload_balancer = http://a\ntoken_file = %s\npoll_jitter = 7\n", tok);
        assert_error(load(buf, NULL), 4, "poll_jitter");
        assert_null(strstr(err, "s3cr3t"));

        /* A secret pasted under a wrong key does not reach the message. */
        assert_error(load_key("broker", "password", "hunter2", NULL), 4, "unknown key 'password'");
        assert_null(strstr(err, "hunter2"));

        /* A first line longer than the limit is refused, never cut short. */
        static char huge[5000];
        memset(huge, 'x', sizeof(huge) - 1);
        const char *longtok = tmp_file("long.token", huge);
        assert_error(load_key("notify", "token_file", longtok, NULL), 4, "longer than");
        assert_null(strstr(err, "xxxxxxxx"));

        /* A NUL inside the first line is refused too. */
        const char *nul = tmp_file("nul.token", "abc");
        FILE *f = fopen(nul, "w");
        assert_non_null(f);
        assert_int_equal(fwrite("ab\0cd\n", 1, 6, f), 6);
        fclose(f);
        assert_error(load_key("notify", "token_file", nul, NULL), 4, "cannot read secret file");

        /* A FIFO does not hang the load (O_NONBLOCK) and is not a secret file. */
        char fifo[512];
        snprintf(fifo, sizeof(fifo), "%s/secret.fifo", tmpdir);
        assert_int_equal(mkfifo(fifo, 0600), 0);
        assert_error(load_key("notify", "token_file", fifo, NULL), 4, "cannot read secret file");
        unlink(fifo);
}

/* ---- parsers ---- */

static void test_parse_duration(void **state) {
        static const struct {
                const char *s;
                usec_t v;
        } good[] = {
                {"0", 0},
                {"10", 10 * USEC_PER_SEC},
                {"30s", 30 * USEC_PER_SEC},
                {"500ms", 500 * USEC_PER_MSEC},
                {"5m", 300 * USEC_PER_SEC},
                {"1h", 3600 * USEC_PER_SEC},
                {"0ms", 0},
                {"8784h", 8784ULL * 3600 * USEC_PER_SEC},
        };
        static const struct {
                const char *s;
                int r;
        } bad[] = {
                {"", -EINVAL},
                {"-1", -EINVAL},
                {" 1", -EINVAL},
                {"1 s", -EINVAL},
                {"1.5s", -EINVAL},
                {"1d", -EINVAL},
                {"s", -EINVAL},
                {"abc", -EINVAL},
                {"1sx", -EINVAL},
                {"+1", -EINVAL},
                {"1S", -EINVAL},
                {"8785h", -ERANGE},
                {"18446744073709551615ms", -ERANGE},
                {"99999999999999999999999", -ERANGE},
        };
        usec_t v;

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(good); i++) {
                v = 1;
                assert_int_equal(parse_duration(good[i].s, &v), 0);
                assert_int_equal(v, good[i].v);
        }
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                v = 7;
                if (parse_duration(bad[i].s, &v) != bad[i].r)
                        fail_msg("parse_duration(\"%s\") != %d", bad[i].s, bad[i].r);
                assert_int_equal(v, 7);
        }
        assert_int_equal(parse_duration(NULL, &v), -EINVAL);
}

static void test_parse_cidr(void **state) {
        static const struct {
                const char *s;
                int family;
                unsigned prefixlen;
                const char *net;
        } good[] = {
                {"10.0.0.0/8", AF_INET, 8, "10.0.0.0"},         {"192.168.1.1", AF_INET, 32, "192.168.1.1"},
                {"10.1.2.3/8", AF_INET, 8, "10.0.0.0"},         {"0.0.0.0/0", AF_INET, 0, "0.0.0.0"},
                {"172.31.255.1/12", AF_INET, 12, "172.16.0.0"}, {"::1", AF_INET6, 128, "::1"},
                {"fe80::1/10", AF_INET6, 10, "fe80::"},         {"::/0", AF_INET6, 0, "::"},
                {"2001:db8::/32", AF_INET6, 32, "2001:db8::"},
        };
        static const char *const bad[] = {
                "",     "10.0.0.0/33", "::/129", "10.0.0.0/", "/8",        "10.0.0/8",     "10.0.0.0/8x",
                "host", "10.0.0.0/-1", "::1/+5", "1.2.3.4 ",  "::1/0128x", "10.0.0.0/8/8",
        };
        char text[INET6_ADDRSTRLEN];
        Cidr c;

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(good); i++) {
                assert_int_equal(parse_cidr(good[i].s, &c), 0);
                assert_int_equal(c.family, good[i].family);
                assert_int_equal(c.prefixlen, good[i].prefixlen);
                assert_non_null(inet_ntop(c.family, c.addr, text, sizeof(text)));
                assert_string_equal(text, good[i].net);
        }
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                if (parse_cidr(bad[i], &c) != -EINVAL)
                        fail_msg("parse_cidr(\"%s\") accepted", bad[i]);
}

static void test_parse_listen(void **state) {
        static const char *const bad[] = {
                "0.0.0.0",      ":8631",       "0.0.0.0:65536", "::1:8631",     "[::1]8631",
                "localhost:80", "1.2.3.4:-1",  "[::1]:",        "1.2.3.4:80 ",  "[::1:80",
                "[]:80",        "1.2.3.4:+80", "1.2.3.4:0x50",  "[1.2.3.4]:80", "",
        };
        struct sockaddr_storage ss;
        struct sockaddr_in *sa4 = (struct sockaddr_in *) &ss;
        struct sockaddr_in6 *sa6 = (struct sockaddr_in6 *) &ss;
        socklen_t len = 0;

        (void) state;
        assert_int_equal(parse_listen_address("0.0.0.0:8631", &ss, &len), 0);
        assert_int_equal(len, sizeof(struct sockaddr_in));
        assert_int_equal(sa4->sin_family, AF_INET);
        assert_int_equal(ntohs(sa4->sin_port), 8631);

        assert_int_equal(parse_listen_address("127.0.0.1:0", &ss, &len), 0);
        assert_int_equal(ntohs(sa4->sin_port), 0);
        assert_int_equal(sa4->sin_addr.s_addr, htonl(INADDR_LOOPBACK));

        assert_int_equal(parse_listen_address("[::1]:65535", &ss, &len), 0);
        assert_int_equal(len, sizeof(struct sockaddr_in6));
        assert_int_equal(sa6->sin6_family, AF_INET6);
        assert_int_equal(ntohs(sa6->sin6_port), 65535);
        assert_memory_equal(&sa6->sin6_addr, &in6addr_loopback, 16);

        assert_int_equal(parse_listen_address("[::]:8631", &ss, &len), 0);
        assert_memory_equal(&sa6->sin6_addr, &in6addr_any, 16);

        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                if (parse_listen_address(bad[i], &ss, &len) != -EINVAL)
                        fail_msg("parse_listen_address(\"%s\") accepted", bad[i]);
}

static bool peer_allowed(const Cidr *list, size_t n, const char *addr) {
        struct sockaddr_in sa4 = {.sin_family = AF_INET};
        struct sockaddr_in6 sa6 = {.sin6_family = AF_INET6};

        if (inet_pton(AF_INET, addr, &sa4.sin_addr) == 1)
                return cidr_list_contains(list, n, (struct sockaddr *) &sa4);
        assert_int_equal(inet_pton(AF_INET6, addr, &sa6.sin6_addr), 1);
        return cidr_list_contains(list, n, (struct sockaddr *) &sa6);
}

static void test_cidr_list_contains(void **state) {
        static const char *const rules[] = {"10.0.0.0/8", "::1", "192.168.1.0/24", "172.16.0.0/12",
                                            "fd00::/8"};
        static const struct {
                const char *peer;
                bool allowed;
        } cases[] = {
                {"10.2.3.4", true},
                {"11.0.0.1", false},
                {"::1", true},
                {"::2", false},
                {"::ffff:10.9.9.9", true},
                {"::ffff:11.0.0.1", false},
                {"192.168.1.255", true},
                {"192.168.2.1", false},
                {"172.31.255.255", true},
                {"172.32.0.0", false},
                {"172.15.255.255", false},
                {"fd12::1", true},
                {"fe00::1", false},
                {"::ffff:192.168.1.1", true},
                {"127.0.0.1", false},
                {"::ffff:127.0.0.1", false},
                {"::a00:1", false}, /* ::10.0.0.1, not v4-mapped */
        };
        Cidr list[ELEMENTSOF(rules)], any4;
        struct sockaddr_un un = {.sun_family = AF_UNIX};

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(rules); i++)
                assert_int_equal(parse_cidr(rules[i], &list[i]), 0);
        for (size_t i = 0; i < ELEMENTSOF(cases); i++)
                if (peer_allowed(list, ELEMENTSOF(list), cases[i].peer) != cases[i].allowed)
                        fail_msg("peer %s: want %s", cases[i].peer,
                                 cases[i].allowed ? "allowed" : "refused");

        assert_false(peer_allowed(list, 0, "10.0.0.1"));
        assert_false(cidr_list_contains(list, ELEMENTSOF(list), NULL));
        assert_false(cidr_list_contains(list, ELEMENTSOF(list), (struct sockaddr *) &un));
        assert_int_equal(parse_cidr("0.0.0.0/0", &any4), 0);
        assert_true(peer_allowed(&any4, 1, "::ffff:8.8.8.8"));
        assert_false(peer_allowed(&any4, 1, "2001:db8::1"));
}

/* Contract section 2: a URL with credentials is an error on its line, and
 * the message never shows the password, whichever check rejects it. */
static void test_url_credentials(void **state) {
        static const struct {
                const char *key, *value, *word;
        } cases[] = {
                {"endpoints", "http://agent:S3cretPw@host", "credentials"},
                {"endpoints", "https://a, HTTPS://agent:S3cretPw@B:8443/x", "credentials"},
                {"endpoints", "https://:S3cretPw@host", "credentials"},
                {"endpoints", "https://agent@host", "credentials"},
                {"load_balancer", "http://agent:S3cretPw@lb.example", "credentials"},
                {"load_balancer", "https://agent:S3cretPw@lb example", "whitespace"},
                {"load_balancer", "https://agent:S3cretPw@", "invalid host"},
                {"load_balancer", "agent:S3cretPw@lb.example", "http"},
                {"load_balancer", "https://agent:S3cretPw@lb.example:99999", "invalid host"},
        };

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                assert_error(load_key("provider", cases[i].key, cases[i].value, NULL), 4, cases[i].word);
                if (strstr(err, "S3cretPw"))
                        fail_msg("%s = %s: password in '%s'", cases[i].key, cases[i].value, err);
        }
}

/* Contract section 2: an entry matches peers of its own family only; an
 * IPv4-mapped peer (a dual-stack socket) is an IPv4 peer, and an entry
 * written in the mapped form is an IPv4 network. */
static void test_allow_families(void **state) {
        static const struct {
                const char *rules, *peer;
                bool allowed;
        } cases[] = {
                {"10.0.0.0/8, ::/0", "127.0.0.1", false},
                {"10.0.0.0/8, ::/0", "::ffff:127.0.0.1", false},
                {"10.0.0.0/8, ::/0", "10.1.2.3", true},
                {"10.0.0.0/8, ::/0", "::ffff:10.1.2.3", true},
                {"10.0.0.0/8, ::/0", "::1", true},
                {"10.0.0.0/8, ::/0", "2001:db8::1", true},
                {"::/0", "8.8.8.8", false},
                {"::/0", "::ffff:8.8.8.8", false},
                {"::/0", "::", true},
                {"::/96", "::a00:1", true}, /* IPv4-compatible: an IPv6 address */
                {"::/96", "10.0.0.1", false},
                {"::ffff:0:0/96", "::ffff:1.2.3.4", true},
                {"::ffff:0:0/96", "1.2.3.4", true},
                {"::ffff:0:0/96", "::1", false},
                {"::ffff:10.0.0.0/104", "10.9.9.9", true},
                {"::ffff:10.0.0.0/104", "11.0.0.1", false},
                {"::ffff:10.0.0.0/104", "::ffff:10.9.9.9", true},
                {"::ffff:10.0.0.1", "10.0.0.1", true},
                {"::ffff:10.0.0.1", "10.0.0.2", false},
                {"0.0.0.0/0", "::1", false},
                {"0.0.0.0/0", "fd00::1", false},
                {"0.0.0.0/0", "::ffff:192.0.2.1", true},
                {"127.0.0.0/8, ::1", "::ffff:127.0.0.1", true},
                {"127.0.0.0/8, ::1", "127.0.0.1", true},
                {"::1", "127.0.0.1", false},
        };
        char buf[256];

        (void) state;
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                Config *c = NULL;

                /* Through config_load, as the listener gets them. */
                snprintf(buf, sizeof(buf), "[provider]\nload_balancer = http://a\n[notify]\nallow = %s\n",
                         cases[i].rules);
                assert_int_equal(load(buf, &c), 0);
                if (peer_allowed(c->allow, c->n_allow, cases[i].peer) != cases[i].allowed)
                        fail_msg("allow = %s, peer %s: want %s", cases[i].rules, cases[i].peer,
                                 cases[i].allowed ? "allowed" : "refused");
                config_free(c);
        }
}

static void test_parse_cidr_mapped(void **state) {
        Cidr c, want;

        (void) state;
        assert_int_equal(parse_cidr("::ffff:10.1.0.0/112", &c), 0);
        assert_int_equal(parse_cidr("10.1.0.0/16", &want), 0);
        assert_memory_equal(&c, &want, sizeof(c));
        assert_int_equal(parse_cidr("::ffff:0:0/95", &c), 0); /* not all mapped: IPv6 */
        assert_int_equal(c.family, AF_INET6);
        assert_int_equal(c.prefixlen, 95);
}

/* ---- the contract's example, verbatim except for the secret paths ---- */

static const char contract_example[] =
        "[provider]\n"
        "# Seed list of Provider node API base URLs. At least one of endpoints or\n"
        "# load_balancer is required.\n"
        "endpoints = https://p1.example:8443, https://p2.example:8443, https://p3.example:8443\n"
        "load_balancer = https://dsm.example:8443      ; used only to discover nodes\n"
        "token_file = /etc/dsm-agent-sync/provider.token\n"
        "ca_file = /etc/dsm-agent-sync/provider-ca.pem  ; default: the system CA store\n"
        "poll_interval = 30s        ; steady-state anti-entropy poll\n"
        "poll_jitter = 0.2          ; +/- fraction applied to every poll delay\n"
        "fast_poll_interval = 500ms ; first retry while the Primary is unknown or lost;\n"
        "                           ; doubles up to poll_interval\n"
        "request_timeout = 5s\n"
        "\n"
        "[broker]\n"
        "username = agent-42\n"
        "password_file = /etc/dsm-agent-sync/broker.password\n"
        "exchange = dsm.provider.events\n"
        "heartbeat = 10s\n"
        "ca_file =                  ; when the Primary's broker says tls = true\n"
        "settings_file = /etc/dsm-agent/rabbitmq.ini\n"
        "settings_mode = 0640\n"
        "on_change = /usr/bin/systemctl try-restart dsm-agent.service\n"
        "on_change_timeout = 30s\n"
        "\n"
        "[notify]\n"
        "listen = 0.0.0.0:8631      ; \"off\" disables the listener\n"
        "allow = 10.0.0.0/8, 192.168.0.0/16   ; peers (CIDR, IPv4/IPv6) that may connect;\n"
        "                           ; default 127.0.0.0/8, ::1; others are refused at accept\n"
        "token_file = /etc/dsm-agent-sync/notify.token\n"
        "tls_cert =                 ; both set: serve HTTPS\n"
        "tls_key =\n"
        "\n"
        "[update]\n"
        "enabled = true\n"
        "stable_rounds = 2          ; all nodes must agree in this many consecutive rounds\n"
        "max_delay = 5m             ; random delay before applying, so a fleet spreads out;\n"
        "                           ; drawn once per offered version and kept in the state file\n"
        "window =                   ; HH:MM-HH:MM in UTC, start inclusive, end exclusive,\n"
        "                           ; may wrap past midnight (22:00-02:00); empty: any time\n"
        "agent_version_file = /etc/dsm-agent/VERSION\n"
        "download_dir = /var/lib/dsm-agent-sync/updates\n"
        "command = /usr/lib/dsm-agent-sync/apply-update\n"
        "command_timeout = 10m\n"
        "\n"
        "[daemon]\n"
        "state_file = /var/lib/dsm-agent-sync/state.json\n"
        "log_level = info           ; debug, info, notice, warning, err\n"
        "log_target = auto          ; auto (journal when available), journal, stderr\n";

/* Replaces every "/etc/dsm-agent-sync/NAME" secret path with tmpdir/NAME. */
static void rewrite_secret_paths(const char *in, char *out, size_t size) {
        static const char *const names[] = {"provider.token", "broker.password", "notify.token"};
        size_t o = 0;

        while (*in) {
                bool done = false;
                for (size_t i = 0; i < ELEMENTSOF(names) && !done; i++) {
                        char from[128];
                        snprintf(from, sizeof(from), "/etc/dsm-agent-sync/%s", names[i]);
                        if (strncmp(in, from, strlen(from)) == 0) {
                                o += (size_t) snprintf(out + o, size - o, "%s/%s", tmpdir, names[i]);
                                in += strlen(from);
                                done = true;
                        }
                }
                if (!done)
                        out[o++] = *in++;
                assert_true(o < size);
        }
        out[o] = 0;
}

static void test_contract_example(void **state) {
        char text[sizeof(contract_example) + 512];
        Config *c = NULL;
        Cidr probe;

        (void) state;
        rewrite_secret_paths(contract_example, text, sizeof(text));
        for (size_t i = 0; i < 3; i++) {
                char p[256];
                snprintf(p, sizeof(p), "%s/%s", tmpdir,
                         (const char *[]){"provider.token", "broker.password", "notify.token"}[i]);
                (void) unlink(p);
        }

        /* Without its secret files the example is refused, naming the first one. */
        assert_error(load(text, NULL), 6, "provider.token");

        tmp_file("provider.token", "provider-secret\n");
        tmp_file("broker.password", "broker-secret\n");
        tmp_file("notify.token", "notify-secret\n");
        assert_int_equal(load(text, &c), 0);

        assert_int_equal(c->n_endpoints, 3);
        assert_string_equal(c->endpoints[0], "https://p1.example:8443");
        assert_string_equal(c->endpoints[2], "https://p3.example:8443");
        assert_string_equal(c->load_balancer, "https://dsm.example:8443");
        assert_string_equal(c->provider_token, "provider-secret");
        assert_string_equal(c->provider_ca_file, "/etc/dsm-agent-sync/provider-ca.pem");
        assert_int_equal(c->poll_interval, 30 * USEC_PER_SEC);
        assert_true(c->poll_jitter == 0.2);
        assert_int_equal(c->fast_poll_interval, 500 * USEC_PER_MSEC);
        assert_int_equal(c->request_timeout, 5 * USEC_PER_SEC);

        assert_string_equal(c->broker_username, "agent-42");
        assert_string_equal(c->broker_password, "broker-secret");
        assert_string_equal(c->exchange, "dsm.provider.events");
        assert_int_equal(c->heartbeat, 10 * USEC_PER_SEC);
        assert_null(c->broker_ca_file);
        assert_string_equal(c->settings_file, "/etc/dsm-agent/rabbitmq.ini");
        assert_int_equal(c->settings_mode, 0640);
        assert_string_equal(c->on_change_argv[0], "/usr/bin/systemctl");
        assert_string_equal(c->on_change_argv[1], "try-restart");
        assert_string_equal(c->on_change_argv[2], "dsm-agent.service");
        assert_null(c->on_change_argv[3]);
        assert_int_equal(c->on_change_timeout, 30 * USEC_PER_SEC);

        assert_true(c->notify_enabled);
        assert_string_equal(c->notify_listen, "0.0.0.0:8631");
        assert_int_equal(c->n_allow, 2);
        assert_int_equal(parse_cidr("192.168.0.0/16", &probe), 0);
        assert_memory_equal(&c->allow[1], &probe, sizeof(probe));
        assert_string_equal(c->notify_token, "notify-secret");
        assert_null(c->tls_cert);
        assert_null(c->tls_key);

        assert_true(c->update_enabled);
        assert_int_equal(c->stable_rounds, 2);
        assert_int_equal(c->max_delay, 300 * USEC_PER_SEC);
        assert_false(c->window_set);
        assert_string_equal(c->agent_version_file, "/etc/dsm-agent/VERSION");
        assert_string_equal(c->download_dir, "/var/lib/dsm-agent-sync/updates");
        assert_string_equal(c->update_command_argv[0], "/usr/lib/dsm-agent-sync/apply-update");
        assert_int_equal(c->command_timeout, 600 * USEC_PER_SEC);

        assert_string_equal(c->state_file, "/var/lib/dsm-agent-sync/state.json");
        assert_int_equal(c->log_level, LOG_INFO);
        assert_int_equal(c->log_target, LOG_TARGET_AUTO);
        config_free(c);
}

/* The file we ship must load as-is, on a machine without secret files. */
static void test_shipped_config(void **state) {
        Config *c = NULL;
        int r;

        (void) state;
        r = config_load("conf/agent-sync.ini", &c, err, sizeof(err));
        if (r < 0)
                fail_msg("conf/agent-sync.ini (cwd must be the repository root): %s", err);
        assert_string_equal(c->load_balancer, "https://dsm.example:8443");
        assert_int_equal(c->n_endpoints, 0);
        assert_null(c->provider_token);
        assert_null(c->notify_token);
        assert_string_equal(c->broker_password, "guest");
        assert_string_equal(c->notify_listen, "0.0.0.0:8631");
        assert_int_equal(c->n_allow, 2);
        assert_null(c->on_change_argv); /* the packaged service restarts the agent by a path unit */
        assert_int_equal(c->settings_mode, 0640);
        assert_int_equal(c->log_level, LOG_INFO);
        assert_string_equal(c->control_socket, CONFIG_DEFAULT_CONTROL_SOCKET);
        config_free(c);
}

static void test_free_null(void **state) {
        (void) state;
        assert_null(config_free(NULL));
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_good_keys),
                cmocka_unit_test(test_bad_keys),
                cmocka_unit_test(test_list_limits),
                cmocka_unit_test(test_long_lines),
                cmocka_unit_test(test_values),
                cmocka_unit_test(test_defaults),
                cmocka_unit_test(test_control_socket),
                cmocka_unit_test(test_bad_files),
                cmocka_unit_test(test_unreadable_and_huge),
                cmocka_unit_test(test_secrets),
                cmocka_unit_test(test_parse_duration),
                cmocka_unit_test(test_parse_cidr),
                cmocka_unit_test(test_parse_listen),
                cmocka_unit_test(test_cidr_list_contains),
                cmocka_unit_test(test_url_credentials),
                cmocka_unit_test(test_allow_families),
                cmocka_unit_test(test_parse_cidr_mapped),
                cmocka_unit_test(test_contract_example),
                cmocka_unit_test(test_shipped_config),
                cmocka_unit_test(test_free_null),
        };
        return cmocka_run_group_tests(tests, setup, teardown);
}
