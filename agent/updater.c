/* The updater: one offered Agent package at a time goes
 *   IDLE -> DOWNLOADING -> READY -> APPLYING -> IDLE (applied)
 *                 \----------------------\----> FAILED (backing off)
 *
 * A verified package is not applied by the updater itself: it waits in
 * READY, and the manager, told through ready(), checks the gate at that
 * moment (contract 8: every condition holds when the command starts) and
 * calls updater_apply() with the offer it would apply. A package whose gate
 * has closed meanwhile stays READY until the gate opens again.
 *
 * The download runs on the updater's own libcurl multi handle on the
 * sd-event loop (agent/curl-glue.c), so a slow Provider never blocks the
 * loop. Bytes go to a ".dl-<version>.XXXXXX" file in download_dir while
 * their sha256 is computed; only a file of exactly the offered size and
 * hash is renamed to "dsm-agent-<version>.pkg" and handed to the update
 * command. Anything else is unlinked, so a partial or forged package never
 * reaches the command.
 *
 * The provider token goes only to the Provider's own origin (scheme, host
 * and port of the trusted api_url the caller names); a plain http:// offer
 * is refused unless that api_url is http:// too. A verified package whose
 * command failed is kept and, after its size and sha256 are checked again
 * (hashed in slices from an idle event source, so a large file never blocks
 * the loop), reused by the retry; packages of other versions are removed
 * when an attempt starts, so download_dir holds at most one package and
 * one temporary file. */
#include <curl/curl.h>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "atomic_file.h"
#include "curl-glue.h"
#include "file-hash.h"
#include "log.h"
#include "macro.h"
#include "runner.h"
#include "updater.h"
#include "util.h"

#define TEMP_PREFIX        ".dl-"
#define PKG_PREFIX         "dsm-agent-"
#define PKG_SUFFIX         ".pkg"
#define BACKOFF_FIRST_USEC (60 * USEC_PER_SEC)
#define BACKOFF_MAX_USEC   (3600 * USEC_PER_SEC)
#define VERSION_FILE_MAX   4096

typedef struct Download {
        Updater *u;
        CURL *easy;
        CURLU *url; /* the offer's URL as parsed for the origin check */
        struct curl_slist *headers;
        EVP_MD_CTX *md;
        int fd;
        uint64_t limit; /* the offered size: one byte more aborts */
        uint64_t received;
        bool oversized;
        int write_error; /* negative errno of a failed write */
        char tmp_path[PATH_MAX];
        char errbuf[CURL_ERROR_SIZE];
} Download;

struct Updater {
        sd_event *event;
        const Config *cfg;
        UpdateRecord *record; /* the updater's part of the persistent state */
        UpdaterCallbacks cb;
        void *userdata;

        UpdaterPhase phase;
        uint64_t applies_ok, applies_failed; /* commands that ran or could not; GET /metrics */
        char last_error[GATE_REASON_MAX];
        AgentUpdate offer;  /* the one in flight, or verified (READY) */
        char dir[PATH_MAX]; /* download_dir at start: a reload may change it */
        char pkg_path[PATH_MAX];

        uint64_t low_speed_bytes;
        usec_t low_speed_time, total_timeout;

        CurlGlue *glue; /* one download at a time; each closes its connection (FORBID_REUSE) */
        Download *dl;
        FileHash *verify; /* re-hashing a package kept from an earlier attempt */
        CURLU *offer_url; /* parsed at start; handed to the Download */
        bool send_token;  /* the offer URL is the trusted api_url's origin */
        Runner *runner;
        char **argv; /* the command in flight, owned copies */
};

static CURLU *curl_url_cleanup_p(CURLU *h) {
        curl_url_cleanup(h);
        return NULL;
}

/* ---- validation ---- */

/* The version becomes part of a file name: keep it to a safe alphabet so
 * it can never name another directory or a hidden file. */
static bool version_safe_for_path(const char *v) {
        size_t n = strlen(v);

        if (n == 0 || n > PROVIDER_VERSION_MAX || v[0] == '.' || v[0] == '-')
                return false;
        return strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+~-") == n;
}

static bool sha256_hex_valid(const char *s) {
        return strlen(s) == SHA256_HEX_LEN && strspn(s, "0123456789abcdef") == SHA256_HEX_LEN;
}

