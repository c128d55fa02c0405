/* Small helpers written once; see util.h. */
#include "util.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <unistd.h>

#include "macro.h"

usec_t backoff_usec(usec_t first, usec_t max, unsigned failures) {
        usec_t d = first;

        if (failures == 0)
                return 0;
        for (unsigned i = 1; i < failures && d < max; i++)
                d = d > max / 2 ? max : d * 2;
        return d > max ? max : d;
}

usec_t backoff_next(usec_t cur, usec_t first, usec_t max) {
        if (cur == 0)
                return first > max ? max : first;
        return cur >= max / 2 ? max : cur * 2;
}

static uint64_t (*random_source)(void *userdata);
static void *random_userdata;

void random_set_source(uint64_t (*source)(void *userdata), void *userdata) {
        random_source = source;
        random_userdata = userdata;
}

uint64_t random_u64(void) {
        static uint64_t fallback;
        uint64_t v;

        if (random_source)
                return random_source(random_userdata);
        if (getrandom(&v, sizeof(v), GRND_NONBLOCK) == sizeof(v))
                return v;
        /* Early at boot: a clock and the PID mixed through a 64-bit LCG. */
        fallback = fallback * 6364136223846793005ULL + 1442695040888963407ULL;
        return fallback ^ now_usec(CLOCK_MONOTONIC) ^ (uint64_t) getpid() << 40;
}

double random_unit(void) {
        return (double) (random_u64() >> 11) / (double) (1ULL << 53);
}

usec_t jittered(usec_t usec, double jitter) {
        double f = 1.0 + jitter * (2.0 * random_unit() - 1.0);

        return (usec_t) ((double) usec * f);
}

char **strv_free(char **v) {
        for (char **p = v; p && *p; p++)
                free(*p);
        free(v);
        return NULL;
}

char **strv_copy(char *const *v) {
        size_t n = 0;
        char **copy;

        if (!v)
                return NULL;
        while (v[n])
                n++;
        copy = calloc(n + 1, sizeof(char *));
        if (!copy)
                return NULL;
        for (size_t i = 0; i < n; i++)
                if (!(copy[i] = strdup(v[i])))
                        return strv_free(copy);
        return copy;
}

int fsync_dir(const char *dir) {
        _cleanup_(closep) int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

        if (fd < 0 || fsync(fd) < 0)
                return negative_errno();
        return 0;
}

static int url_get(CURLU *h, CURLUPart part, char **ret) {
        return curl_url_get(h, part, ret, 0) == CURLUE_OK ? 0 : -EINVAL;
}

int url_inspect(const char *url, UrlInfo *ret) {
        CURLU *h = curl_url();
        char *scheme = NULL, *host = NULL, *port = NULL, *user = NULL, *password = NULL;
        UrlInfo info = {};
        int r = -EINVAL;

        if (!h)
                return -ENOMEM;
        /* Only absolute http(s) URLs: no default scheme is guessed. */
        if (!url || curl_url_set(h, CURLUPART_URL, url, 0) != CURLUE_OK)
                goto out;
        if (url_get(h, CURLUPART_SCHEME, &scheme) < 0 || url_get(h, CURLUPART_HOST, &host) < 0)
                goto out;
        if (strcasecmp(scheme, "https") == 0)
                info.https = true;
        else if (strcasecmp(scheme, "http") != 0)
                goto out;
        info.has_userinfo = curl_url_get(h, CURLUPART_USER, &user, 0) == CURLUE_OK ||
                            curl_url_get(h, CURLUPART_PASSWORD, &password, 0) == CURLUE_OK;
        if (url_get(h, CURLUPART_PORT, &port) == 0) {
                char *end;
                unsigned long p = strtoul(port, &end, 10);
                if (*end || p == 0 || p > 65535)
                        goto out;
                info.port = (unsigned) p;
        } else
                info.port = info.https ? 443 : 80;
        {
                /* An IPv6 literal comes back in brackets. */
                size_t n = strlen(host);
                const char *h0 = host;
                if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
                        h0++;
                        n -= 2;
                }
                if (n == 0 || n >= sizeof(info.host))
                        goto out;
                for (size_t i = 0; i < n; i++)
                        info.host[i] = (char) (h0[i] >= 'A' && h0[i] <= 'Z' ? h0[i] - 'A' + 'a' : h0[i]);
        }
        *ret = info;
        r = 0;
out:
        curl_free(scheme);
        curl_free(host);
        curl_free(port);
        curl_free(user);
        curl_free(password);
        curl_url_cleanup(h);
        return r;
}

bool url_same_origin(const char *a, const char *b) {
        UrlInfo x, y;

        return url_inspect(a, &x) == 0 && url_inspect(b, &y) == 0 && x.https == y.https &&
               x.port == y.port && strcmp(x.host, y.host) == 0;
}

bool url_is_plain_http(const char *url) {
        UrlInfo u;

        return url_inspect(url, &u) == 0 && !u.https;
}

char *secret_free(char *s) {
        if (s) {
                explicit_bzero(s, strlen(s));
                free(s);
        }
        return NULL;
}

usec_t random_usec(usec_t max) {
        /* (max + 1) as a double: every value up to max is reachable; the
         * rounding of a huge max could reach max + 1, hence the clamp. */
        double v = random_unit() * ((double) max + 1.0);

        return v >= (double) max ? max : (usec_t) v;
}

usec_t backoff_full_jitter(usec_t first, usec_t max, unsigned failures) {
        return failures == 0 ? 0 : random_usec(backoff_usec(first, max, failures));
}
