/* Crash-safe replacement of small files. See atomic_file.h. */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>

#include "atomic_file.h"
#include "macro.h"

#define TMP_MARK       ".tmp-"
#define TMP_SUFFIX_LEN 6
#define TMP_ATTEMPTS   100

/* Splits path into its directory (malloc'd, "." when there is none) and
 * a pointer to its last component inside path. */
static int split_path(const char *path, char **ret_dir, const char **ret_base) {
        const char *slash, *base;
        char *dir;

        if (!path || !*path)
                return -EINVAL;
        slash = strrchr(path, '/');
        base = slash ? slash + 1 : path;
        if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
                return -EISDIR;
        if (!slash)
                dir = strdup(".");
        else if (slash == path)
                dir = strdup("/");
        else
                dir = strndup(path, (size_t) (slash - path));
        if (!dir)
                return -ENOMEM;
        *ret_dir = dir;
        *ret_base = base;
        return 0;
}

static int open_dir(const char *dir) {
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        return fd < 0 ? negative_errno() : fd;
}

/* The directory of path, opened; *ret_base points into path. */
static int open_parent(const char *path, char **ret_dir, const char **ret_base) {
        int r = split_path(path, ret_dir, ret_base);

        return r < 0 ? r : open_dir(*ret_dir);
}

/* Random suffix characters; getrandom() may fail early at boot, and the
 * name only needs to be unlikely to collide (O_EXCL catches the rest). */
static void random_suffix(char *buf, size_t n) {
        static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        static uint64_t counter;
        uint8_t rnd[16];
        struct timespec ts;

        if (getrandom(rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t) sizeof(rnd)) {
                uint64_t x;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                x = ((uint64_t) ts.tv_nsec << 20) ^ (uint64_t) ts.tv_sec ^ ((uint64_t) getpid() << 40) ^
                    (++counter * 0x9e3779b97f4a7c15ULL);
                for (size_t i = 0; i < sizeof(rnd); i++, x = x * 6364136223846793005ULL + 1)
                        rnd[i] = (uint8_t) (x >> 56);
        }
        for (size_t i = 0; i < n; i++)
                buf[i] = alphabet[rnd[i % sizeof(rnd)] % (sizeof(alphabet) - 1)];
        buf[n] = 0;
}

/* Creates ".<base>.tmp-XXXXXX" in dfd; writes its name into tmp. */
static int create_temp(int dfd, const char *base, char *tmp, size_t size) {
        char suffix[TMP_SUFFIX_LEN + 1];

        for (int i = 0; i < TMP_ATTEMPTS; i++) {
                int fd, n;

                random_suffix(suffix, TMP_SUFFIX_LEN);
                n = snprintf(tmp, size, ".%s" TMP_MARK "%s", base, suffix);
                if (n < 0 || (size_t) n >= size || n > NAME_MAX)
                        return -ENAMETOOLONG;
                fd = openat(dfd, tmp, O_CREAT | O_EXCL | O_CLOEXEC | O_WRONLY | O_NOFOLLOW, 0600);
                if (fd >= 0)
                        return fd;
                if (errno != EEXIST)
                        return negative_errno();
        }
        return -EEXIST;
}

static int write_all(int fd, const void *data, size_t len) {
        const uint8_t *p = data;

        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return negative_errno();
                }
                if (n == 0)
                        return -EIO;
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

/* Everything that happens to the temporary file before the rename. close()
 * is checked too: on some file systems it is where a write error shows. */
static int fill_temp(int fd, const void *data, size_t len, mode_t mode) {
        int r;

        r = write_all(fd, data, len);
        if (r >= 0 && fchmod(fd, mode & 07777) < 0)
                r = negative_errno();
        if (r >= 0 && fsync(fd) < 0)
                r = negative_errno();
        if (close(fd) < 0 && r >= 0 && errno != EINTR)
                r = negative_errno();
        return r;
}

int atomic_file_write(const char *path, const void *data, size_t len, mode_t mode) {
        _cleanup_(freep) char *dir = NULL;
        _cleanup_(closep) int dfd = -1;
        char tmp[NAME_MAX + 2];
        const char *base;
        int fd, r;

        if (!data && len > 0)
                return -EINVAL;
        dfd = open_parent(path, &dir, &base);
        if (dfd < 0)
                return dfd;
        fd = create_temp(dfd, base, tmp, sizeof(tmp));
        if (fd < 0)
                return fd;
        r = fill_temp(fd, data, len, mode);
        if (r >= 0 && renameat(dfd, tmp, dfd, base) < 0)
                r = negative_errno();
        if (r < 0) {
                (void) unlinkat(dfd, tmp, 0);
                return r;
        }
        /* The rename is only durable once the directory is on disk. It has
         * happened, though: readers see the new file, so this failure is
         * reported apart from the ones that leave the old file in place. */
        if (fsync(dfd) < 0)
                return -negative_errno();
        return 0;
}

static bool is_temp_of(const char *name, const char *base) {
        size_t blen = strlen(base);

        return name[0] == '.' && strncmp(name + 1, base, blen) == 0 &&
               strncmp(name + 1 + blen, TMP_MARK, strlen(TMP_MARK)) == 0;
}

int atomic_file_sweep(const char *path) {
        _cleanup_(freep) char *dir = NULL;
        const char *base;
        struct dirent *de;
        DIR *d;
        int dfd, r = 0, removed = 0;

        dfd = open_parent(path, &dir, &base);
        if (dfd < 0)
                return dfd;
        d = fdopendir(dfd);
        if (!d) {
                r = negative_errno();
                close(dfd);
                return r;
        }
        while ((errno = 0, de = readdir(d))) {
                if (!is_temp_of(de->d_name, base))
                        continue;
                if (unlinkat(dirfd(d), de->d_name, 0) < 0) {
                        if (errno == ENOENT)
                                continue;
                        r = negative_errno();
                        break;
                }
                removed++;
        }
        if (r >= 0 && errno != 0)
                r = negative_errno();
        closedir(d);
        return r < 0 ? r : removed;
}

int read_file_full(const char *path, size_t max, char **ret, size_t *ret_len) {
        _cleanup_(closep) int fd = -1;
        _cleanup_(freep) char *buf = NULL;
        size_t len = 0;
        struct stat st;

        if (!path || !ret || max >= SIZE_MAX - 1)
                return -EINVAL;
        /* O_NONBLOCK: the loop reads such files; a FIFO must not stall it. */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return negative_errno();
        if (fstat(fd, &st) < 0)
                return negative_errno();
        if (S_ISDIR(st.st_mode))
                return -EISDIR;
        if (!S_ISREG(st.st_mode))
                return -EINVAL;
        if (S_ISREG(st.st_mode) && (uint64_t) st.st_size > max)
                return -EFBIG;
        /* One byte more than allowed, to notice a file that grew. */
        buf = malloc(max + 2);
        if (!buf)
                return -ENOMEM;
        while (len <= max) {
                ssize_t n = read(fd, buf + len, max + 1 - len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return negative_errno();
                }
                if (n == 0)
                        break;
                len += (size_t) n;
        }
        if (len > max)
                return -EFBIG;
        buf[len] = 0;
        *ret = buf;
        buf = NULL;
        if (ret_len)
                *ret_len = len;
        return 0;
}