static int offer_check(const AgentUpdate *o) {
        if (!o->present || !version_safe_for_path(o->version) || !sha256_hex_valid(o->sha256) ||
            o->size == 0 || !provider_url_valid(o->url))
                return -EINVAL;
        return 0;
}

/* ---- the Provider's origin ---- */

/* Parses url with libcurl's own URL parser, the one that also makes the
 * request (the offer's handle goes to CURLOPT_CURLU); url_inspect() uses
 * the same parser, so the origin check and the connection agree on the
 * host. */
static CURLU *url_parse(const char *url) {
        CURLU *h;

        if (!url || !*url)
                return NULL;
        h = curl_url();
        if (h && curl_url_set(h, CURLUPART_URL, url, 0) != CURLUE_OK) {
                curl_url_cleanup(h);
                h = NULL;
        }
        return h;
}

/* An IPv6 zone id ("fe80::1%eth0") names an interface of this machine, not
 * an origin; UrlInfo does not carry it, so it is looked up here. */
static bool url_has_zone(const char *url) {
        CURLU *h = url_parse(url);
        char *zone = NULL;
        bool present = h && curl_url_get(h, CURLUPART_ZONEID, &zone, 0) == CURLUE_OK;

        curl_free(zone);
        curl_url_cleanup(h);
        return present;
}

/* Parses the offer URL into u->offer_url and decides whether the token may
 * go with it: only to the trusted api_url's scheme, host and port (80/443
 * when not given), and never along with credentials of the URL's own. A
 * plain http:// offer is refused unless the trusted api_url is http:// itself
 * (then the token travels in clear anyway). Returns 0, or -1 with the
 * reason. */
static int offer_origin(Updater *u, const char *trusted_api_url, char *reason, size_t size) {
        UrlInfo offer, trusted;
        bool trusted_ok;

        u->send_token = false;
        u->offer_url = url_parse(u->offer.url);
        if (!u->offer_url || url_inspect(u->offer.url, &offer) < 0) {
                snprintf(reason, size, "download_failed: invalid url");
                return -1;
        }
        trusted_ok = url_inspect(trusted_api_url, &trusted) == 0;

        if (!offer.https && (!trusted_ok || trusted.https)) {
                snprintf(reason, size, "download_failed: insecure url");
                return -1;
        }
        u->send_token = trusted_ok && !offer.has_userinfo && !url_has_zone(u->offer.url) &&
                        !url_has_zone(trusted_api_url) && url_same_origin(u->offer.url, trusted_api_url);
        return 0;
}

/* ---- the end of an attempt ---- */

static void updater_changed(Updater *u) {
        if (u->cb.changed)
                u->cb.changed(u, u->userdata);
}

static void updater_fail(Updater *u, const char *fmt, ...) _printf_(2, 3);
static void updater_fail(Updater *u, const char *fmt, ...) {
        UpdateRecord *s = u->record;
        usec_t backoff;
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(u->last_error, sizeof(u->last_error), fmt, ap);
        va_end(ap);

        /* 1 min, doubling per failure of the same version, at most 1 h. */
        if (streq_ptr(s->failed_version, u->offer.version) && s->failures < UINT_MAX)
                s->failures++;
        else
                s->failures = 1;
        (void) strscpy(s->failed_version, sizeof(s->failed_version), u->offer.version);
        backoff = backoff_usec(BACKOFF_FIRST_USEC, BACKOFF_MAX_USEC, s->failures);
        s->retry_not_before_usec = now_usec(CLOCK_REALTIME) + backoff;

        if (u->phase == UPDATER_APPLYING)
                u->applies_failed++;
        u->phase = UPDATER_FAILED;
        log_struct(LOG_WARNING, 0, MID_UPDATE_FAILED,
                   &(LogFields){.version = u->offer.version, .reason = u->last_error},
                   "Agent update %s failed: %s; retry in %llus (failure %u)", u->offer.version,
                   u->last_error, (unsigned long long) (backoff / USEC_PER_SEC), s->failures);
        updater_changed(u);
}

/* The backoff is kept in CLOCK_REALTIME (it must survive a restart), so a
 * clock stepped back, or a state file written with a wrong clock, could put
 * the next attempt arbitrarily far away. No backoff is longer than 1 h:
 * anything later than that from now is pulled in to now + 1 h. Returns
 * whether the state changed. */
