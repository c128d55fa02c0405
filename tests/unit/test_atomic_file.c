/* atomic_file: contents, modes under any umask, the sweep, and real
 * failures (a full tmpfs, a read-only mount, an unprivileged writer). */
#include <dirent.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <cmocka.h>

#include "atomic_file.h"
#include "macro.h"

static char tmpdir[64];

/* This definition replaces libc's fsync() for atomic_file.o (an object
 * linked into the program wins over the shared library), so a test can
 * make the fsync of a directory fail the way a disk error would. */
static bool fail_dir_fsync;

int fsync(int fd) {
        struct stat st;

        if (fail_dir_fsync && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
                errno = EIO;
                return -1;
        }
        return (int) syscall(SYS_fsync, fd);
}

static int setup(void **state) {
        strscpy(tmpdir, sizeof(tmpdir), "/tmp/test-atomic-XXXXXX");
        assert_non_null(mkdtemp(tmpdir));
        fail_dir_fsync = false;
        return 0;
}

static int teardown(void **state) {
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
        assert_int_equal(system(cmd), 0);
        return 0;
}

static void path_in(char *buf, size_t size, const char *name) {
        snprintf(buf, size, "%s/%s", tmpdir, name);
}

static void assert_content(const char *path, const char *want) {
        _cleanup_(freep) char *got = NULL;
        size_t len;

        assert_int_equal(read_file_full(path, 1 << 20, &got, &len), 0);
        assert_int_equal(len, strlen(want));
        assert_string_equal(got, want);
}

