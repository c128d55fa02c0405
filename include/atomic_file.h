/* Crash-safe file replacement: a temporary file in the same directory,
 * fsync, explicit fchmod, rename, fsync of the directory. A reader sees
 * the old file or the new one, never a mix, across a crash at any instant.
 * Temporary files are named ".<basename>.tmp-XXXXXX" so a sweep at start
 * can remove the leftovers of a crash. Pure I/O: no logging. */
#pragma once

#include <stddef.h>
#include <sys/types.h>

/* Replaces path with data. mode is applied with fchmod (a process umask
 * cannot change it). Returns:
 *   0    the new file is in place and durable;
 *   < 0  a negative errno (-ENOSPC, -EACCES, ...): the old file is
 *        untouched and no temporary file is left;
 *   > 0  a positive errno (EIO, ...): the rename succeeded, so readers see
 *        the new file, but the fsync of the directory failed, so the
 *        replacement may not survive a crash or power loss. A caller that
 *        acts on the new content (runs a hook) must treat this as written;
 *        one that needs durability may treat it as a failure. */
int atomic_file_write(const char *path, const void *data, size_t len, mode_t mode);

/* Removes leftover temporary files of path from an earlier crash.
 * Returns the number removed, or a negative errno. */
int atomic_file_sweep(const char *path);

/* Reads a whole small file (at most max bytes) into a NUL-terminated
 * malloc'd buffer. -EFBIG when larger. */
int read_file_full(const char *path, size_t max, char **ret, size_t *ret_len);