static bool backoff_clamp(UpdateRecord *s, uint64_t now) {
        if (s->retry_not_before_usec <= now || s->retry_not_before_usec - now <= BACKOFF_MAX_USEC)
                return false;
        s->retry_not_before_usec = now + BACKOFF_MAX_USEC;
        return true;
}

/* Packages of other versions are of no further use: one applied earlier, or
 * one whose version is no longer offered. Removing them whenever an attempt
 * starts or succeeds keeps download_dir to at most one package. */
static void remove_old_packages(const char *dir, const char *keep) {
        _cleanup_(closep) int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *d;
        struct dirent *de;

        if (dfd < 0)
                return;
        d = fdopendir(dfd);
        if (!d)
                return;
        dfd = -1; /* owned by d now */
        while ((de = readdir(d))) {
                size_t n = strlen(de->d_name);

                if (strncmp(de->d_name, PKG_PREFIX, strlen(PKG_PREFIX)) != 0 || n < strlen(PKG_SUFFIX) ||
                    strcmp(de->d_name + n - strlen(PKG_SUFFIX), PKG_SUFFIX) != 0 ||
                    strcmp(de->d_name, keep) == 0)
                        continue;
                if (unlinkat(dirfd(d), de->d_name, 0) < 0)
                        log_debug_errno(negative_errno(), "Cannot remove old package %s", de->d_name);
        }
        closedir(d);
}

static void updater_applied(Updater *u) {
        UpdateRecord *s = u->record;
        const char *base = strrchr(u->pkg_path, '/');

        (void) strscpy(s->applied_version, sizeof(s->applied_version), u->offer.version);
        s->failed_version[0] = 0;
        s->failures = 0;
        s->retry_not_before_usec = 0;
        u->last_error[0] = 0;
        u->phase = UPDATER_IDLE;
        u->applies_ok++;

        remove_old_packages(u->dir, base ? base + 1 : u->pkg_path);
        log_struct(LOG_NOTICE, 0, MID_UPDATE_APPLIED, &(LogFields){.version = u->offer.version},
                   "Agent update %s applied", u->offer.version);
        updater_changed(u);
}

/* ---- applying ---- */

static void on_command_done(Runner *r, int status, void *userdata) {
        Updater *u = userdata;

        u->argv = strv_free(u->argv);

        if (status == 0)
                updater_applied(u);
        else if (status > 0)
                updater_fail(u, "command_failed: exit %d", status);
        else if (status == -ETIMEDOUT)
                updater_fail(u, "command_failed: timeout");
        else if (status >= -64) /* -SIGNUM; signal numbers stay below 65 */
                updater_fail(u, "command_failed: signal %d", -status);
        else
                updater_fail(u, "command_failed: %s", strerror(-status));
}

/* command + FILE + VERSION, copied so a reload may free the Config. */
static int command_argv(Updater *u, char ***ret) {
        char *const *cmd = u->cfg->update_command_argv;
        _cleanup_(freep) char **v = NULL;
        size_t n = 0;

        if (!cmd || !cmd[0])
                return -ENOEXEC;
        while (cmd[n])
                n++;
        v = calloc(n + 3, sizeof(char *));
        if (!v)
                return -ENOMEM;
        memcpy(v, cmd, n * sizeof(char *));
        v[n] = u->pkg_path;
        v[n + 1] = u->offer.version;
        *ret = strv_copy(v);
        return *ret ? 0 : -ENOMEM;
}

static void updater_run_command(Updater *u) {
        char sha_env[sizeof("DSM_UPDATE_SHA256=") + SHA256_HEX_LEN];
        char *env[] = {sha_env, NULL};
        int r;

        /* The command (or the privileged unit behind it) checks the hash
         * again; hand it the expected one. */
        snprintf(sha_env, sizeof(sha_env), "DSM_UPDATE_SHA256=%s", u->offer.sha256);

        u->phase = UPDATER_APPLYING; /* a command that cannot start counts as failed */
        r = command_argv(u, &u->argv);
        if (r < 0) {
                updater_fail(u, "command_failed: %s", strerror(-r));
                return;
        }
        log_info("Applying Agent update %s: %s %s %s", u->offer.version, u->argv[0], u->pkg_path,
                 u->offer.version);
        r = runner_start(u->runner, u->argv, env, u->cfg->command_timeout, on_command_done, u);
        if (r < 0) {
                u->argv = strv_free(u->argv);
                updater_fail(u, "command_failed: %s", strerror(-r));
        }
}