/* Number of directory entries whose name starts with '.' (temp files). */
static int count_hidden(const char *dir) {
        DIR *d = opendir(dir);
        struct dirent *de;
        int n = 0;

        assert_non_null(d);
        while ((de = readdir(d)))
                if (de->d_name[0] == '.' && strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
                        n++;
        closedir(d);
        return n;
}

static mode_t file_mode(const char *path) {
        struct stat st;
        assert_int_equal(stat(path, &st), 0);
        return st.st_mode & 07777;
}

static void test_write_and_replace(void **state) {
        char p[128];

        path_in(p, sizeof(p), "a.ini");
        assert_int_equal(atomic_file_write(p, "one\n", 4, 0640), 0);
        assert_content(p, "one\n");
        assert_int_equal(atomic_file_write(p, "two two\n", 8, 0640), 0);
        assert_content(p, "two two\n");
        assert_int_equal(atomic_file_write(p, "", 0, 0640), 0);
        assert_content(p, "");
        assert_int_equal(count_hidden(tmpdir), 0);
}

static void test_mode_ignores_umask(void **state) {
        char p[128];
        mode_t old = umask(077);

        path_in(p, sizeof(p), "m");
        assert_int_equal(atomic_file_write(p, "x", 1, 0644), 0);
        assert_int_equal(file_mode(p), 0644);
        umask(0);
        assert_int_equal(atomic_file_write(p, "x", 1, 0600), 0);
        assert_int_equal(file_mode(p), 0600);
        assert_int_equal(atomic_file_write(p, "x", 1, 0640), 0);
        assert_int_equal(file_mode(p), 0640);
        umask(old);
}

static void test_errors(void **state) {
        char p[128];
        _cleanup_(freep) char *buf = NULL;

        path_in(p, sizeof(p), "missing-dir/file");
        assert_int_equal(atomic_file_write(p, "x", 1, 0600), -ENOENT);
        path_in(p, sizeof(p), "");
        assert_int_equal(atomic_file_write(p, "x", 1, 0600), -EISDIR);
        assert_int_equal(atomic_file_write("", "x", 1, 0600), -EINVAL);

        path_in(p, sizeof(p), "nope");
        assert_int_equal(read_file_full(p, 10, &buf, NULL), -ENOENT);
        assert_int_equal(atomic_file_write(p, "0123456789A", 11, 0600), 0);
        assert_int_equal(read_file_full(p, 10, &buf, NULL), -EFBIG);
        assert_null(buf);
        assert_int_equal(read_file_full(tmpdir, 10, &buf, NULL), -EISDIR);
}

static void touch(const char *name) {
        char p[128];
        int fd;

        path_in(p, sizeof(p), name);
        fd = open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        close(fd);
}

static void test_sweep(void **state) {
        char p[128];

        touch("s.ini");
        touch(".s.ini.tmp-abc123");
        touch(".s.ini.tmp-ZZZZZZ");
        touch(".s.inix.tmp-abc123"); /* another file's temp: kept */
        touch(".other.tmp-abc123");
        touch(".s.ini.on_change-pending"); /* the settings writer's marker: kept */
        path_in(p, sizeof(p), "s.ini");
        assert_int_equal(atomic_file_sweep(p), 2);
        assert_int_equal(atomic_file_sweep(p), 0);
        assert_int_equal(count_hidden(tmpdir), 3);
        assert_int_equal(access(p, F_OK), 0);
        path_in(p, sizeof(p), "nodir/s.ini");
        assert_int_equal(atomic_file_sweep(p), -ENOENT);
}

/* The rename happened but the directory fsync failed: a positive errno,
 * the new content in place, no temporary file left. */
static void test_dir_fsync_failure(void **state) {
        char p[128];

        path_in(p, sizeof(p), "d.ini");
        assert_int_equal(atomic_file_write(p, "old\n", 4, 0640), 0);
        fail_dir_fsync = true;
        assert_int_equal(atomic_file_write(p, "new\n", 4, 0640), EIO);
        fail_dir_fsync = false;
        assert_content(p, "new\n");
        assert_int_equal(file_mode(p), 0640);
        assert_int_equal(count_hidden(tmpdir), 0);
        /* A failure before the rename is still negative, old file kept. */
        path_in(p, sizeof(p), "missing-dir/file");
        fail_dir_fsync = true;
        assert_int_equal(atomic_file_write(p, "x", 1, 0600), -ENOENT);
        fail_dir_fsync = false;
}

/* Mounts a 64 KiB tmpfs on tmpdir/mnt; false (and skip) when impossible. */
static bool mount_small_tmpfs(char *mnt, size_t size) {
        path_in(mnt, size, "mnt");
        assert_int_equal(mkdir(mnt, 0755), 0);
        if (geteuid() != 0 || mount("tmpfs", mnt, "tmpfs", 0, "size=64k,mode=0755") < 0)
                return false;
        return true;
}

static void test_enospc(void **state) {
        char mnt[128], p[160], filler[160], big[32768];
        int fd;

        if (!mount_small_tmpfs(mnt, sizeof(mnt))) {
                skip();
                return;
        }
        snprintf(p, sizeof(p), "%s/settings.ini", mnt);
        assert_int_equal(atomic_file_write(p, "old\n", 4, 0640), 0);

        /* Fill the file system to the last block. */
        snprintf(filler, sizeof(filler), "%s/filler", mnt);
        fd = open(filler, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        memset(big, 'f', sizeof(big));
        for (;;) {
                ssize_t n = write(fd, big, 4096);
                if (n < 0) {
                        assert_int_equal(errno, ENOSPC);
                        break;
                }
        }
        close(fd);

        memset(big, 'n', sizeof(big));
        assert_int_equal(atomic_file_write(p, big, sizeof(big), 0640), -ENOSPC);
        assert_content(p, "old\n");
        assert_int_equal(count_hidden(mnt), 0);

        /* Space again: the write goes through. */
        assert_int_equal(unlink(filler), 0);
        assert_int_equal(atomic_file_write(p, "new\n", 4, 0640), 0);
        assert_content(p, "new\n");

        /* Read-only: -EROFS, old content kept. */
        assert_int_equal(mount(NULL, mnt, NULL, MS_REMOUNT | MS_RDONLY, NULL), 0);
        assert_int_equal(atomic_file_write(p, "ro\n", 3, 0640), -EROFS);
        assert_content(p, "new\n");
        assert_int_equal(count_hidden(mnt), 0);
        assert_int_equal(umount(mnt), 0);
}

/* An unprivileged writer in a directory it may not write: -EACCES. */
static void test_eacces(void **state) {
        char p[128];
        pid_t pid;
        int status;

        if (geteuid() != 0) {
                skip();
                return;
        }
        assert_int_equal(chmod(tmpdir, 0755), 0);
        path_in(p, sizeof(p), "root-owned.ini");
        assert_int_equal(atomic_file_write(p, "old\n", 4, 0644), 0);

        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                if (setresgid(65534, 65534, 65534) < 0 || setresuid(65534, 65534, 65534) < 0)
                        _exit(2);
                _exit(atomic_file_write(p, "new\n", 4, 0644) == -EACCES ? 0 : 1);
        }
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
        assert_content(p, "old\n");
        assert_int_equal(count_hidden(tmpdir), 0);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_write_and_replace, setup, teardown),
                cmocka_unit_test_setup_teardown(test_mode_ignores_umask, setup, teardown),
                cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
                cmocka_unit_test_setup_teardown(test_sweep, setup, teardown),
                cmocka_unit_test_setup_teardown(test_dir_fsync_failure, setup, teardown),
                cmocka_unit_test_setup_teardown(test_enospc, setup, teardown),
                cmocka_unit_test_setup_teardown(test_eacces, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
