/* Logging to the journal (structured) or to stderr (key=value lines).
 *
 * The journal gets PRIORITY, MESSAGE, MESSAGE_ID and the DSM_* fields of
 * contract section 9. On stderr one event is one line: the same fields as
 * key=value pairs, values quoted when they contain spaces, so that a test
 * or an operator can grep for MESSAGE_ID=... either way. */
#include "log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>
#include <time.h>

#define LOG_LINE_MAX 2048
#define FIELD_MAX    640 /* a field such as DSM_REASON holds a whole gate reason */

static bool use_journal;
static int max_priority = LOG_INFO;

static const char *const priority_names[] = {
        [LOG_EMERG] = "emerg",     [LOG_ALERT] = "alert",   [LOG_CRIT] = "crit", [LOG_ERR] = "err",
        [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice", [LOG_INFO] = "info", [LOG_DEBUG] = "debug",
};

const char *log_priority_to_string(int priority) {
        if (priority < 0 || priority > LOG_DEBUG)
                return "unknown";
        return priority_names[priority];
}

/* A threshold below err would hide errors, so only err to debug name one. */
int log_level_from_string(const char *s) {
        for (int i = LOG_ERR; s && i <= LOG_DEBUG; i++)
                if (strcmp(s, priority_names[i]) == 0)
                        return i;
        return -EINVAL;
}

/* stderr is connected to the journal when JOURNAL_STREAM names its device
 * and inode (systemd sets it for services). */
static bool stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return false;
        if (fstat(STDERR_FILENO, &st) < 0)
                return false;
        return (unsigned long long) st.st_dev == dev && (unsigned long long) st.st_ino == ino;
}

void log_setup(LogTarget target, int priority) {
        switch (target) {
        case LOG_TARGET_JOURNAL:
                use_journal = true;
                break;
        case LOG_TARGET_STDERR:
                use_journal = false;
                break;
        default:
                use_journal = stderr_is_journal();
        }
        max_priority = priority;
}

bool log_is_journal(void) {
        return use_journal;
}

/* Appends ` key=value` to buf. Values with spaces, quotes, '=' or control
 * characters are quoted, and control characters escaped, so one event is
 * always exactly one parseable line whatever a remote peer sent. */
static void append_field(char *buf, size_t size, size_t *pos, const char *key, const char *value) {
        bool quote = value[0] == 0;
        int n;

        for (const unsigned char *p = (const unsigned char *) value; *p && !quote; p++)
                quote = *p <= ' ' || *p == '"' || *p == '=' || *p == '\\' || *p == 0x7f;
        if (*pos >= size)
                return;
        n = snprintf(buf + *pos, size - *pos, "%s%s=%s", *pos > 0 ? " " : "", key, quote ? "\"" : "");
        if (n < 0)
                return;
        *pos += (size_t) n;
        for (const unsigned char *p = (const unsigned char *) value; *p && *pos + 6 < size; p++) {
                if (*p == '"' || *p == '\\') {
                        buf[(*pos)++] = '\\';
                        buf[(*pos)++] = (char) *p;
                } else if (*p < ' ' || *p == 0x7f)
                        *pos += (size_t) snprintf(buf + *pos, size - *pos, "\\x%02x", *p);
                else
                        buf[(*pos)++] = (char) *p;
        }
        if (quote && *pos + 1 < size)
                buf[(*pos)++] = '"';
        if (*pos >= size)
                *pos = size - 1;
        buf[*pos] = 0;
}