/* The package of u->offer is verified and in place: it waits for the
 * caller's go (updater_apply), which may come at once or much later. */
static void updater_ready(Updater *u) {
        u->phase = UPDATER_READY;
        log_debug("Agent update %s verified, waiting for the gate", u->offer.version);
        if (u->cb.ready)
                u->cb.ready(u, &u->offer, u->userdata);
}

/* ---- downloading ---- */

static Download *download_free(Download *d) {
        if (!d)
                return NULL;
        if (d->easy) {
                curl_glue_remove(d->u->glue, d->easy);
                curl_easy_cleanup(d->easy);
        }
        curl_url_cleanup(d->url);
        curl_slist_free_all(d->headers); /* holds the token: freed, not logged */
        EVP_MD_CTX_free(d->md);
        if (d->fd >= 0)
                close(d->fd);
        if (d->tmp_path[0] && unlink(d->tmp_path) < 0 && errno != ENOENT)
                log_warning_errno(negative_errno(), "Cannot remove partial download %s", d->tmp_path);
        free(d);
        return NULL;
}

static size_t on_curl_write(char *ptr, size_t size, size_t nmemb, void *userdata) {
        Download *d = userdata;
        size_t n = size * nmemb, done = 0;

        /* Returning less than n makes curl abort the transfer. */
        if (n > d->limit - d->received) {
                d->oversized = true;
                return 0;
        }
        while (done < n) {
                ssize_t k = write(d->fd, ptr + done, n - done);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        d->write_error = negative_errno();
                        return 0;
                }
                done += (size_t) k;
        }
        if (EVP_DigestUpdate(d->md, ptr, n) != 1) {
                d->write_error = -EIO;
                return 0;
        }
        d->received += n;
        return n;
}

static int reasonf(char *buf, size_t size, const char *fmt, ...) _printf_(3, 4);
static int reasonf(char *buf, size_t size, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(buf, size, fmt, ap);
        va_end(ap);
        return -1;
}

/* Decides what the finished transfer is worth. On success the verified
 * file is in place at u->pkg_path and 0 is returned; otherwise reason says
 * why and -1 is returned (the temporary file goes with download_free). */
static int download_finish(Updater *u, Download *d, CURLcode res, char *reason, size_t size) {
        char hex[SHA256_HEX_LEN + 1];
        long http = 0;

        (void) curl_easy_getinfo(d->easy, CURLINFO_RESPONSE_CODE, &http);
        if (d->oversized || res == CURLE_FILESIZE_EXCEEDED)
                return reasonf(reason, size, "size_mismatch");
        if (d->write_error < 0)
                return reasonf(reason, size, "download_failed: write: %s", strerror(-d->write_error));
        if (res == CURLE_HTTP_RETURNED_ERROR || (res == CURLE_OK && http != 200))
                return reasonf(reason, size, "download_failed: HTTP %ld", http);
        if (res != CURLE_OK)
                return reasonf(reason, size, "download_failed: %s",
                               d->errbuf[0] ? d->errbuf : curl_easy_strerror(res));
        if (d->received != d->limit)
                return reasonf(reason, size, "size_mismatch");

        if (sha256_hex_final(d->md, hex) < 0)
                return reasonf(reason, size, "download_failed: sha256 unavailable");
        if (strcmp(hex, u->offer.sha256) != 0)
                return reasonf(reason, size, "sha256_mismatch");

        /* Durable before it is visible under its final name. */
        if (fsync(d->fd) < 0 || rename(d->tmp_path, u->pkg_path) < 0)
                return reasonf(reason, size, "download_failed: %s", strerror(errno));
        d->tmp_path[0] = 0; /* renamed: nothing to unlink */
        (void) fsync_dir(u->dir);
        return 0;
}

/* From the loop (the glue): the transfer ended. */
static void on_download_done(CURL *easy, CURLcode result, void *userdata) {
        Download *d = userdata;
        Updater *u = d->u;
        char reason[GATE_REASON_MAX];
        int r;

        r = download_finish(u, d, result, reason, sizeof(reason));
        log_debug("Download of %s ended after %llu bytes", u->offer.version,
                  (unsigned long long) d->received);
        u->dl = download_free(d);
        if (r < 0)
                updater_fail(u, "%s", reason);
        else
                updater_ready(u);
}

