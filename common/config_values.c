/* The value parsers of config.h: each turns one string into what it
 * means, or a negative errno. They know nothing of files and lines:
 * config.c words the errors. Shared with the modules that take the same
 * values elsewhere (the listener's allow list, tests). */
#include <arpa/inet.h>
#include <ctype.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "config.h"
#include "macro.h"
#include "util.h"

#define MAX_DURATION (366ULL * 24 * 3600 * USEC_PER_SEC)

int parse_duration(const char *s, usec_t *ret) {
        static const struct {
                const char *suffix;
                uint64_t mult;
        } units[] = {
                {"ms", USEC_PER_MSEC},      {"s", USEC_PER_SEC}, {"m", 60 * USEC_PER_SEC},
                {"h", 3600 * USEC_PER_SEC}, {"", USEC_PER_SEC},
        };
        unsigned long long v;
        char *end;

        if (!s || !isdigit((unsigned char) s[0])) /* also refuses "-1", " 1", "" */
                return -EINVAL;
        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno == ERANGE)
                return -ERANGE;
        for (size_t i = 0; i < ELEMENTSOF(units); i++) {
                if (!streq_ptr(end, units[i].suffix))
                        continue;
                if (v > MAX_DURATION / units[i].mult)
                        return -ERANGE;
                *ret = v * units[i].mult;
                return 0;
        }
        return -EINVAL;
}

static int parse_port(const char *s, uint16_t *ret) {
        unsigned long v;
        char *end;

        if (!isdigit((unsigned char) s[0]) || strlen(s) > 5)
                return -EINVAL;
        v = strtoul(s, &end, 10);
        if (*end || v > 65535)
                return -EINVAL;
        *ret = (uint16_t) v;
        return 0;
}

int parse_listen_address(const char *s, struct sockaddr_storage *ret, socklen_t *ret_len) {
        char host[INET6_ADDRSTRLEN + 2];
        const char *colon;
        uint16_t port;
        size_t n;

        if (!s)
                return -EINVAL;
        colon = strrchr(s, ':');
        if (!colon || parse_port(colon + 1, &port) < 0)
                return -EINVAL;
        n = (size_t) (colon - s);
        if (n == 0 || n >= sizeof(host))
                return -EINVAL;
        memcpy(host, s, n);
        host[n] = 0;

        memset(ret, 0, sizeof(*ret));
        if (host[0] == '[') {
                struct sockaddr_in6 *sa6 = (struct sockaddr_in6 *) ret;

                if (n < 3 || host[n - 1] != ']')
                        return -EINVAL;
                host[n - 1] = 0;
                if (inet_pton(AF_INET6, host + 1, &sa6->sin6_addr) != 1)
                        return -EINVAL;
                sa6->sin6_family = AF_INET6;
                sa6->sin6_port = htons(port);
                *ret_len = sizeof(*sa6);
        } else {
                struct sockaddr_in *sa4 = (struct sockaddr_in *) ret;

                if (inet_pton(AF_INET, host, &sa4->sin_addr) != 1)
                        return -EINVAL;
                sa4->sin_family = AF_INET;
                sa4->sin_port = htons(port);
                *ret_len = sizeof(*sa4);
        }
        return 0;
}

/* The prefix of IPv4-mapped IPv6 addresses, ::ffff:0:0/96. */
static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

