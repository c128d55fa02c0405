/* libFuzzer target for the INI configuration parser (config_load): any
 * byte string must be either accepted, giving a Config inside the limits of
 * contract section 2 that frees cleanly, or rejected with a negative errno
 * and an error "PATH:LINE: message". Secrets never appear in the error.
 *
 * The input is the file, written to a memfd and loaded through its
 * /proc/self/fd/N path. Every "@D@" in the input is replaced by a private
 * temporary directory (made once) holding secret files, so the corpus can
 * name them: @D@/token, @D@/password (two lines, padded), @D@/empty,
 * @D@/blank (whitespace only), @D@/long (over the 4096-byte limit, no
 * newline), @D@/dir (a directory), @D@/missing (absent). Inputs naming
 * anything under /dev/ are skipped. */
#include <errno.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "util.h"

#define PLACEHOLDER     "@D@"
#define MAX_INPUT       (256 * 1024)
#define DURATION_LIMIT  (366ULL * 24 * 3600 * 1000000ULL)
#define SECRET_TOKEN    "S3cr3t-t0ken-7f3a9c"
#define SECRET_PASSWORD "pa55 w0rd-c81e"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64];
static int memfd = -1;
static char memfd_path[64];

static void write_file(const char *name, const char *content, size_t len) {
        char path[128];
        FILE *f;

        snprintf(path, sizeof(path), "%s/%s", dir, name);
        f = fopen(path, "we");
        if (!f || fwrite(content, 1, len, f) != len || fclose(f) != 0)
                abort();
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
        return remove(path);
}

static void cleanup(void) {
        if (dir[0])
                (void) nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        static char long_secret[5000];
        const char *tmp = getenv("TMPDIR");
        char path[128];

        snprintf(dir, sizeof(dir), "%s/fuzz-config.XXXXXX", tmp && strlen(tmp) < 32 ? tmp : "/tmp");
        if (!mkdtemp(dir))
                abort();
        atexit(cleanup);
        write_file("token", SECRET_TOKEN "\n", strlen(SECRET_TOKEN) + 1);
        write_file("password", "  " SECRET_PASSWORD " \t\nsecond line\n", strlen(SECRET_PASSWORD) + 17);
        write_file("empty", "", 0);
        write_file("blank", " \t \n\nnot-the-first-line\n", 24);
        memset(long_secret, 'x', sizeof(long_secret));
        write_file("long", long_secret, sizeof(long_secret));
        snprintf(path, sizeof(path), "%s/dir", dir);
        if (mkdir(path, 0700) < 0)
                abort();

        memfd = memfd_create("fuzz-config", MFD_CLOEXEC);
        if (memfd < 0)
                abort();
        snprintf(memfd_path, sizeof(memfd_path), "/proc/self/fd/%d", memfd);
        return 0;
}

/* The input with every placeholder replaced by the directory. */
static char *expand(const uint8_t *data, size_t size, size_t *ret_len) {
        size_t dl = strlen(dir), pl = strlen(PLACEHOLDER), n = 0;
        char *out = malloc(size / pl * dl + size + 1);

        if (!out)
                abort();
        for (size_t i = 0; i < size;) {
                if (size - i >= pl && memcmp(data + i, PLACEHOLDER, pl) == 0) {
                        memcpy(out + n, dir, dl);
                        n += dl;
                        i += pl;
                } else
                        out[n++] = (char) data[i++];
        }
        *ret_len = n;
        return out;
}

static bool argv_ok(char **argv) {
        size_t n = 0;

        if (!argv)
                return true;
        if (!argv[0] || argv[0][0] != '/')
                return false;
        for (; argv[n]; n++)
                if (argv[n][0] == 0 || strpbrk(argv[n], " \t\n"))
                        return false;
        return n <= CONFIG_MAX_ARGV;
}

/* An accepted Provider URL: valid for libcurl, with no credentials in it. */
static bool url_ok(const char *url) {
        UrlInfo u;

        return url && strlen(url) <= 2048 && url_inspect(url, &u) == 0 && !u.has_userinfo;
}