static int download_setup_easy(Updater *u, Download *d) {
        const Config *cfg = u->cfg;
        long low_time = (long) ((u->low_speed_time + USEC_PER_SEC - 1) / USEC_PER_SEC);

        if (cfg->provider_token && u->send_token) {
                _cleanup_(freep) char *auth = NULL;
                int n = asprintf(&auth, "Authorization: Bearer %s", cfg->provider_token);

                if (n < 0)
                        return -ENOMEM;
                d->headers = curl_slist_append(NULL, auth);
                explicit_bzero(auth, (size_t) n);
                if (!d->headers)
                        return -ENOMEM;
        }
        if (curl_easy_setopt(d->easy, CURLOPT_CURLU, d->url) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_PROTOCOLS_STR, "http,https") != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_HTTPHEADER, d->headers) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_WRITEFUNCTION, on_curl_write) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_WRITEDATA, d) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_ERRORBUFFER, d->errbuf) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_FAILONERROR, 1L) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_FORBID_REUSE, 1L) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_SSL_VERIFYPEER, 1L) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_SSL_VERIFYHOST, 2L) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_USERAGENT, "dsm-agent-syncd") != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t) d->limit) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_CONNECTTIMEOUT_MS,
                             (long) (cfg->request_timeout / USEC_PER_MSEC)) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_TIMEOUT_MS, (long) (u->total_timeout / USEC_PER_MSEC)) !=
                    CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_LOW_SPEED_LIMIT, (long) u->low_speed_bytes) != CURLE_OK ||
            curl_easy_setopt(d->easy, CURLOPT_LOW_SPEED_TIME, low_time > 0 ? low_time : 1L) != CURLE_OK)
                return -EINVAL;
        if (cfg->provider_ca_file &&
            curl_easy_setopt(d->easy, CURLOPT_CAINFO, cfg->provider_ca_file) != CURLE_OK)
                return -EINVAL;
        return 0;
}

static int download_new(Updater *u, Download **ret) {
        Download *d;
        int r;

        d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        *d = (Download){.u = u, .fd = -1, .limit = u->offer.size, .url = u->offer_url};
        u->offer_url = NULL; /* owned by d now */

        if (mkdir(u->dir, 0700) < 0 && errno != EEXIST) {
                r = negative_errno();
                goto fail;
        }
        r = snprintf(d->tmp_path, sizeof(d->tmp_path), "%s/" TEMP_PREFIX "%s.XXXXXX", u->dir,
                     u->offer.version);
        if (r < 0 || (size_t) r >= sizeof(d->tmp_path)) {
                d->tmp_path[0] = 0;
                r = -ENAMETOOLONG;
                goto fail;
        }
        d->fd = mkostemp(d->tmp_path, O_CLOEXEC); /* O_CREAT|O_EXCL, 0600 */
        if (d->fd < 0) {
                r = negative_errno();
                d->tmp_path[0] = 0;
                goto fail;
        }

        r = -ENOMEM;
        d->md = EVP_MD_CTX_new();
        d->easy = curl_easy_init();
        if (!d->md || !d->easy)
                goto fail;
        if (EVP_DigestInit_ex(d->md, EVP_sha256(), NULL) != 1) {
                r = -EIO;
                goto fail;
        }
        r = download_setup_easy(u, d);
        if (r < 0)
                goto fail;
        r = curl_glue_add(u->glue, d->easy, on_download_done, d);
        if (r < 0)
                goto fail;
        *ret = d;
        return 0;
fail:
        download_free(d);
        return r;
}

static void updater_download(Updater *u) {
        int r;

        r = download_new(u, &u->dl);
        u->offer_url = curl_url_cleanup_p(u->offer_url); /* download_new took it unless it failed early */
        if (r < 0) {
                /* Counts as a failed attempt, so it backs off like one. */
                updater_fail(u, "download_failed: %s", strerror(-r));
                return;
        }
        u->phase = UPDATER_DOWNLOADING;
        log_info("Downloading Agent update %s (%llu bytes) %s", u->offer.version,
                 (unsigned long long) u->offer.size,
                 !u->send_token           ? "without the provider token (not the Provider's api_url origin)"
                 : u->cfg->provider_token ? "with the provider token"
                                          : "(no provider token configured)");
}

