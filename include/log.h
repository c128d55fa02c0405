/* Logging: one call per event, to the journal with structured fields or to
 * stderr as key=value lines (contract section 9). Owns the log target and
 * the threshold; callers own nothing. Never pass a secret to these calls. */
#pragma once

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <syslog.h>

#include "macro.h"

/* Stable MESSAGE_IDs, one per kind of event an operator searches for.
 * packaging/catalog/dsm-agent-sync.catalog explains each one. */
#define MID_PRIMARY_COMMITTED "ded36cf01a5547829b18395ff8df2196"
#define MID_STALE_PRIMARY     "d775722cd8e14370afeae64124287aa9"
#define MID_PRIMARY_CONFLICT  "0b11e79c89694bf090eb2feb4eccc48a"
#define MID_BROKER_CONNECTED  "cc4e3ac90cd94de2a4b78de1b4f03840"
#define MID_BROKER_LOST       "680e787066fe4ef696372bf6d086b2bf"
#define MID_NOTIFY_ACCEPTED   "37e50e3188e74df3b5cb1cf22f7f44aa"
#define MID_NOTIFY_REJECTED   "3df29a54da1c49828e32990bcbad1b87"
#define MID_UPDATE_HELD       "8fae6a25aa5b4ea0a1f0e551ed67f379"
#define MID_UPDATE_APPLIED    "9c88fee5e86945daae2ee2da79934825"
#define MID_UPDATE_FAILED     "b3b8508b198c4f8b824068025961d91e"
#define MID_CONFIG_REJECTED   "7973658656e64425b0beaf0a576b2dce"

typedef enum LogTarget {
        LOG_TARGET_AUTO,
        LOG_TARGET_JOURNAL,
        LOG_TARGET_STDERR,
} LogTarget;

/* Structured fields of one log entry; unset members are omitted.
 * epoch 0 means "no epoch". */
typedef struct LogFields {
        uint64_t epoch;         /* DSM_EPOCH */
        const char *primary_id; /* DSM_PRIMARY_ID */
        const char *node_id;    /* DSM_NODE_ID */
        const char *reason;     /* DSM_REASON */
        const char *version;    /* DSM_VERSION */
        const char *peer;       /* DSM_PEER */
} LogFields;

/* Chooses the target (auto: the journal when stderr is connected to it,
 * i.e. JOURNAL_STREAM matches, else stderr) and the maximum priority. */
void log_setup(LogTarget target, int max_priority);
/* True when entries go to the journal. */
bool log_is_journal(void);

/* Logs one entry. message_id and fields may be NULL. Returns -errno
 * reduced to a useful value: always negative when err != 0, so that
 * `return log_error_errno(r, ...)` reads naturally. */
int log_struct(int priority, int err, const char *message_id, const LogFields *fields, const char *fmt, ...)
        _printf_(5, 6);
int log_structv(int priority, int err, const char *message_id, const LogFields *fields, const char *fmt,
                va_list ap) _printf_(5, 0);

#define log_full(prio, ...) log_struct((prio), 0, NULL, NULL, __VA_ARGS__)
#define log_debug(...)      log_full(LOG_DEBUG, __VA_ARGS__)
#define log_info(...)       log_full(LOG_INFO, __VA_ARGS__)
#define log_notice(...)     log_full(LOG_NOTICE, __VA_ARGS__)
#define log_warning(...)    log_full(LOG_WARNING, __VA_ARGS__)
#define log_error(...)      log_full(LOG_ERR, __VA_ARGS__)
/* Variants that append ": <strerror(-r)>" and return r (negative). */
#define log_warning_errno(r, ...) log_struct(LOG_WARNING, (r), NULL, NULL, __VA_ARGS__)
#define log_error_errno(r, ...)   log_struct(LOG_ERR, (r), NULL, NULL, __VA_ARGS__)
#define log_debug_errno(r, ...)   log_struct(LOG_DEBUG, (r), NULL, NULL, __VA_ARGS__)

/* Name of a syslog priority ("info"). */
const char *log_priority_to_string(int priority);
/* The priority of a log level name of the config's log_level: one of the
 * names above from LOG_ERR ("err") to LOG_DEBUG ("debug"); -EINVAL for
 * anything else. */
int log_level_from_string(const char *s);