static void log_to_stderr(int priority, const char *message_id, const LogFields *f, const char *message) {
        char line[LOG_LINE_MAX + 512], num[32];
        struct timespec ts;
        struct tm tm;
        size_t pos = 0;

        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        pos = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
        pos += (size_t) snprintf(line + pos, sizeof(line) - pos, ".%03ldZ", ts.tv_nsec / 1000000);

        append_field(line, sizeof(line), &pos, "PRIORITY", log_priority_to_string(priority));
        if (message_id)
                append_field(line, sizeof(line), &pos, "MESSAGE_ID", message_id);
        if (f) {
                if (f->epoch > 0) {
                        snprintf(num, sizeof(num), "%" PRIu64, f->epoch);
                        append_field(line, sizeof(line), &pos, "DSM_EPOCH", num);
                }
                if (f->primary_id)
                        append_field(line, sizeof(line), &pos, "DSM_PRIMARY_ID", f->primary_id);
                if (f->node_id)
                        append_field(line, sizeof(line), &pos, "DSM_NODE_ID", f->node_id);
                if (f->reason)
                        append_field(line, sizeof(line), &pos, "DSM_REASON", f->reason);
                if (f->version)
                        append_field(line, sizeof(line), &pos, "DSM_VERSION", f->version);
                if (f->peer)
                        append_field(line, sizeof(line), &pos, "DSM_PEER", f->peer);
        }
        append_field(line, sizeof(line), &pos, "MESSAGE", message);
        if (pos + 1 < sizeof(line))
                line[pos++] = '\n';
        /* One write per line so concurrent writers never interleave mid-line. */
        (void) !write(STDERR_FILENO, line, pos);
}

/* One journal entry; each field in its own buffer, the message last. */
static void log_to_journal(int priority, const char *message_id, const LogFields *f, const char *message) {
        char fields[9][FIELD_MAX], msg[LOG_LINE_MAX + 16];
        struct iovec iov[ELEMENTSOF(fields) + 1];
        size_t n = 0;

#define ADD_FIELD(...)                                                                                      \
        do {                                                                                                \
                snprintf(fields[n], sizeof(fields[n]), __VA_ARGS__);                                        \
                iov[n] = (struct iovec){fields[n], strlen(fields[n])};                                      \
                n++;                                                                                        \
        } while (0)

        ADD_FIELD("PRIORITY=%d", priority);
        ADD_FIELD("SYSLOG_IDENTIFIER=%s", program_invocation_short_name);
        if (message_id)
                ADD_FIELD("MESSAGE_ID=%s", message_id);
        if (f && f->epoch > 0)
                ADD_FIELD("DSM_EPOCH=%" PRIu64, f->epoch);
        if (f && f->primary_id)
                ADD_FIELD("DSM_PRIMARY_ID=%s", f->primary_id);
        if (f && f->node_id)
                ADD_FIELD("DSM_NODE_ID=%s", f->node_id);
        if (f && f->reason)
                ADD_FIELD("DSM_REASON=%s", f->reason);
        if (f && f->version)
                ADD_FIELD("DSM_VERSION=%s", f->version);
        if (f && f->peer)
                ADD_FIELD("DSM_PEER=%s", f->peer);
#undef ADD_FIELD
        snprintf(msg, sizeof(msg), "MESSAGE=%s", message);
        iov[n++] = (struct iovec){msg, strlen(msg)};

        if (sd_journal_sendv(iov, (int) n) < 0)
                log_to_stderr(priority, message_id, f, message);
}

int log_structv(int priority, int err, const char *message_id, const LogFields *fields, const char *fmt,
                va_list ap) {
        char message[LOG_LINE_MAX];
        int saved_errno = errno;
        int r = err > 0 ? -err : err;

        if (priority > max_priority)
                goto out;

        vsnprintf(message, sizeof(message), fmt, ap);
        if (r < 0) {
                size_t len = strlen(message);
                snprintf(message + len, sizeof(message) - len, ": %s", strerror(-r));
        }

        if (use_journal)
                log_to_journal(priority, message_id, fields, message);
        else
                log_to_stderr(priority, message_id, fields, message);
out:
        errno = saved_errno;
        /* Always negative, so "return log_error_errno(r, ...)" propagates. */
        return r < 0 ? r : -EIO;
}

int log_struct(int priority, int err, const char *message_id, const LogFields *fields, const char *fmt,
               ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = log_structv(priority, err, message_id, fields, fmt, ap);
        va_end(ap);
        return r;
}