/* ---- reusing a package kept from an earlier attempt ---- */

static void verify_end(Updater *u, bool ok) {
        u->verify = file_hash_free(u->verify);
        if (ok) {
                u->offer_url = curl_url_cleanup_p(u->offer_url);
                log_info("Reusing the verified package %s", u->pkg_path);
                updater_ready(u);
                return;
        }
        log_warning("Kept package %s no longer matches the offered size and sha256, downloading it again",
                    u->pkg_path);
        if (unlink(u->pkg_path) < 0 && errno != ENOENT)
                log_warning_errno(negative_errno(), "Cannot remove %s", u->pkg_path);
        updater_download(u);
}

static void on_verified(FileHash *h, const char *hex, void *userdata) {
        Updater *u = userdata;

        verify_end(u, hex && strcmp(hex, u->offer.sha256) == 0);
}

/* A package of this version from an earlier attempt (the command failed,
 * or the daemon stopped before it finished) is used again if its size and
 * sha256 still match. Returns 1 when its check has started, 0 when there is
 * nothing to reuse (a file of the wrong size is removed), or a negative
 * errno. */
static int verify_start(Updater *u) {
        _cleanup_(closep) int fd = -1;
        struct stat st;
        int r;

        /* O_NONBLOCK: a FIFO planted under that name must not hang us. */
        fd = open(u->pkg_path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
                if (errno == ENOENT)
                        return 0;
                log_debug_errno(negative_errno(), "Cannot open kept package %s", u->pkg_path);
                (void) unlink(u->pkg_path);
                return 0;
        }
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t) st.st_size != u->offer.size) {
                log_info("Kept package %s has the wrong size, downloading it again", u->pkg_path);
                (void) unlink(u->pkg_path);
                return 0;
        }

        r = file_hash_new(u->event, fd, u->offer.size, on_verified, u, &u->verify);
        fd = -1; /* taken */
        if (r < 0)
                return r;
        return 1;
}

/* ---- public ---- */

int updater_new(sd_event *e, const Config *cfg, UpdateRecord *record, const UpdaterCallbacks *callbacks,
                void *userdata, Updater **ret) {
        Updater *u;
        int r;

        u = calloc(1, sizeof(*u));
        if (!u)
                return -ENOMEM;
        *u = (Updater){
                .event = sd_event_ref(e),
                .cfg = cfg,
                .record = record,
                .cb = callbacks ? *callbacks : (UpdaterCallbacks){},
                .userdata = userdata,
                .phase = UPDATER_IDLE,
                .low_speed_bytes = 1024,
                .low_speed_time = 60 * USEC_PER_SEC,
                .total_timeout = 3600 * USEC_PER_SEC,
        };
        r = runner_new(e, "update", &u->runner);
        if (r >= 0)
                r = curl_glue_new(e, "updater", &u->glue);
        if (r < 0) {
                updater_free(u);
                return r;
        }
        /* A restored backoff is no longer than one from now either; the
         * caller saves the state with its next change. */
        (void) backoff_clamp(record, now_usec(CLOCK_REALTIME));
        *ret = u;
        return 0;
}

Updater *updater_free(Updater *u) {
        if (!u)
                return NULL;
        u->dl = download_free(u->dl);
        u->glue = curl_glue_free(u->glue);
        u->verify = file_hash_free(u->verify);
        u->offer_url = curl_url_cleanup_p(u->offer_url);
        u->runner = runner_free(u->runner);
        strv_free(u->argv);
        sd_event_unref(u->event);
        free(u);
        return NULL;
}

int updater_reconfigure(Updater *u, const Config *cfg) {
        u->cfg = cfg;
        return 0;
}

void updater_set_download_limits(Updater *u, uint64_t low_speed_bytes, usec_t low_speed_time, usec_t total) {
        u->low_speed_bytes = low_speed_bytes;
        u->low_speed_time = low_speed_time;
        u->total_timeout = total;
}

