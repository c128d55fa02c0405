/* Configuration: the INI file of contract section 2 parsed (inih) into one
 * validated, self-contained struct. Shared by the daemon and the control
 * tool. Owns the Config and every string and secret in it. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "log.h"

#define CONFIG_DEFAULT_PATH "/etc/dsm-agent-sync/agent-sync.ini"
/* The local control socket ([daemon] control_socket); /run/dsm-agent-sync
 * is the unit's RuntimeDirectory. */
#define CONFIG_DEFAULT_CONTROL_SOCKET "/run/dsm-agent-sync/control.sock"
#define CONFIG_AGENT_ID_MAX           64
#define CONFIG_MAX_ENDPOINTS          16
#define CONFIG_MAX_ALLOW              32
#define CONFIG_MAX_ARGV               32
#define CONFIG_ERROR_MAX              512
#define CONFIG_MAX_SECRET             4096 /* a token or password file, bytes */

typedef uint64_t usec_t;

/* One allowed network of [notify] allow. */
typedef struct Cidr {
        int family; /* AF_INET or AF_INET6 */
        uint8_t addr[16];
        unsigned prefixlen;
} Cidr;

typedef struct Config {
        char *path; /* the file it was read from */

        /* [provider] */
        char *endpoints[CONFIG_MAX_ENDPOINTS];
        size_t n_endpoints;
        char *load_balancer;  /* NULL when unset */
        char *provider_token; /* contents of token_file, trimmed; NULL when unset */
        char *provider_token_file;
        char *provider_ca_file;    /* NULL: system store */
        usec_t poll_interval;      /* default 30s */
        double poll_jitter;        /* default 0.2, 0 <= x < 1 */
        usec_t fast_poll_interval; /* default 500ms, <= poll_interval */
        usec_t request_timeout;    /* default 5s */
        usec_t hint_spread;        /* random delay before an event/notify/loss round; default 0 */

        /* [broker] */
        char *broker_username; /* default "guest" */
        char *broker_password; /* contents of password_file; "guest" when unset */
        char *broker_password_file;
        char *exchange;           /* default dsm.provider.events */
        usec_t heartbeat;         /* default 10s; 0 disables */
        char *broker_ca_file;     /* NULL: system store */
        char *settings_file;      /* default /etc/dsm-agent/rabbitmq.ini */
        mode_t settings_mode;     /* default 0640 */
        char **on_change_argv;    /* NULL-terminated; NULL when unset/empty */
        usec_t on_change_timeout; /* default 30s */

        /* [notify] */
        bool notify_enabled; /* false when listen = off */
        char *notify_listen; /* as written, e.g. "0.0.0.0:8631" or "[::1]:8631" */
        struct sockaddr_storage notify_addr;
        socklen_t notify_addrlen;
        Cidr allow[CONFIG_MAX_ALLOW];
        size_t n_allow;     /* default: 127.0.0.0/8, ::1/128 */
        char *notify_token; /* contents of token_file; NULL when unset */
        char *notify_token_file;
        char *tls_cert; /* both set: HTTPS */
        char *tls_key;

        /* [update] */
        bool update_enabled;    /* default true */
        unsigned stable_rounds; /* default 2, >= 1 */
        usec_t max_delay;       /* default 5m */
        bool window_set;
        unsigned window_start_min; /* minutes after 00:00 UTC */
        unsigned window_end_min;
        char *window;               /* as written, "HH:MM-HH:MM"; NULL when unset */
        char *agent_version_file;   /* default /etc/dsm-agent/VERSION */
        char *download_dir;         /* default /var/lib/dsm-agent-sync/updates */
        char **update_command_argv; /* NULL-terminated; default /usr/lib/dsm-agent-sync/apply-update */
        usec_t command_timeout;     /* default 10m */

        /* [daemon] */
        char *state_file; /* default /var/lib/dsm-agent-sync/state.json */
        int log_level;    /* syslog priority, default LOG_INFO */
        LogTarget log_target;
        char *control_socket; /* default CONFIG_DEFAULT_CONTROL_SOCKET; NULL when off */
        char *agent_id;       /* NULL: the machine id (resolved by the daemon) */
} Config;

/* Parses and validates FILE. On success *ret owns a new Config and 0 is
 * returned. On failure *ret is untouched, a negative errno is returned
 * (-EINVAL for content errors, -ENOENT etc. for I/O, also of a secret file)
 * and "FILE:LINE: message" is written into err (the first error only; LINE
 * is the line of the offending key, also for an empty or unreadable secret
 * file, and 0 when the problem is not tied to one line, such as a missing
 * required key or an unopenable FILE). Secrets never appear in err.
 * on_change and command must name an absolute program (no PATH search). */
int config_load(const char *path, Config **ret, char *err, size_t errlen);
Config *config_free(Config *c);

/* ---- value parsers (common/config_values.c) ---- */

/* "30s", "500ms", "5m", "1h", "10" (seconds); integers only. -EINVAL on
 * garbage, -ERANGE above 366 days (so now + duration never overflows). */
int parse_duration(const char *s, usec_t *ret);
/* "10.0.0.0/8", "::1", "192.168.1.1" (a host is a /32 or /128). An
 * IPv4-mapped network ("::ffff:10.0.0.0/104") becomes the IPv4 one. */
int parse_cidr(const char *s, Cidr *ret);
/* "0.0.0.0:8631", "[::]:8631", "127.0.0.1:0". */
int parse_listen_address(const char *s, struct sockaddr_storage *ret, socklen_t *ret_len);
/* True when addr (AF_INET/AF_INET6) is in one of the allowed networks of
 * its own family (contract section 2): an IPv4 peer, also one a dual-stack
 * socket shows as ::ffff:a.b.c.d, matches IPv4 entries only, an IPv6 peer
 * IPv6 entries only ("::/0" admits no IPv4 peer). */
bool cidr_list_contains(const Cidr *list, size_t n, const struct sockaddr *addr);
/* Splits s on whitespace into a NULL-terminated vector (strv_free), or
 * NULL when s holds no word; -E2BIG above CONFIG_MAX_ARGV words. */
int parse_argv(const char *s, char ***ret);
/* [daemon] agent_id: 1-CONFIG_AGENT_ID_MAX characters of A-Z a-z 0-9 . _ : -
 * (it names the Agent in its acknowledgements; a machine id qualifies). */
bool config_agent_id_valid(const char *s);
/* true/yes/1/on -> 1, false/no/0/off -> 0 (any case); else -EINVAL. */
int parse_bool(const char *s);
/* An octal mode up to 07777 ("640", "0640"). */
int parse_mode(const char *s, mode_t *ret);
/* A path a Unix socket can be bound to: absolute, no whitespace or
 * control characters, not ending in '/'; -ENAMETOOLONG when it does not
 * fit a sockaddr_un (107 bytes), -EINVAL otherwise. */
int parse_socket_path(const char *s);
/* "HH:MM-HH:MM" into minutes after midnight (start may equal end here). */
int parse_window(const char *s, unsigned *ret_start, unsigned *ret_end);
/* The first line of a regular file, trailing whitespace cut: -ENODATA when
 * empty, -E2BIG when longer than CONFIG_MAX_SECRET, -EINVAL for a NUL in
 * it or a file that is not regular (a FIFO must not hang a reload). The
 * caller wipes and frees *ret. */
int read_secret_file(const char *path, char **ret);
