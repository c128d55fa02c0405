/* Small helpers that more than one module needs, each written once (in the
 * manner of OpenBSD ntpd's util.c): backoff arithmetic, random numbers and
 * jitter, argv vectors, fsync of a directory, and URL inspection through
 * libcurl's URL parser. Nothing here logs. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint64_t usec_t;

/* The delay before retry number `failures` (1 = after the first failure):
 * first, doubling, capped at max. 0 failures: 0. Pure. */
usec_t backoff_usec(usec_t first, usec_t max, unsigned failures);

/* The next delay of a doubling backoff from the current one: first when
 * cur is 0, then twice cur, capped at max. Pure. */
usec_t backoff_next(usec_t cur, usec_t first, usec_t max);

/* A random 64-bit word (getrandom, or a mixed clock before the pool is
 * ready). Quality matters little: it spreads a fleet out and names
 * temporary files. random_set_source() replaces it (the simulation makes
 * it seeded and reproducible); NULL restores the default. */
uint64_t random_u64(void);
void random_set_source(uint64_t (*source)(void *userdata), void *userdata);
/* Uniform in [0, 1). */
double random_unit(void);
/* usec * (1 +- jitter), uniformly, 0 <= jitter < 1. */
usec_t jittered(usec_t usec, double jitter);

/* Frees a NULL-terminated vector of strings and each string; NULL safe. */
char **strv_free(char **v);
/* A deep copy of a NULL-terminated vector; NULL for NULL or no memory. */
char **strv_copy(char *const *v);

/* fsync() of a directory, so that a rename in it survives a power loss. */
int fsync_dir(const char *dir);

/* What the daemon needs to know about an http(s) URL, through libcurl's
 * URL parser (scheme and host lowercased, port defaulted from the scheme).
 * -EINVAL for anything that is not an absolute http:// or https:// URL with
 * a host. */
typedef struct UrlInfo {
        bool https;        /* false: plain http */
        bool has_userinfo; /* a user name or password in the URL */
        unsigned port;     /* explicit, else 80 or 443 */
        char host[256];    /* without IPv6 brackets */
} UrlInfo;
int url_inspect(const char *url, UrlInfo *ret);
/* Same scheme, host and port (and both valid). */
bool url_same_origin(const char *a, const char *b);
/* A valid URL with the http (not https) scheme, any letter case. */
bool url_is_plain_http(const char *url);

/* Overwrites a NUL-terminated secret (a token, a private key) with zeros,
 * then frees it; NULL safe. Returns NULL. */
char *secret_free(char *s);

/* Uniform in [0, max], drawn through random_unit(). */
usec_t random_usec(usec_t max);
/* AWS "full jitter": uniform in [0, backoff_usec(first, max, failures)], so
 * that clients failing together retry apart instead of in waves. 0
 * failures: 0. */
usec_t backoff_full_jitter(usec_t first, usec_t max, unsigned failures);