static void check_config(const Config *c) {
        if (strcmp(c->path, memfd_path) != 0)
                abort();
        if (c->n_endpoints == 0 && !c->load_balancer)
                abort();
        if (c->n_endpoints > CONFIG_MAX_ENDPOINTS)
                abort();
        for (size_t i = 0; i < c->n_endpoints; i++) {
                if (!url_ok(c->endpoints[i]) || strncasecmp(c->endpoints[i], "http", 4) != 0)
                        abort();
                /* The load balancer is never also an endpoint (written
                 * differently too: test_config covers the normalisation). */
                if (c->load_balancer && strcmp(c->load_balancer, c->endpoints[i]) == 0)
                        abort();
        }
        if (c->load_balancer && !url_ok(c->load_balancer))
                abort();
        if (c->poll_interval == 0 || c->fast_poll_interval == 0 || c->request_timeout == 0 ||
            c->on_change_timeout == 0 || c->command_timeout == 0)
                abort();
        if (c->fast_poll_interval > c->poll_interval)
                abort();
        if (c->poll_interval > DURATION_LIMIT || c->request_timeout > DURATION_LIMIT ||
            c->max_delay > DURATION_LIMIT || c->command_timeout > DURATION_LIMIT ||
            c->on_change_timeout > DURATION_LIMIT || c->heartbeat > 65535ULL * 1000000ULL)
                abort();
        if (!(c->poll_jitter >= 0 && c->poll_jitter < 1))
                abort();
        if (!c->broker_username || !c->broker_username[0] || !c->exchange || !c->exchange[0] ||
            !c->broker_password || !c->broker_password[0])
                abort();
        if (!c->settings_file || !c->settings_file[0] || c->settings_mode > 07777)
                abort();
        if (!argv_ok(c->on_change_argv) || !argv_ok(c->update_command_argv))
                abort();
        if (c->update_enabled && !c->update_command_argv)
                abort();
        if (!c->notify_listen || (c->notify_enabled && c->notify_addrlen == 0))
                abort();
        if (c->n_allow < 1 || c->n_allow > CONFIG_MAX_ALLOW)
                abort();
        for (size_t i = 0; i < c->n_allow; i++)
                if ((c->allow[i].family != AF_INET || c->allow[i].prefixlen > 32) &&
                    (c->allow[i].family != AF_INET6 || c->allow[i].prefixlen > 128))
                        abort();
        if (!c->tls_cert != !c->tls_key)
                abort();
        if (c->stable_rounds < 1 || c->stable_rounds > 1000)
                abort();
        if (c->window_set && (!c->window || c->window_start_min >= 1440 || c->window_end_min >= 1440 ||
                              c->window_start_min == c->window_end_min))
                abort();
        if (!c->agent_version_file || !c->download_dir || !c->state_file)
                abort();
        /* A secret file given means its first line, trimmed, was read. */
        if (!c->provider_token_file != !c->provider_token || !c->notify_token_file != !c->notify_token)
                abort();
        if (c->provider_token && strlen(c->provider_token) > 4096)
                abort();
        if (!c->broker_password_file && strcmp(c->broker_password, "guest") != 0)
                abort();
}

/* "PATH:LINE: message" with a non-empty message. */
static void check_error(const char *err) {
        size_t pl = strlen(memfd_path);
        const char *s;

        if (strncmp(err, memfd_path, pl) != 0 || err[pl] != ':')
                abort();
        s = err + pl + 1;
        if (*s < '0' || *s > '9')
                abort();
        while (*s >= '0' && *s <= '9')
                s++;
        if (s[0] != ':' || s[1] != ' ' || s[2] == 0)
                abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char err[CONFIG_ERROR_MAX + 128];
        Config *c = NULL;
        size_t len;
        char *text;
        int r;

        if (size > MAX_INPUT)
                return 0;
        text = expand(data, size, &len);
        /* Secret files are opened for real: keep away from device nodes
         * (a FIFO or a watchdog must not be opened by a fuzzer). */
        if (memmem(text, len, "/dev/", 5)) {
                free(text);
                return 0;
        }
        if (ftruncate(memfd, 0) < 0 || pwrite(memfd, text, len, 0) != (ssize_t) len)
                abort();

        memset(err, 'Z', sizeof(err));
        r = config_load(memfd_path, &c, err, sizeof(err));
        if (!memchr(err, 0, sizeof(err)))
                abort();
        if (r == 0) {
                if (!c)
                        abort();
                check_config(c);
                config_free(c);
        } else {
                if (r >= 0 || c)
                        abort();
                check_error(err);
                /* Unless the input itself spells it out, a secret is never shown. */
                text[len] = 0;
                if ((strstr(err, SECRET_TOKEN) && !memmem(text, len, SECRET_TOKEN, strlen(SECRET_TOKEN))) ||
                    (strstr(err, SECRET_PASSWORD) &&
                     !memmem(text, len, SECRET_PASSWORD, strlen(SECRET_PASSWORD))))
                        abort();
        }
        free(text);
        return 0;
}