int parse_cidr(const char *s, Cidr *ret) {
        char addr[INET6_ADDRSTRLEN];
        const char *slash;
        unsigned long maxlen, len;
        Cidr c = {};
        size_t n;

        if (!s)
                return -EINVAL;
        slash = strchr(s, '/');
        n = slash ? (size_t) (slash - s) : strlen(s);
        if (n == 0 || n >= sizeof(addr))
                return -EINVAL;
        memcpy(addr, s, n);
        addr[n] = 0;

        if (inet_pton(AF_INET, addr, c.addr) == 1) {
                c.family = AF_INET;
                maxlen = 32;
        } else if (inet_pton(AF_INET6, addr, c.addr) == 1) {
                c.family = AF_INET6;
                maxlen = 128;
        } else
                return -EINVAL;

        len = maxlen;
        if (slash) {
                char *end;

                if (!isdigit((unsigned char) slash[1]) || strlen(slash + 1) > 3)
                        return -EINVAL;
                len = strtoul(slash + 1, &end, 10);
                if (*end || len > maxlen)
                        return -EINVAL;
        }
        c.prefixlen = (unsigned) len;

        /* Keep the network address only, so matching is a plain compare. */
        for (unsigned bit = c.prefixlen; bit < maxlen; bit++)
                c.addr[bit / 8] &= (uint8_t) ~(0x80u >> (bit % 8));
        /* "::ffff:10.0.0.0/104" is an IPv4 network written the IPv6 way:
         * keep it one, since IPv4 peers match IPv4 entries only. */
        if (c.family == AF_INET6 && c.prefixlen >= 96 && memcmp(c.addr, v4mapped, sizeof(v4mapped)) == 0) {
                c.family = AF_INET;
                c.prefixlen -= 96;
                memmove(c.addr, c.addr + 12, 4);
                memset(c.addr + 4, 0, sizeof(c.addr) - 4);
        }
        *ret = c;
        return 0;
}

static bool cidr_match(const Cidr *c, int family, const uint8_t *addr) {
        unsigned full = c->prefixlen / 8, rest = c->prefixlen % 8;

        if (c->family != family)
                return false;
        if (memcmp(c->addr, addr, full) != 0)
                return false;
        if (rest == 0)
                return true;
        return ((c->addr[full] ^ addr[full]) & (uint8_t) (0xff00u >> rest)) == 0;
}

bool cidr_list_contains(const Cidr *list, size_t n, const struct sockaddr *sa) {
        const uint8_t *addr;
        int family;

        if (!sa)
                return false;
        if (sa->sa_family == AF_INET) {
                family = AF_INET;
                addr = (const uint8_t *) &((const struct sockaddr_in *) sa)->sin_addr;
        } else if (sa->sa_family == AF_INET6) {
                family = AF_INET6;
                addr = (const uint8_t *) &((const struct sockaddr_in6 *) sa)->sin6_addr;
                /* A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d:
                 * still IPv4 peers, for IPv4 entries only (contract
                 * section 2: "::/0" admits no IPv4 peer). */
                if (memcmp(addr, v4mapped, sizeof(v4mapped)) == 0) {
                        family = AF_INET;
                        addr += sizeof(v4mapped);
                }
        } else
                return false;

        for (size_t i = 0; i < n; i++)
                if (cidr_match(&list[i], family, addr))
                        return true;
        return false;
}

int parse_argv(const char *s, char ***ret) {
        char **argv;
        size_t n = 0;

        argv = calloc(CONFIG_MAX_ARGV + 1, sizeof(char *));
        if (!argv)
                return -ENOMEM;
        while (*s) {
                size_t len;

                if (isspace((unsigned char) *s)) {
                        s++;
                        continue;
                }
                if (n == CONFIG_MAX_ARGV) {
                        strv_free(argv);
                        return -E2BIG;
                }
                len = strcspn(s, " \t\r\n\v\f");
                argv[n] = strndup(s, len);
                if (!argv[n++]) {
                        strv_free(argv);
                        return -ENOMEM;
                }
                s += len;
        }
        if (n == 0) {
                free(argv);
                *ret = NULL;
                return 0;
        }
        *ret = argv;
        return 0;
}

