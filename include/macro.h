/* Small helpers shared by every module: cleanup attributes, array sizes,
 * time conversions. Nothing here allocates or logs. */
#pragma once

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define ELEMENTSOF(x)  (sizeof(x) / sizeof((x)[0]))
#define _cleanup_(f)   __attribute__((cleanup(f)))
#define _unused_       __attribute__((unused))
#define _printf_(a, b) __attribute__((format(printf, a, b)))

#define USEC_PER_SEC  ((uint64_t) 1000000ULL)
#define USEC_PER_MSEC ((uint64_t) 1000ULL)
#define NSEC_PER_USEC ((uint64_t) 1000ULL)
#define USEC_INFINITY ((uint64_t) -1)

/* Microseconds on a clock (CLOCK_MONOTONIC for timers, CLOCK_REALTIME for
 * what is shown or persisted). */
static inline uint64_t now_usec(clockid_t clock) {
        struct timespec ts;

        clock_gettime(clock, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

static inline void freep(void *p) {
        free(*(void **) p);
}

static inline void closep(int *fd) {
        if (*fd >= 0) {
                int saved = errno;
                close(*fd);
                errno = saved;
        }
}

/* Returns a negative errno for the last failing libc call, never 0. */
static inline int negative_errno(void) {
        return errno > 0 ? -errno : -EIO;
}

/* Bounded string copy that always terminates; returns -ENAMETOOLONG when
 * src does not fit (dst then holds a truncated copy). */
static inline int strscpy(char *dst, size_t size, const char *src) {
        size_t n = strlen(src);
        if (size == 0)
                return -ENAMETOOLONG;
        if (n >= size) {
                memcpy(dst, src, size - 1);
                dst[size - 1] = 0;
                return -ENAMETOOLONG;
        }
        memcpy(dst, src, n + 1);
        return 0;
}

static inline int streq_ptr(const char *a, const char *b) {
        if (!a || !b)
                return a == b;
        return strcmp(a, b) == 0;
}
