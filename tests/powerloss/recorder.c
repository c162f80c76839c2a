/*
 * LD_PRELOAD write recorder for power-loss tests.
 *
 * Every write that reaches one file (the store's image) is appended to a log
 * with its offset and bytes, and every call that makes that file durable is
 * logged as a sync record, in the order the calls returned. Replaying a
 * prefix of the log onto a copy of the file as it was before the run gives
 * the file as a power cut at that point could have left it.
 *
 * Environment:
 *   LCFS_RECORD_DEVICE  path of the file to watch (matched by st_dev and
 *                       st_ino, or st_rdev for a block device)
 *   LCFS_RECORD_LOG     path of the log, which records are appended to
 *
 * Log records, integers little-endian (see writelog.py, which reads them):
 *   'W' u64 offset, u32 length, bytes   data written
 *   'S' u8 cause                        fsync, fdatasync, O_DSYNC write, sync
 *   'T' u64 size                        ftruncate
 *   'Z' u64 offset, u64 length          range zeroed by fallocate
 *   'K' u32 length, bytes               mark from the workload (lcfs_recorder_mark)
 *   'U' u32 length, bytes               a call whose effect is not recorded
 *
 * Covered calls: write, writev, pwrite, pwrite64, pwritev, pwritev64,
 * pwritev2, pwritev64v2, ftruncate, ftruncate64, fallocate, fallocate64,
 * fsync, fdatasync, sync, syncfs. A shared writable mmap of the file, and
 * copy_file_range, sendfile and splice into it, are logged as 'U' so the
 * test can reject the run. msync is not wrapped: it can only flush writes
 * made through such a mapping. posix_fallocate is not wrapped either
 * because it never changes bytes already in the file. Calls that glibc
 * makes internally (stdio's buffered writes) bypass the PLT and are not
 * seen. The test's full-replay comparison catches any such gap.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { SYNC_FSYNC = 1, SYNC_FDATASYNC = 2, SYNC_DSYNC_WRITE = 3, SYNC_ALL = 4 };

static pthread_mutex_t lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static int log_fd = -1;
static const char *device_path;
static int have_device;
static dev_t device_dev;
static ino_t device_ino;
static dev_t device_rdev;
static int device_is_block;

/* Log output goes straight to the kernel so that it never re-enters the wrappers. */
static void log_bytes(const struct iovec *iov, int count)
{
    size_t total = 0;
    for (int i = 0; i < count; i++)
        total += iov[i].iov_len;
    /* One writev per record keeps records whole when several processes append. */
    ssize_t done = syscall(SYS_writev, log_fd, iov, count);
    if (done != (ssize_t)total)
        abort();
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void log_write(uint64_t offset, const struct iovec *iov, int count, size_t length)
{
    unsigned char head[13];
    struct iovec out[IOV_MAX];
    unsigned char *gathered = NULL;
    int n = 1;
    size_t left = length;

    head[0] = 'W';
    put_u64(head + 1, offset);
    put_u32(head + 9, (uint32_t)length);
    out[0].iov_base = head;
    out[0].iov_len = sizeof head;
    if (count >= IOV_MAX) {
        /* No room for the header beside the caller's vectors: copy them into one buffer. */
        gathered = malloc(length);
        if (gathered == NULL)
            abort();
        size_t done = 0;
        for (int i = 0; i < count && left > 0; i++) {
            size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
            memcpy(gathered + done, iov[i].iov_base, take);
            done += take;
            left -= take;
        }
        out[1].iov_base = gathered;
        out[1].iov_len = length;
        n = 2;
    } else {
        for (int i = 0; i < count && left > 0; i++) {
            size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
            out[n].iov_base = iov[i].iov_base;
            out[n].iov_len = take;
            left -= take;
            n++;
        }
    }
    log_bytes(out, n);
    free(gathered);
}

static void log_sync(int cause)
{
    unsigned char rec[2] = {'S', (unsigned char)cause};
    struct iovec out = {rec, sizeof rec};
    log_bytes(&out, 1);
}

static void log_u64s(char kind, uint64_t a, uint64_t b, int count)
{
    unsigned char rec[17];
    struct iovec out = {rec, 1 + 8 * (size_t)count};
    rec[0] = (unsigned char)kind;
    put_u64(rec + 1, a);
    put_u64(rec + 9, b);
    log_bytes(&out, 1);
}

static void log_text(char kind, const char *text)
{
    unsigned char head[5];
    size_t length = strlen(text);
    struct iovec out[2] = {{head, sizeof head}, {(void *)text, length}};
    head[0] = (unsigned char)kind;
    put_u32(head + 1, (uint32_t)length);
    log_bytes(out, 2);
}

__attribute__((constructor)) static void recorder_init(void)
{
    const char *log_path = getenv("LCFS_RECORD_LOG");
    device_path = getenv("LCFS_RECORD_DEVICE");
    if (log_path == NULL || device_path == NULL)
        return;
    log_fd = (int)syscall(SYS_openat, AT_FDCWD, log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (log_fd < 0)
        abort();
}

/* Stat the watched path on first use, so that it may be created after start-up. */
static int find_device(void)
{
    struct stat st;
    if (have_device)
        return 1;
    if (device_path == NULL || stat(device_path, &st) != 0)
        return 0;
    device_dev = st.st_dev;
    device_ino = st.st_ino;
    device_is_block = S_ISBLK(st.st_mode);
    device_rdev = st.st_rdev;
    have_device = 1;
    return 1;
}

static int is_device(int fd)
{
    struct stat st;
    int saved = errno;
    int match = 0;
    if (log_fd < 0 || fd < 0 || fd == log_fd)
        return 0;
    if (find_device() && fstat(fd, &st) == 0) {
        if (device_is_block)
            match = S_ISBLK(st.st_mode) && st.st_rdev == device_rdev;
        else
            match = st.st_dev == device_dev && st.st_ino == device_ino;
    }
    errno = saved;
    return match;
}

static int is_dsync(int fd)
{
    int saved = errno;
    int flags = fcntl(fd, F_GETFL);
    errno = saved;
    return flags >= 0 && (flags & O_DSYNC);
}

#define REAL(name)                                                \
    static __typeof__(name) *real_##name;                          \
    if (real_##name == NULL)                                       \
        real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name);

/* The position of a write without an offset, read before the call. */
static off_t position(int fd)
{
    int saved = errno;
    off_t pos = (off_t)syscall(SYS_lseek, fd, 0, SEEK_CUR);
    errno = saved;
    return pos;
}

static void after_write(int fd, uint64_t offset, const struct iovec *iov, int count, ssize_t done,
                        int sync_flags)
{
    int saved = errno;
    if (done > 0) {
        log_write(offset, iov, count, (size_t)done);
        if (sync_flags || is_dsync(fd))
            log_sync(SYNC_DSYNC_WRITE);
    }
    errno = saved;
}

ssize_t write(int fd, const void *buf, size_t count)
{
    REAL(write);
    if (!is_device(fd))
        return real_write(fd, buf, count);
    pthread_mutex_lock(&lock);
    off_t pos = position(fd);
    ssize_t done = real_write(fd, buf, count);
    struct iovec iov = {(void *)buf, count};
    after_write(fd, (uint64_t)pos, &iov, 1, done, 0);
    pthread_mutex_unlock(&lock);
    return done;
}

ssize_t writev(int fd, const struct iovec *iov, int count)
{
    REAL(writev);
    if (!is_device(fd))
        return real_writev(fd, iov, count);
    pthread_mutex_lock(&lock);
    off_t pos = position(fd);
    ssize_t done = real_writev(fd, iov, count);
    after_write(fd, (uint64_t)pos, iov, count, done, 0);
    pthread_mutex_unlock(&lock);
    return done;
}

#define DEFINE_PWRITE(name, off_type)                                  \
    ssize_t name(int fd, const void *buf, size_t count, off_type offset) \
    {                                                                  \
        REAL(name);                                                    \
        if (!is_device(fd))                                            \
            return real_##name(fd, buf, count, offset);                \
        pthread_mutex_lock(&lock);                                     \
        ssize_t done = real_##name(fd, buf, count, offset);            \
        struct iovec iov = {(void *)buf, count};                       \
        after_write(fd, (uint64_t)offset, &iov, 1, done, 0);           \
        pthread_mutex_unlock(&lock);                                   \
        return done;                                                   \
    }

DEFINE_PWRITE(pwrite, off_t)
DEFINE_PWRITE(pwrite64, off64_t)

#define DEFINE_PWRITEV(name, off_type)                                          \
    ssize_t name(int fd, const struct iovec *iov, int count, off_type offset)    \
    {                                                                           \
        REAL(name);                                                             \
        if (!is_device(fd))                                                     \
            return real_##name(fd, iov, count, offset);                         \
        pthread_mutex_lock(&lock);                                              \
        ssize_t done = real_##name(fd, iov, count, offset);                     \
        after_write(fd, (uint64_t)offset, iov, count, done, 0);                 \
        pthread_mutex_unlock(&lock);                                            \
        return done;                                                            \
    }

DEFINE_PWRITEV(pwritev, off_t)
DEFINE_PWRITEV(pwritev64, off64_t)

/* An offset of -1 writes at the file position and advances it, as write does. */
#define DEFINE_PWRITEV2(name, off_type)                                                \
    ssize_t name(int fd, const struct iovec *iov, int count, off_type offset, int flags) \
    {                                                                                  \
        REAL(name);                                                                    \
        if (!is_device(fd))                                                            \
            return real_##name(fd, iov, count, offset, flags);                         \
        pthread_mutex_lock(&lock);                                                     \
        off_t pos = offset == -1 ? position(fd) : (off_t)offset;                       \
        ssize_t done = real_##name(fd, iov, count, offset, flags);                     \
        after_write(fd, (uint64_t)pos, iov, count, done, flags & (RWF_DSYNC | RWF_SYNC)); \
        pthread_mutex_unlock(&lock);                                                   \
        return done;                                                                   \
    }

DEFINE_PWRITEV2(pwritev2, off_t)
DEFINE_PWRITEV2(pwritev64v2, off64_t)

#define DEFINE_FTRUNCATE(name, off_type)                 \
    int name(int fd, off_type length)                     \
    {                                                     \
        REAL(name);                                       \
        if (!is_device(fd))                               \
            return real_##name(fd, length);               \
        pthread_mutex_lock(&lock);                        \
        int rc = real_##name(fd, length);                 \
        int saved = errno;                                \
        if (rc == 0)                                      \
            log_u64s('T', (uint64_t)length, 0, 1);        \
        errno = saved;                                    \
        pthread_mutex_unlock(&lock);                      \
        return rc;                                        \
    }

DEFINE_FTRUNCATE(ftruncate, off_t)
DEFINE_FTRUNCATE(ftruncate64, off64_t)

/* Only hole punching and zeroing change what the file reads as. */
static void after_fallocate(int rc, int mode, uint64_t offset, uint64_t length)
{
    int saved = errno;
    if (rc == 0 && (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)))
        log_u64s('Z', offset, length, 2);
    errno = saved;
}

#define DEFINE_FALLOCATE(name, off_type)                                  \
    int name(int fd, int mode, off_type offset, off_type length)          \
    {                                                                     \
        REAL(name);                                                       \
        if (!is_device(fd))                                               \
            return real_##name(fd, mode, offset, length);                 \
        pthread_mutex_lock(&lock);                                        \
        int rc = real_##name(fd, mode, offset, length);                   \
        after_fallocate(rc, mode, (uint64_t)offset, (uint64_t)length);    \
        pthread_mutex_unlock(&lock);                                      \
        return rc;                                                        \
    }

DEFINE_FALLOCATE(fallocate, off_t)
DEFINE_FALLOCATE(fallocate64, off64_t)

#define DEFINE_SYNC(name, cause)        \
    int name(int fd)                    \
    {                                   \
        REAL(name);                     \
        if (!is_device(fd))             \
            return real_##name(fd);     \
        pthread_mutex_lock(&lock);      \
        int rc = real_##name(fd);       \
        int saved = errno;              \
        if (rc == 0)                    \
            log_sync(cause);            \
        errno = saved;                  \
        pthread_mutex_unlock(&lock);    \
        return rc;                      \
    }

DEFINE_SYNC(fsync, SYNC_FSYNC)
DEFINE_SYNC(fdatasync, SYNC_FDATASYNC)

void sync(void)
{
    REAL(sync);
    pthread_mutex_lock(&lock);
    real_sync();
    if (log_fd >= 0)
        log_sync(SYNC_ALL);
    pthread_mutex_unlock(&lock);
}

int syncfs(int fd)
{
    REAL(syncfs);
    pthread_mutex_lock(&lock);
    int rc = real_syncfs(fd);
    int saved = errno;
    struct stat st;
    if (rc == 0 && log_fd >= 0 && find_device() && fstat(fd, &st) == 0 && st.st_dev == device_dev)
        log_sync(SYNC_ALL);
    errno = saved;
    pthread_mutex_unlock(&lock);
    return rc;
}

static void unsupported(const char *call)
{
    int saved = errno;
    pthread_mutex_lock(&lock);
    log_text('U', call);
    pthread_mutex_unlock(&lock);
    errno = saved;
}

#define CHECK_MMAP(name, off_type)                                                     \
    void *name(void *addr, size_t length, int prot, int flags, int fd, off_type offset) \
    {                                                                                  \
        REAL(name);                                                                    \
        if ((prot & PROT_WRITE) && (flags & MAP_SHARED) && is_device(fd))              \
            unsupported(#name " of the device with PROT_WRITE and MAP_SHARED");        \
        return real_##name(addr, length, prot, flags, fd, offset);                     \
    }

CHECK_MMAP(mmap, off_t)
CHECK_MMAP(mmap64, off64_t)

ssize_t copy_file_range(int fd_in, off64_t *off_in, int fd_out, off64_t *off_out, size_t length,
                        unsigned int flags)
{
    REAL(copy_file_range);
    if (is_device(fd_out))
        unsupported("copy_file_range into the device");
    return real_copy_file_range(fd_in, off_in, fd_out, off_out, length, flags);
}

ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)
{
    REAL(sendfile);
    if (is_device(out_fd))
        unsupported("sendfile into the device");
    return real_sendfile(out_fd, in_fd, offset, count);
}

ssize_t sendfile64(int out_fd, int in_fd, off64_t *offset, size_t count)
{
    REAL(sendfile64);
    if (is_device(out_fd))
        unsupported("sendfile64 into the device");
    return real_sendfile64(out_fd, in_fd, offset, count);
}

ssize_t splice(int fd_in, off64_t *off_in, int fd_out, off64_t *off_out, size_t length,
               unsigned int flags)
{
    REAL(splice);
    if (is_device(fd_out))
        unsupported("splice into the device");
    return real_splice(fd_in, off_in, fd_out, off_out, length, flags);
}

/* Called by the workload through ctypes to label a point in the log. */
void lcfs_recorder_mark(const char *label)
{
    if (log_fd < 0)
        return;
    pthread_mutex_lock(&lock);
    log_text('K', label);
    pthread_mutex_unlock(&lock);
}