int updater_start(Updater *u, const AgentUpdate *offer, const char *trusted_api_url) {
        UpdateRecord *s = u->record;
        char reason[GATE_REASON_MAX];
        uint64_t now = now_usec(CLOCK_REALTIME);
        const char *base;
        int r;

        if (u->phase == UPDATER_DOWNLOADING || u->phase == UPDATER_APPLYING || u->dl || u->verify ||
            runner_busy(u->runner))
                return -EBUSY;
        if (offer_check(offer) < 0)
                return -EINVAL;
        if (streq_ptr(s->failed_version, offer->version)) {
                if (backoff_clamp(s, now)) {
                        log_info("Next attempt of the Agent update %s was more than 1 h away (clock "
                                 "stepped back?), now at most 1 h",
                                 offer->version);
                        updater_changed(u);
                }
                if (now < s->retry_not_before_usec)
                        return -EAGAIN;
        }

        if (strscpy(u->dir, sizeof(u->dir), u->cfg->download_dir) < 0)
                return -ENAMETOOLONG;
        r = snprintf(u->pkg_path, sizeof(u->pkg_path), "%s/" PKG_PREFIX "%s" PKG_SUFFIX, u->dir,
                     offer->version);
        if (r < 0 || (size_t) r >= sizeof(u->pkg_path))
                return -ENAMETOOLONG;
        u->offer = *offer;
        u->last_error[0] = 0;

        /* Refusals of this offer count as failed attempts, so they are
         * shown and logged with their reason and back off like one. */
        if (offer->size > UPDATER_PACKAGE_SIZE_MAX) {
                updater_fail(u, "download_failed: size %llu exceeds the limit of %llu bytes",
                             (unsigned long long) offer->size,
                             (unsigned long long) UPDATER_PACKAGE_SIZE_MAX);
                return 0;
        }
        if (offer_origin(u, trusted_api_url, reason, sizeof(reason)) < 0) {
                u->offer_url = curl_url_cleanup_p(u->offer_url);
                updater_fail(u, "%s", reason);
                return 0;
        }

        base = strrchr(u->pkg_path, '/');
        remove_old_packages(u->dir, base ? base + 1 : u->pkg_path);

        r = verify_start(u);
        if (r > 0) {
                u->phase = UPDATER_DOWNLOADING;
                log_info("Checking the kept package %s of Agent update %s", u->pkg_path, offer->version);
                return 0;
        }
        if (r < 0) {
                u->offer_url = curl_url_cleanup_p(u->offer_url);
                updater_fail(u, "download_failed: %s", strerror(-r));
                return 0;
        }
        updater_download(u);
        return 0;
}

static bool offer_same(const AgentUpdate *a, const AgentUpdate *b) {
        return a->present == b->present && a->size == b->size && strcmp(a->version, b->version) == 0 &&
               strcmp(a->url, b->url) == 0 && strcmp(a->sha256, b->sha256) == 0;
}

int updater_apply(Updater *u, const AgentUpdate *offer) {
        if (u->phase != UPDATER_READY || !offer || !offer_same(offer, &u->offer))
                return -ESTALE;
        updater_run_command(u);
        return 0;
}

UpdaterPhase updater_phase(const Updater *u) {
        return u->phase;
}

const char *updater_last_error(const Updater *u) {
        return u->last_error;
}

int updater_sweep(const Config *cfg) {
        DIR *d;
        struct dirent *de;
        int n = 0;

        d = opendir(cfg->download_dir);
        if (!d)
                return errno == ENOENT ? 0 : negative_errno();
        while ((de = readdir(d)))
                if (strncmp(de->d_name, TEMP_PREFIX, strlen(TEMP_PREFIX)) == 0 &&
                    unlinkat(dirfd(d), de->d_name, 0) == 0)
                        n++;
        closedir(d);
        return n;
}

int updater_read_installed(const Config *cfg, char *buf, size_t size) {
        _cleanup_(freep) char *data = NULL;
        size_t len, start, end;
        int r;

        if (size == 0)
                return -EINVAL;
        buf[0] = 0;
        r = read_file_full(cfg->agent_version_file, VERSION_FILE_MAX, &data, &len);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;

        len = strcspn(data, "\r\n"); /* the first line */
        start = strspn(data, " \t");
        end = len;
        while (end > start && (data[end - 1] == ' ' || data[end - 1] == '\t'))
                end--;
        if (end - start >= size)
                return -ENAMETOOLONG;
        memcpy(buf, data + start, end - start);
        buf[end - start] = 0;
        return 0;
}

void updater_applies(const Updater *u, uint64_t *ret_ok, uint64_t *ret_failed) {
        *ret_ok = u ? u->applies_ok : 0;
        *ret_failed = u ? u->applies_failed : 0;
}