int read_secret_file(const char *path, char **ret) {
        _cleanup_(closep) int fd = -1;
        char buf[CONFIG_MAX_SECRET + 1];
        size_t n = 0;
        struct stat st;

        /* O_NONBLOCK: a FIFO named as a secret must not hang a reload. */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return negative_errno();
        if (fstat(fd, &st) < 0)
                return negative_errno();
        if (!S_ISREG(st.st_mode))
                return -EINVAL;
        while (n < sizeof(buf) - 1) {
                ssize_t k = read(fd, buf + n, sizeof(buf) - 1 - n);

                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0) {
                        explicit_bzero(buf, sizeof(buf));
                        return negative_errno();
                }
                if (k == 0)
                        break;
                n += (size_t) k;
        }
        buf[n] = 0;
        /* A first line that does not end within the limit, or holds a NUL,
         * would be silently cut: a wrong secret is worse than an error. */
        const char *nl = memchr(buf, '\n', n);
        size_t line = nl ? (size_t) (nl - buf) : n;
        if ((!nl && n == sizeof(buf) - 1) || memchr(buf, 0, line)) {
                explicit_bzero(buf, sizeof(buf));
                return nl || n < sizeof(buf) - 1 ? -EINVAL : -E2BIG;
        }
        buf[line] = 0;
        n = strlen(buf);
        while (n > 0 && isspace((unsigned char) buf[n - 1]))
                buf[--n] = 0;
        if (n == 0) {
                explicit_bzero(buf, sizeof(buf));
                return -ENODATA;
        }
        *ret = strdup(buf);
        explicit_bzero(buf, sizeof(buf));
        return *ret ? 0 : -ENOMEM;
}

bool config_agent_id_valid(const char *s) {
        size_t n = strlen(s);

        if (n == 0 || n > CONFIG_AGENT_ID_MAX)
                return false;
        for (const char *c = s; *c; c++)
                if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-", *c))
                        return false;
        return true;
}

int parse_bool(const char *s) {
        static const char *const yes[] = {"true", "yes", "1", "on"};
        static const char *const no[] = {"false", "no", "0", "off"};

        for (size_t i = 0; i < ELEMENTSOF(yes); i++) {
                if (strcasecmp(s, yes[i]) == 0)
                        return 1;
                if (strcasecmp(s, no[i]) == 0)
                        return 0;
        }
        return -EINVAL;
}

int parse_socket_path(const char *s) {
        size_t n = s ? strlen(s) : 0;

        if (n == 0 || s[0] != '/' || s[n - 1] == '/')
                return -EINVAL;
        for (size_t i = 0; i < n; i++)
                if (isspace((unsigned char) s[i]) || iscntrl((unsigned char) s[i]))
                        return -EINVAL;
        /* The kernel wants the path and its NUL in sun_path. */
        if (n >= sizeof(((struct sockaddr_un *) NULL)->sun_path))
                return -ENAMETOOLONG;
        return 0;
}

/* "HH:MM" into minutes after midnight. */
static int parse_hhmm(const char *s, unsigned *ret) {
        unsigned h, m;

        if (!isdigit((unsigned char) s[0]) || !isdigit((unsigned char) s[1]) || s[2] != ':' ||
            !isdigit((unsigned char) s[3]) || !isdigit((unsigned char) s[4]))
                return -EINVAL;
        h = (unsigned) (s[0] - '0') * 10 + (unsigned) (s[1] - '0');
        m = (unsigned) (s[3] - '0') * 10 + (unsigned) (s[4] - '0');
        if (h > 23 || m > 59)
                return -EINVAL;
        *ret = h * 60 + m;
        return 0;
}

int parse_window(const char *s, unsigned *ret_start, unsigned *ret_end) {
        if (strlen(s) != 11 || s[5] != '-' || parse_hhmm(s, ret_start) < 0 || parse_hhmm(s + 6, ret_end) < 0)
                return -EINVAL;
        return 0;
}

int parse_mode(const char *s, mode_t *ret) {
        unsigned long v;
        char *end;

        if (*s == 0 || strspn(s, "01234567") != strlen(s) || strlen(s) > 5)
                return -EINVAL;
        v = strtoul(s, &end, 8);
        if (*end || v > 07777)
                return -EINVAL;
        *ret = (mode_t) v;
        return 0;
}
