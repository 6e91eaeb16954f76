/* ltoflow._native: the loops ltoflow runs once per file or record, in C.
 *
 * - read_whole_files: open, read, check and hash a run of whole small files with the GIL
 *   released (two threads), where the same loop in Python costs ~10 us a file on top of the
 *   system calls. It only takes the plain case: the moment a file is anything else (it will
 *   not open, reads short, changed since the scan, its path is not plain UTF-8), the call
 *   stops before it and returns what it did; the Python reader then handles that file with its
 *   own checks and error messages (SourceCursor.fill).
 * - list_dir: one directory of the scan, listed, lstat'ed, probed and sorted (scan.py).
 * - layout_fit, digit_total, json_strings_size: the plan's layout step and its sizer's sums.
 * - file_ids, iso_times, encode_files, encode_segments: catalog records, byte for byte what
 *   the Python encoder (orjson) writes.
 * - copy_single_segment_digests: file hashes of files of one segment.
 * - decode_records: catalog record lines back into records, as the Python decoder reads them.
 * - scan_records: a list's record lines checked without making records, some fields kept as
 *   columns (verify reads a catalog this way and makes records only of what it reports).
 * - check_segments, group_segments: verify's checks of the segments that lie whole in a
 *   chunk it read, and the segments put in container order.
 *
 * This module decides nothing: each function is a faster way to do what a Python loop does,
 * and tests/test_native.py checks that they agree. Build: an optional extension (setup.py);
 * without it ltoflow runs the Python loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <linux/capability.h>

#include <openssl/evp.h>

#define SHA256_LEN 32
/* Files per call at most: the caller loops; this bounds the call's hex buffer (512 KiB). */
#define MAX_RUN 8192
/* Runs of at least this many files are read by two threads. */
#define SPLIT_MIN 64

static EVP_MD *sha256_md, *sha1_md;
static PyObject *empty_tuple;
static const int FILE_FLAGS = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK;
static const int DIR_FLAGS = O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;

/* The directory `dir` (NUL-terminated, relative, components split by '/') under root_fd,
 * opened O_PATH one component at a time with none followed if it is a symlink, as
 * paths.DirFds does; -1 with errno set otherwise. `dir` is changed in place and restored. */
static int open_dir_beneath(int root_fd, char *dir)
{
    int fd = root_fd;
    char *name = dir;
    for (;;) {
        char *slash = strchr(name, '/');
        int next;
        if (slash != NULL)
            *slash = '\0';
        next = (*name == '\0' || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
                   ? (errno = EINVAL, -1)
                   : openat(fd, name, DIR_FLAGS);
        if (slash != NULL)
            *slash = '/';
        if (fd != root_fd)
            close(fd);
        if (next < 0)
            return -1;
        fd = next;
        if (slash == NULL)
            return fd;
        name = slash + 1;
    }
}

/* Read exactly `size` bytes at offset 0; 0 on success, -1 on an error or a short file. */
static int read_all(int fd, unsigned char *dst, int64_t size)
{
    int64_t done = 0;
    while (done < size) {
        ssize_t n = pread(fd, dst + done, (size_t)(size - done), (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        done += n;
    }
    return 0;
}

static const char HEX[] = "0123456789abcdef";

/* A SHA-256 as 64 lowercase hex digits (no terminating NUL). */
static void to_hex(const unsigned char *raw, char *hex)
{
    for (int b = 0; b < SHA256_LEN; b++) {
        hex[2 * b] = HEX[raw[b] >> 4];
        hex[2 * b + 1] = HEX[raw[b] & 15];
    }
}

/* Blocks of this many files are what the threads take in turn, so that both read near each
 * other in path order (a disk with heads seeks less than for two far-apart halves). */
#define BLOCK 16
#define MAX_BLOCKS (MAX_RUN / BLOCK)

typedef struct {
    /* inputs, all borrowed from Py_buffers */
    int root_fd;
    const unsigned char *paths; /* every file's path relative to the root, end to end */
    const uint64_t *path_ends;  /* path i is paths[path_ends[i-1] : path_ends[i]] */
    Py_ssize_t paths_len;
    const int64_t *seg_file, *seg_length, *seg_container, *file_starts, *sizes, *mtimes;
    Py_ssize_t n_files;
    Py_ssize_t seg, seg_end;    /* the segments to go through, in order */
    Py_ssize_t stop_file;       /* the first file not to take (the caller's exceptions) */
    int64_t container;          /* only segments of this container; -1: any */
    unsigned char *buf;
    Py_ssize_t pos, cap;
    /* the run `takes` accepts: n segments from seg on, in blocks of BLOCK */
    Py_ssize_t n;
    int blocks;
    Py_ssize_t block_pos[MAX_BLOCKS]; /* where each block's first file goes in buf */
    Py_ssize_t block_done[MAX_BLOCKS];
    int next_block, stop_block;       /* shared by the threads (atomics) */
    char *hex;                        /* 64 hex characters per segment */
    Py_ssize_t done;                  /* output: files done from seg on, in order */
} Run;

/* Whether segment k is a whole file that this loop may take, and fits. */
static int takes(const Run *r, Py_ssize_t k, Py_ssize_t pos)
{
    int64_t f = r->seg_file[k];
    uint64_t start, end;
    if (f < 0 || f >= r->n_files || f >= r->stop_file)
        return 0;
    if (r->file_starts[f + 1] - r->file_starts[f] != 1)
        return 0;
    if (r->container >= 0 && r->seg_container[k] != r->container)
        return 0;
    start = f ? r->path_ends[f - 1] : 0;
    end = r->path_ends[f];
    if (end <= start || end > (uint64_t)r->paths_len || end - start >= PATH_MAX)
        return 0;
    return r->seg_length[k] >= 0 && r->seg_length[k] <= r->cap - pos
           && r->seg_length[k] == r->sizes[f];
}

/* One thread's state: its last directory, kept open, and its hash context. */
typedef struct {
    char path[PATH_MAX];
    char dir[PATH_MAX];
    size_t dir_len;
    int dir_fd;
    EVP_MD_CTX *ctx;
} Reader;

/* Whether a file's stat is the scan's: a regular file, still linked, of its size and mtime. */
static int as_scanned(const struct stat *st, int64_t size, int64_t mtime_ns)
{
    /* seconds and nanoseconds apart: st_mtim * 1e9 may not fit 64 bits */
    int64_t sec = mtime_ns / 1000000000, nsec = mtime_ns % 1000000000;
    if (nsec < 0) {
        sec -= 1;
        nsec += 1000000000;
    }
    return S_ISREG(st->st_mode) && st->st_nlink > 0 && st->st_size == size
           && (int64_t)st->st_mtim.tv_sec == sec && (int64_t)st->st_mtim.tv_nsec == nsec;
}

/* Read, check and hash segments [first, end) in order, the first at `pos`; the count done
 * before the first that fails any check. */
static Py_ssize_t read_files(const Run *r, Reader *rd, Py_ssize_t first, Py_ssize_t end,
                             Py_ssize_t pos, char *hex)
{
    unsigned char digest[SHA256_LEN];
    unsigned int digest_len = 0;
    Py_ssize_t done = 0;

    for (Py_ssize_t k = first; k < end; k++) {
        int64_t f = r->seg_file[k];
        int64_t length = r->seg_length[k];
        uint64_t start = f ? r->path_ends[f - 1] : 0;
        size_t len = (size_t)(r->path_ends[f] - start); /* < PATH_MAX: see takes() */
        const char *slash;
        size_t head;
        int at, fd, ok;
        struct stat before, st;

        memcpy(rd->path, r->paths + start, len);
        rd->path[len] = '\0';
        if (memchr(rd->path, '\0', len) != NULL)
            break;
        slash = memrchr(rd->path, '/', len);
        head = slash ? (size_t)(slash - rd->path) : 0;
        if (head == 0) {
            at = r->root_fd;
        } else {
            if (head != rd->dir_len || memcmp(rd->dir, rd->path, head) != 0) {
                if (rd->dir_fd >= 0)
                    close(rd->dir_fd);
                memcpy(rd->dir, rd->path, head);
                rd->dir[head] = '\0';
                rd->dir_len = (size_t)-1;
                rd->dir_fd = open_dir_beneath(r->root_fd, rd->dir);
                if (rd->dir_fd < 0)
                    break;
                rd->dir_len = head;
            }
            at = rd->dir_fd;
        }
        fd = openat(at, slash ? slash + 1 : rd->path, FILE_FLAGS);
        if (fd < 0)
            break;
        /* Its change time as it is opened and once read: an in-place rewrite with the mtime
         * put back shows only there (the Python loop then reads it again, or says why not). */
        ok = fstat(fd, &before) == 0 && read_all(fd, r->buf + pos, length) == 0
             && fstat(fd, &st) == 0 && as_scanned(&st, r->sizes[f], r->mtimes[f])
             && st.st_ctim.tv_sec == before.st_ctim.tv_sec
             && st.st_ctim.tv_nsec == before.st_ctim.tv_nsec;
        close(fd);
        if (!ok)
            break;
        if (!EVP_DigestInit_ex(rd->ctx, sha256_md, NULL)
            || !EVP_DigestUpdate(rd->ctx, r->buf + pos, (size_t)length)
            || !EVP_DigestFinal_ex(rd->ctx, digest, &digest_len) || digest_len != SHA256_LEN)
            break;
        to_hex(digest, hex + 64 * done);
        pos += length;
        done++;
    }
    return done;
}

/* A thread's share of the run: the next block not taken, until none is left or a block
 * before it failed. */
static void *read_blocks(void *arg)
{
    Run *r = arg;
    Reader rd;
    rd.dir_len = (size_t)-1;
    rd.dir_fd = -1;
    rd.ctx = EVP_MD_CTX_new();
    if (rd.ctx == NULL)
        return NULL; /* the other thread takes every block; if neither can, none is done */
    for (;;) {
        int b = __atomic_fetch_add(&r->next_block, 1, __ATOMIC_RELAXED);
        Py_ssize_t first, end, done;
        int stop;
        if (b >= __atomic_load_n(&r->stop_block, __ATOMIC_RELAXED))
            break;
        first = r->seg + (Py_ssize_t)b * BLOCK;
        end = first + BLOCK < r->seg + r->n ? first + BLOCK : r->seg + r->n;
        done = read_files(r, &rd, first, end, r->block_pos[b],
                          r->hex + 64 * (Py_ssize_t)b * BLOCK);
        r->block_done[b] = done;
        if (done < end - first) { /* no block after this one counts: stop taking them */
            stop = __atomic_load_n(&r->stop_block, __ATOMIC_RELAXED);
            while (stop > b + 1 && !__atomic_compare_exchange_n(
                       &r->stop_block, &stop, b + 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
            break;
        }
    }
    if (rd.dir_fd >= 0)
        close(rd.dir_fd);
    EVP_MD_CTX_free(rd.ctx);
    return NULL;
}

/* The run `takes` accepts from seg on, and where each block of it goes in the buffer. */
static void find_run(Run *r)
{
    Py_ssize_t k = r->seg, pos = r->pos;
    while (k < r->seg_end && takes(r, k, pos)) {
        if ((k - r->seg) % BLOCK == 0)
            r->block_pos[(k - r->seg) / BLOCK] = pos;
        pos += r->seg_length[k];
        k++;
    }
    r->n = k - r->seg;
    r->blocks = (int)((r->n + BLOCK - 1) / BLOCK);
}

/* The run, with the GIL released: nothing here touches a Python object. A run of at least
 * SPLIT_MIN files is shared with a second thread (the system calls, not the hashing, are most
 * of the time, and they run on both cores). Done: the files of whole blocks in order, and of
 * the first block that stopped short. */
static void run_files(Run *r)
{
    pthread_t helper;
    int helped;

    r->next_block = 0;
    r->stop_block = r->blocks;
    helped = r->n >= SPLIT_MIN && pthread_create(&helper, NULL, read_blocks, r) == 0;
    read_blocks(r);
    if (helped)
        pthread_join(helper, NULL);
    r->done = 0;
    for (int b = 0; b < r->blocks && b < r->stop_block; b++) {
        Py_ssize_t want = (b + 1 < r->blocks) ? BLOCK : r->n - (Py_ssize_t)b * BLOCK;
        r->done += r->block_done[b];
        if (r->block_done[b] < want)
            break;
    }
}

/* A contiguous buffer of `itemsize`-byte items: 8 means 64-bit integers (array 'q' or 'Q'). */
static int get_column(PyObject *obj, Py_buffer *view, const char *what, Py_ssize_t itemsize,
                      int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    if (itemsize > 1) {
        const char *fmt = view->format ? view->format : "B";
        if (*fmt == '@' || *fmt == '=')
            fmt++;
        if (view->itemsize != itemsize || strlen(fmt) != 1 || strchr("qQlL", *fmt) == NULL) {
            PyErr_Format(PyExc_TypeError, "%s: want an array of 64-bit integers", what);
            PyBuffer_Release(view);
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(read_whole_files_doc,
"read_whole_files(root_fd, paths, path_ends, seg_file, seg_length, seg_container,\n"
"                 file_starts, sizes, mtimes, seg, seg_end, stop_file, container, buf, pos)\n"
"--\n\n"
"Read segments seg, seg+1, ... of the plan, each a whole file, into buf from pos on, and\n"
"return the SHA-256 of each as a list of hex strings. Stops before the first segment that\n"
"is not a whole file of one segment, lies in another container (container >= 0), does not\n"
"fit, belongs to file stop_file or later, or whose file fails any check (open, full read,\n"
"still a regular file of the scanned size and mtime, the same change time before and after\n"
"the read). The columns are the plan's and the\n"
"scan's arrays; paths/path_ends are the scan's UTF-8 path column.");

static PyObject *read_whole_files(PyObject *self, PyObject *args)
{
    PyObject *o_paths, *o_ends, *o_file, *o_length, *o_container, *o_starts, *o_sizes,
        *o_mtimes, *o_buf;
    Py_buffer b_paths, b_ends, b_file, b_length, b_container, b_starts, b_sizes, b_mtimes,
        b_buf;
    Py_buffer *views[9] = {&b_paths, &b_ends, &b_file, &b_length, &b_container, &b_starts,
                           &b_sizes, &b_mtimes, &b_buf};
    int got = 0;
    Run r;
    PyObject *result = NULL, *hex = NULL;
    (void)self;

    memset(&r, 0, sizeof r);
    if (!PyArg_ParseTuple(args, "iOOOOOOOOnnnLOn:read_whole_files", &r.root_fd, &o_paths,
                          &o_ends, &o_file, &o_length, &o_container, &o_starts, &o_sizes,
                          &o_mtimes, &r.seg, &r.seg_end, &r.stop_file, &r.container, &o_buf,
                          &r.pos))
        return NULL;
    if (get_column(o_paths, &b_paths, "paths", 1, 0) < 0) goto done;
    got++;
    if (get_column(o_ends, &b_ends, "path_ends", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_file, &b_file, "seg_file", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_length, &b_length, "seg_length", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_container, &b_container, "seg_container", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_starts, &b_starts, "file_starts", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_sizes, &b_sizes, "sizes", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_mtimes, &b_mtimes, "mtimes", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_buf, &b_buf, "buf", 1, 1) < 0) goto done;
    got++;

    r.paths = b_paths.buf;
    r.path_ends = b_ends.buf;
    r.seg_file = b_file.buf;
    r.seg_length = b_length.buf;
    r.seg_container = b_container.buf;
    r.file_starts = b_starts.buf;
    r.sizes = b_sizes.buf;
    r.mtimes = b_mtimes.buf;
    r.n_files = b_ends.len / 8;
    if (b_sizes.len / 8 != r.n_files || b_mtimes.len / 8 != r.n_files
        || b_starts.len / 8 != r.n_files + 1) {
        PyErr_SetString(PyExc_ValueError, "the file columns differ in length");
        goto done;
    }
    {
        Py_ssize_t n_segs = b_file.len / 8;
        if (b_length.len / 8 != n_segs || b_container.len / 8 != n_segs) {
            PyErr_SetString(PyExc_ValueError, "the segment columns differ in length");
            goto done;
        }
        if (r.seg < 0 || r.seg_end > n_segs || r.seg > r.seg_end) {
            PyErr_SetString(PyExc_IndexError, "segment range out of the plan");
            goto done;
        }
    }
    r.paths_len = b_paths.len; /* each path's bounds are checked by takes() */
    r.buf = b_buf.buf;
    r.cap = b_buf.len;
    if (r.pos < 0 || r.pos > r.cap) {
        PyErr_SetString(PyExc_IndexError, "pos out of the buffer");
        goto done;
    }
    if (r.seg_end - r.seg > MAX_RUN)
        r.seg_end = r.seg + MAX_RUN;
    find_run(&r);
    if (r.n == 0) {
        result = PyList_New(0);
        goto done;
    }
    r.hex = PyMem_RawMalloc(64 * (size_t)r.n);
    if (r.hex == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    run_files(&r);
    Py_END_ALLOW_THREADS

    result = PyList_New(r.done);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < r.done; i++) {
        hex = PyUnicode_FromStringAndSize(r.hex + 64 * i, 64);
        if (hex == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, hex);
    }

done:
    PyMem_RawFree(r.hex);
    for (int i = 0; i < got; i++)
        PyBuffer_Release(views[i]);
    return result;
}

/* ---- scan: one directory's entries ---- */

/* Whether s[0:n] is UTF-8 as Python's strict decoder takes it (no surrogates, no overlong
 * forms, nothing above U+10FFFF). */
static int valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
            if (i + 2 >= n || s[i + 1] < lo || s[i + 1] > hi || (s[i + 2] & 0xC0) != 0x80)
                return 0;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
            if (i + 3 >= n || s[i + 1] < lo || s[i + 1] > hi || (s[i + 2] & 0xC0) != 0x80
                || (s[i + 3] & 0xC0) != 0x80)
                return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

enum { E_FILE, E_DIR, E_OTHER };

typedef struct {
    char *name;
    size_t len;
    int kind;
    int err;      /* lstat's errno, 0 when it worked */
    int readable; /* access(R_OK), for regular files */
    struct stat st;
} Entry;

/* The walk's order: a file by its name, a directory by its name and '/'. */
static int by_key(const void *pa, const void *pb)
{
    const Entry *a = pa, *b = pb;
    size_t la = a->len + (a->kind == E_DIR), lb = b->len + (b->kind == E_DIR);
    size_t n = la < lb ? la : lb;
    for (size_t i = 0; i < n; i++) {
        unsigned char ca = i < a->len ? (unsigned char)a->name[i] : '/';
        unsigned char cb = i < b->len ? (unsigned char)b->name[i] : '/';
        if (ca != cb)
            return ca < cb ? -1 : 1;
    }
    return la < lb ? -1 : la > lb;
}

/* Growable bytes for a run's columns. */
typedef struct {
    char *data;
    size_t len, cap;
} Bytes;

static int put(Bytes *b, const void *src, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 4096;
        char *data;
        while (cap < b->len + n)
            cap *= 2;
        data = PyMem_RawRealloc(b->data, cap);
        if (data == NULL)
            return -1;
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static void free_entries(Entry *entries, size_t n)
{
    for (size_t i = 0; i < n; i++)
        PyMem_RawFree(entries[i].name);
    PyMem_RawFree(entries);
}

/* Whether this kernel itself checks permissions on dir_fd's filesystem, by the mode bits
 * and POSIX ACLs alone (not a server, as NFS and CIFS do, nor a FUSE daemon; not ZFS, which
 * may keep NFSv4 ACLs that can refuse even the owner). */
static int local_permissions(int dir_fd)
{
    struct statfs fs;
    if (fstatfs(dir_fd, &fs) != 0)
        return 0;
    switch ((unsigned long)fs.f_type) {
    case 0xEF53UL:     /* ext2, ext3, ext4 */
    case 0x58465342UL: /* xfs */
    case 0x9123683EUL: /* btrfs */
    case 0x01021994UL: /* tmpfs */
    case 0xF2F52010UL: /* f2fs */
        return 1;
    default:
        return 0;
    }
}

/* Whether `path` (a uid_map or gid_map) maps every id to itself, in one line. */
static int maps_every_id(const char *path)
{
    unsigned long inside, outside, count;
    char rest[2];
    int every = 0;
    FILE *f = fopen(path, "re");
    if (f != NULL) {
        every = fscanf(f, "%lu %lu %lu", &inside, &outside, &count) == 3 && inside == 0
                && outside == 0 && count == 4294967295UL && fscanf(f, "%1s", rest) != 1;
        fclose(f);
    }
    return every;
}

/* Whether this process runs in the first user namespace (its uid_map and gid_map map every id
 * to itself): elsewhere root's capabilities reach only the files whose owner and group are
 * mapped there. Found once (threads that race find the same answer). */
static int first_user_namespace(void)
{
    static int known = -1;
    int first = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (first < 0) {
        first = maps_every_id("/proc/self/uid_map") && maps_every_id("/proc/self/gid_map");
        __atomic_store_n(&known, first, __ATOMIC_RELAXED);
    }
    return first;
}

/* Whether root may read any file here: the first user namespace, and CAP_DAC_OVERRIDE or
 * CAP_DAC_READ_SEARCH permitted (access() checks the real user with the permitted set). */
static int may_read_any(void)
{
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[_LINUX_CAPABILITY_U32S_3];
    if (getuid() != 0 || !first_user_namespace() || syscall(SYS_capget, &head, caps) != 0)
        return 0;
    return (caps[0].permitted & ((1U << CAP_DAC_OVERRIDE) | (1U << CAP_DAC_READ_SEARCH))) != 0;
}

/* The kernel's overflow id (its default): what a file's owner or group shows as when it is not
 * mapped where this process runs. */
#define OVERFLOW_ID 65534

/* Whether access(R_OK) would surely say yes to this regular file, from its lstat alone (then
 * it is not asked: it costs as much as the lstat): it lies on the directory's own filesystem
 * (not a file mounted over one), which this kernel checks itself, and the reader is root as
 * may_read_any says, or owns the file and its mode lets the owner read (a POSIX ACL never
 * changes the owner's entry). A security module may still refuse it: the read then finds it
 * (see the README's scan). */
static int surely_readable(const struct stat *st, dev_t dir_dev, int local, int root_reads,
                           uid_t uid)
{
    if (!local || st->st_dev != dir_dev || st->st_uid == OVERFLOW_ID
        || st->st_gid == OVERFLOW_ID) /* not mapped here (an id-mapped mount, say) */
        return 0;
    return root_reads || (st->st_uid == uid && (st->st_mode & S_IRUSR));
}

/* List dir_fd with the GIL released: each entry's lstat, and access(R_OK) for regular files
 * (unless surely_readable). 0, or -1 with errno set (ENOMEM: out of memory, not a directory
 * that cannot be listed). */
static int read_entries(int dir_fd, Entry **out, size_t *count)
{
    struct stat dir_st;
    int local = fstat(dir_fd, &dir_st) == 0 && local_permissions(dir_fd);
    int root_reads = local && may_read_any();
    uid_t uid = getuid();
    int fd = fcntl(dir_fd, F_DUPFD_CLOEXEC, 0); /* not inherited by a fork meanwhile */
    DIR *d;
    Entry *entries = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    int err = 0;

    if (fd < 0)
        return -1;
    d = fdopendir(fd);
    if (d == NULL) {
        err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    rewinddir(d); /* the descriptor's offset is shared with dir_fd */
    for (;;) {
        Entry *e;
        errno = 0;
        de = readdir(d);
        if (de == NULL) {
            err = errno;
            break;
        }
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (n == cap) {
            size_t new_cap = cap ? cap * 2 : 64;
            Entry *grown = PyMem_RawRealloc(entries, new_cap * sizeof *entries);
            if (grown == NULL) {
                err = ENOMEM;
                break;
            }
            entries = grown;
            cap = new_cap;
        }
        e = &entries[n];
        e->len = strlen(de->d_name);
        e->name = PyMem_RawMalloc(e->len + 1);
        if (e->name == NULL) {
            err = ENOMEM;
            break;
        }
        memcpy(e->name, de->d_name, e->len + 1);
        n++;
        e->err = 0;
        e->readable = 0;
        if (fstatat(dir_fd, e->name, &e->st, AT_SYMLINK_NOFOLLOW) != 0) {
            e->err = errno;
            e->kind = E_OTHER;
            memset(&e->st, 0, sizeof e->st);
        } else if (S_ISDIR(e->st.st_mode)) {
            e->kind = E_DIR;
        } else if (S_ISREG(e->st.st_mode)) {
            e->readable = surely_readable(&e->st, dir_st.st_dev, local, root_reads, uid)
                          || faccessat(dir_fd, e->name, R_OK, 0) == 0;
            e->kind = e->readable ? E_FILE : E_OTHER;
        } else {
            e->kind = E_OTHER; /* a symlink, a FIFO, a socket, a device */
        }
    }
    rewinddir(d);
    closedir(d);
    if (err) {
        free_entries(entries, n);
        errno = err;
        return -1;
    }
    qsort(entries, n, sizeof *entries, by_key);
    *out = entries;
    *count = n;
    return 0;
}

/* A run of plain files as (0, paths, ends, sizes, mtimes, modes): the paths end to end, each
 * the prefix and the name, ends relative to the run (u64), sizes and mtimes (i64), modes
 * (u32), all native-endian, for array.frombytes. */
static PyObject *make_run(const char *prefix, size_t prefix_len, Entry *entries, size_t first,
                          size_t end)
{
    Bytes paths = {0}, ends = {0}, sizes = {0}, mtimes = {0}, modes = {0};
    PyObject *run = NULL;
    uint64_t at = 0;
    for (size_t i = first; i < end; i++) {
        Entry *e = &entries[i];
        int64_t size = (int64_t)e->st.st_size;
        int64_t mtime = (int64_t)e->st.st_mtim.tv_sec * 1000000000 + e->st.st_mtim.tv_nsec;
        uint32_t mode = (uint32_t)e->st.st_mode;
        at += prefix_len + e->len;
        if (put(&paths, prefix, prefix_len) < 0 || put(&paths, e->name, e->len) < 0
            || put(&ends, &at, 8) < 0 || put(&sizes, &size, 8) < 0
            || put(&mtimes, &mtime, 8) < 0 || put(&modes, &mode, 4) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    }
    run = Py_BuildValue("(iy#y#y#y#y#)", 0, paths.data, (Py_ssize_t)paths.len, ends.data,
                        (Py_ssize_t)ends.len, sizes.data, (Py_ssize_t)sizes.len, mtimes.data,
                        (Py_ssize_t)mtimes.len, modes.data, (Py_ssize_t)modes.len);
done:
    PyMem_RawFree(paths.data);
    PyMem_RawFree(ends.data);
    PyMem_RawFree(sizes.data);
    PyMem_RawFree(mtimes.data);
    PyMem_RawFree(modes.data);
    return run;
}

/* Whether an mtime in ns fits 64 bits (years 1678 to 2262). */
static int mtime_fits(const struct stat *st)
{
    int64_t limit = INT64_MAX / 1000000000 - 1;
    return st->st_mtim.tv_sec < limit && st->st_mtim.tv_sec > -limit;
}

/* A plain file for a run: its path is UTF-8 and its mtime in ns fits 64 bits. */
static int plain(const Entry *e, int prefix_ok)
{
    return e->kind == E_FILE && prefix_ok && mtime_fits(&e->st)
           && valid_utf8((const unsigned char *)e->name, e->len);
}

PyDoc_STRVAR(list_dir_doc,
"list_dir(dir_fd, prefix, prefix_is_utf8)\n"
"--\n\n"
"One directory of the scan: its entries sorted in the walk's order (a file by its name, a\n"
"directory by its name and '/'), each lstat'ed, and regular files probed with access(R_OK)\n"
"unless the lstat answers it (surely_readable).\n"
"A list of tuples:\n"
"  (0, paths, ends, sizes, mtimes, modes): a run of plain files (readable, UTF-8 path,\n"
"      64-bit mtime): paths with `prefix` end to end, ends relative to the run (u64), sizes\n"
"      and mtimes in ns (i64), modes (u32), for array.frombytes;\n"
"  (1, name, mode, mtime_ns): a directory;\n"
"  (2, name, errno, mode, size, mtime_s, mtime_ns_part, readable): anything else, for\n"
"      Python to look at (errno is lstat's, 0 when it worked).\n"
"Raises OSError when the directory cannot be listed.");

static PyObject *list_dir(PyObject *self, PyObject *args)
{
    int dir_fd, prefix_ok, rc, err = 0;
    Py_buffer prefix;
    Entry *entries = NULL;
    size_t n = 0;
    PyObject *items = NULL, *item;
    (void)self;

    if (!PyArg_ParseTuple(args, "iy*p:list_dir", &dir_fd, &prefix, &prefix_ok))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = read_entries(dir_fd, &entries, &n);
    if (rc < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        if (err == ENOMEM) {
            PyErr_NoMemory(); /* the job fails: out of memory is no reason to skip it */
        } else {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        goto done;
    }
    items = PyList_New(0);
    if (items == NULL)
        goto done;
    for (size_t i = 0; i < n;) {
        Entry *e = &entries[i];
        if (plain(e, prefix_ok)) {
            size_t end = i + 1;
            while (end < n && plain(&entries[end], prefix_ok))
                end++;
            item = make_run(prefix.buf, (size_t)prefix.len, entries, i, end);
            i = end;
        } else if (e->kind == E_DIR && mtime_fits(&e->st)) {
            item = Py_BuildValue(
                "(iy#IL)", 1, e->name, (Py_ssize_t)e->len, (unsigned int)e->st.st_mode,
                (long long)e->st.st_mtim.tv_sec * 1000000000LL + e->st.st_mtim.tv_nsec);
            i++;
        } else {
            item = Py_BuildValue("(iy#iILLLi)", 2, e->name, (Py_ssize_t)e->len, e->err,
                                 (unsigned int)e->st.st_mode, (long long)e->st.st_size,
                                 (long long)e->st.st_mtim.tv_sec,
                                 (long long)e->st.st_mtim.tv_nsec, e->readable);
            i++;
        }
        if (item == NULL) {
            Py_CLEAR(items);
            goto done;
        }
        rc = PyList_Append(items, item);
        Py_DECREF(item);
        if (rc < 0) {
            Py_CLEAR(items);
            goto done;
        }
    }
done:
    if (entries != NULL)
        free_entries(entries, n);
    PyBuffer_Release(&prefix);
    return items;
}

/* Year, month, day of a day counted from 1970-01-01 (proleptic Gregorian; H. Hinnant's
 * civil_from_days). */
static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    int64_t era, yy;
    unsigned doe, yoe, doy, mp;
    z += 719468;
    era = (z >= 0 ? z : z - 146096) / 146097;
    doe = (unsigned)(z - era * 146097);
    yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    yy = (int64_t)yoe + era * 400;
    doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = yy + (*m <= 2);
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

/* catalog.iso_from_ns: the time in microseconds clamped to [min_us, max_us], as
 * YYYY-MM-DDTHH:MM:SS.ffffff+00:00 (32 characters) in `text` (at least 64 bytes). */
/* v in exactly `width` decimal digits, zero-padded (v < 10^width). */
static void fixed(char *text, uint64_t v, int width)
{
    for (int i = width - 1; i >= 0; i--) {
        text[i] = (char)('0' + v % 10);
        v /= 10;
    }
}

static int format_iso(int64_t mtime_ns, long long min_us, long long max_us, char *text)
{
    int64_t total_us = floor_div(mtime_ns, 1000), secs, us, days, sod, year;
    unsigned month, day;
    if (total_us < min_us)
        total_us = min_us;
    if (total_us > max_us)
        total_us = max_us;
    secs = floor_div(total_us, 1000000);
    us = total_us - secs * 1000000;
    days = floor_div(secs, 86400);
    sod = secs - days * 86400;
    civil_from_days(days, &year, &month, &day);
    /* "%04lld-%02u-%02uT%02u:%02u:%02u.%06lld+00:00", without printf's cost (years 1-9999:
     * min_us and max_us keep them there) */
    fixed(text, (uint64_t)year, 4);
    text[4] = '-';
    fixed(text + 5, month, 2);
    text[7] = '-';
    fixed(text + 8, day, 2);
    text[10] = 'T';
    fixed(text + 11, (uint64_t)(sod / 3600), 2);
    text[13] = ':';
    fixed(text + 14, (uint64_t)(sod % 3600 / 60), 2);
    text[16] = ':';
    fixed(text + 17, (uint64_t)(sod % 60), 2);
    text[19] = '.';
    fixed(text + 20, (uint64_t)us, 6);
    memcpy(text + 26, "+00:00", 6);
    return 32;
}

PyDoc_STRVAR(iso_times_doc,
"iso_times(mtimes, indices, min_us, max_us)\n"
"--\n\n"
"catalog.iso_from_ns of mtimes[i] for each i in indices (arrays of 64-bit ints): the time in\n"
"microseconds, clamped to [min_us, max_us], as YYYY-MM-DDTHH:MM:SS.ffffff+00:00.");

static PyObject *iso_times(PyObject *self, PyObject *args)
{
    Py_buffer b_mtimes, b_idx;
    PyObject *o_mtimes, *o_idx, *result = NULL;
    long long min_us, max_us;
    int got = 0;
    Py_buffer *views[2] = {&b_mtimes, &b_idx};
    (void)self;

    if (!PyArg_ParseTuple(args, "OOLL:iso_times", &o_mtimes, &o_idx, &min_us, &max_us))
        return NULL;
    if (get_column(o_mtimes, &b_mtimes, "mtimes", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_idx, &b_idx, "indices", 8, 0) < 0) goto done;
    got++;
    {
        const int64_t *mtimes = b_mtimes.buf, *idx = b_idx.buf;
        Py_ssize_t n_mtimes = b_mtimes.len / 8, n = b_idx.len / 8;
        result = PyList_New(n);
        if (result == NULL)
            goto done;
        for (Py_ssize_t k = 0; k < n; k++) {
            int64_t i = idx[k];
            char text[64];
            int len;
            PyObject *s;
            if (i < 0 || i >= n_mtimes) {
                PyErr_SetString(PyExc_IndexError, "mtime index out of range");
                Py_CLEAR(result);
                goto done;
            }
            len = format_iso(mtimes[i], min_us, max_us, text);
            s = PyUnicode_FromStringAndSize(text, len);
            if (s == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            PyList_SET_ITEM(result, k, s);
        }
    }

done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(views[i]);
    return result;
}

/* ---- catalog records, byte for byte as orjson.dumps writes the same dicts ---- */

static int put_str(Bytes *b, const char *s) { return put(b, s, strlen(s)); }

static int put_int(Bytes *b, long long v)
{
    char text[24], *p = text + sizeof text;
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--p = '-';
    return put(b, p, (size_t)(text + sizeof text - p));
}

/* A JSON string body as orjson escapes it: '"', '\\' and control characters; the rest (all
 * of UTF-8 included) as is. The bytes must be UTF-8 (see put_escaped). */
static int put_escaped_utf8(Bytes *b, const unsigned char *s, size_t n)
{
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        char esc[8];
        size_t len = 2;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        if (put(b, s + run, i - run) < 0)
            return -1;
        run = i + 1;
        esc[0] = '\\';
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\t': esc[1] = 't'; break;
        case '\n': esc[1] = 'n'; break;
        case '\f': esc[1] = 'f'; break;
        case '\r': esc[1] = 'r'; break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = HEX[c >> 4];
            esc[5] = HEX[c & 15];
            len = 6;
        }
        if (put(b, esc, len) < 0)
            return -1;
    }
    return put(b, s + run, n - run);
}

/* put_escaped_utf8, or -1 for bytes that are not UTF-8 (orjson refuses them too). */
static int put_escaped(Bytes *b, const unsigned char *s, size_t n)
{
    return valid_utf8(s, n) ? put_escaped_utf8(b, s, n) : -1;
}

static int put_digest(Bytes *b, const unsigned char *raw)
{
    char hex[2 * SHA256_LEN];
    to_hex(raw, hex);
    return put(b, hex, sizeof hex);
}

/* uuid5 of the namespace and name, as catalog.file_id_for writes it (36 characters). */
static int make_file_id(EVP_MD_CTX *ctx, const unsigned char *ns, const unsigned char *name,
                        size_t len, char *id)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    char x[40];
    if (!EVP_DigestInit_ex(ctx, sha1_md, NULL) || !EVP_DigestUpdate(ctx, ns, 16)
        || !EVP_DigestUpdate(ctx, name, len) || !EVP_DigestFinal_ex(ctx, md, &md_len)
        || md_len != 20)
        return -1;
    for (int i = 0; i < 20; i++) {
        x[2 * i] = HEX[md[i] >> 4];
        x[2 * i + 1] = HEX[md[i] & 15];
    }
    /* RFC 4122: version 5 in digit 12, the variant bits (10xx) in digit 16 */
    memcpy(id, x, 8);
    id[8] = '-';
    memcpy(id + 9, x + 8, 4);
    id[13] = '-';
    id[14] = '5';
    memcpy(id + 15, x + 13, 3);
    id[18] = '-';
    id[19] = "89ab"[(md[8] >> 4) & 3];
    memcpy(id + 20, x + 17, 3);
    id[23] = '-';
    memcpy(id + 24, x + 20, 12);
    return 0;
}

/* The `i`th string of a column (data + u64 ends), or -1 if the ends are out of bounds. */
static int string_at(const Py_buffer *data, const Py_buffer *ends, int64_t i,
                     const unsigned char **s, size_t *n)
{
    const uint64_t *e = ends->buf;
    uint64_t start, end;
    if (i < 0 || i >= ends->len / 8)
        return -1;
    start = i ? e[i - 1] : 0;
    end = e[i];
    if (end < start || end > (uint64_t)data->len)
        return -1;
    *s = (const unsigned char *)data->buf + start;
    *n = (size_t)(end - start);
    return 0;
}

/* The 32 raw bytes of digest i, or NULL when it is unknown or out of bounds. */
static const unsigned char *digest_at(const Py_buffer *data, const Py_buffer *known, int64_t i)
{
    if (i < 0 || i >= known->len || (i + 1) * SHA256_LEN > data->len
        || !((const unsigned char *)known->buf)[i])
        return NULL;
    return (const unsigned char *)data->buf + i * SHA256_LEN;
}

PyDoc_STRVAR(file_ids_doc,
"file_ids(namespace, paths, path_ends, indices)\n"
"--\n\n"
"The catalog's file id of each path in indices (an array of 64-bit ints): uuid5 of the\n"
"16-byte namespace and the path's bytes, as catalog.file_id_for makes it.");

static PyObject *file_ids(PyObject *self, PyObject *args)
{
    Py_buffer ns, b_paths, b_ends, b_idx;
    PyObject *o_paths, *o_ends, *o_idx, *result = NULL;
    int got = 0;
    Py_buffer *views[3] = {&b_paths, &b_ends, &b_idx};
    EVP_MD_CTX *ctx = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*OOO:file_ids", &ns, &o_paths, &o_ends, &o_idx))
        return NULL;
    if (ns.len != 16) {
        PyErr_SetString(PyExc_ValueError, "namespace: want 16 bytes");
        goto done;
    }
    if (get_column(o_paths, &b_paths, "paths", 1, 0) < 0) goto done;
    got++;
    if (get_column(o_ends, &b_ends, "path_ends", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_idx, &b_idx, "indices", 8, 0) < 0) goto done;
    got++;
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const int64_t *idx = b_idx.buf;
        Py_ssize_t n = b_idx.len / 8;
        result = PyList_New(n);
        if (result == NULL)
            goto done;
        for (Py_ssize_t k = 0; k < n; k++) {
            const unsigned char *name;
            size_t len;
            char id[36];
            PyObject *s;
            if (string_at(&b_paths, &b_ends, idx[k], &name, &len) < 0) {
                PyErr_SetString(PyExc_IndexError, "file index out of range of the paths");
                Py_CLEAR(result);
                goto done;
            }
            if (make_file_id(ctx, ns.buf, name, len, id) < 0) {
                PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to hash");
                Py_CLEAR(result);
                goto done;
            }
            s = PyUnicode_FromStringAndSize(id, 36);
            if (s == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            PyList_SET_ITEM(result, k, s);
        }
    }

done:
    EVP_MD_CTX_free(ctx);
    for (int i = 0; i < got; i++)
        PyBuffer_Release(views[i]);
    PyBuffer_Release(&ns);
    return result;
}


/* What an encoder returns: its records, None when it could not encode them all (the caller
 * encodes them itself), or NULL with the exception that stopped it. */
static PyObject *records_result(const Bytes *out, int ok)
{
    if (PyErr_Occurred())
        return NULL;
    if (!ok)
        return Py_NewRef(Py_None);
    return PyBytes_FromStringAndSize(out->data ? out->data : "", (Py_ssize_t)out->len);
}

PyDoc_STRVAR(encode_files_doc,
"encode_files(namespace, paths, path_ends, indices, sizes, mtimes, modes, digests, known,\n"
"             absolute_prefix, min_us, max_us)\n"
"--\n\n"
"The catalog's source_files records of the files in indices, as orjson.dumps writes their\n"
"dicts, joined by ',\\n': file_id, relative_path, absolute_path (absolute_prefix, a JSON\n"
"string body, and the path), size_bytes, sha256, modified_at, unix_mode, mtime_ns. None when\n"
"a path is not UTF-8 or a digest is unknown (the caller encodes those records itself).");

static PyObject *encode_files(PyObject *self, PyObject *args)
{
    Py_buffer ns, prefix, b_paths, b_ends, b_idx, b_sizes, b_mtimes, b_modes, b_dig, b_known;
    PyObject *o_paths, *o_ends, *o_idx, *o_sizes, *o_mtimes, *o_modes, *o_dig, *o_known;
    PyObject *result = NULL;
    Py_buffer *views[8] = {&b_paths, &b_ends, &b_idx, &b_sizes, &b_mtimes, &b_modes, &b_dig,
                           &b_known};
    long long min_us, max_us;
    int got = 0, ok = 1;
    Bytes out = {0};
    EVP_MD_CTX *ctx = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*OOOOOOOOy*LL:encode_files", &ns, &o_paths, &o_ends, &o_idx,
                          &o_sizes, &o_mtimes, &o_modes, &o_dig, &o_known, &prefix, &min_us,
                          &max_us))
        return NULL;
    if (get_column(o_paths, &b_paths, "paths", 1, 0) < 0) goto done;
    got++;
    if (get_column(o_ends, &b_ends, "path_ends", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_idx, &b_idx, "indices", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_sizes, &b_sizes, "sizes", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_mtimes, &b_mtimes, "mtimes", 8, 0) < 0) goto done;
    got++;
    if (get_column(o_modes, &b_modes, "modes", 1, 0) < 0) goto done;
    got++;
    if (get_column(o_dig, &b_dig, "digests", 1, 0) < 0) goto done;
    got++;
    if (get_column(o_known, &b_known, "known", 1, 0) < 0) goto done;
    got++;
    if (ns.len != 16 || b_modes.itemsize != 4) {
        PyErr_SetString(PyExc_ValueError, "want a 16-byte namespace and 32-bit modes");
        goto done;
    }
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const int64_t *idx = b_idx.buf, *sizes = b_sizes.buf, *mtimes = b_mtimes.buf;
        const uint32_t *modes = b_modes.buf;
        Py_ssize_t n = b_idx.len / 8, n_files = b_ends.len / 8;
        if (b_sizes.len / 8 != n_files || b_mtimes.len / 8 != n_files
            || b_modes.len / 4 != n_files) {
            PyErr_SetString(PyExc_ValueError, "the file columns differ in length");
            goto done;
        }
        int out_of_range = 0;
        /* Only the columns (held as buffers: they cannot be resized meanwhile) and raw memory
         * are touched: the next chunk is encoded while the caller hashes and writes this one. */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < n && ok; k++) {
            int64_t i = idx[k];
            const unsigned char *path, *digest;
            size_t len;
            char id[36], iso[64];
            int iso_len;
            if (string_at(&b_paths, &b_ends, i, &path, &len) < 0) {
                out_of_range = 1;
                break;
            }
            digest = digest_at(&b_dig, &b_known, i);
            if (digest == NULL || make_file_id(ctx, ns.buf, path, len, id) < 0) {
                ok = 0;
                break;
            }
            iso_len = format_iso(mtimes[i], min_us, max_us, iso);
            ok = (k == 0 || put_str(&out, ",\n") == 0) && put_str(&out, "{\"file_id\":\"") == 0
                 && put(&out, id, 36) == 0 && put_str(&out, "\",\"relative_path\":\"") == 0
                 && put_escaped(&out, path, len) == 0
                 && put_str(&out, "\",\"absolute_path\":\"") == 0
                 && put(&out, prefix.buf, (size_t)prefix.len) == 0
                 && put_escaped_utf8(&out, path, len) == 0 /* checked just above */
                 && put_str(&out, "\",\"size_bytes\":") == 0 && put_int(&out, sizes[i]) == 0
                 && put_str(&out, ",\"sha256\":\"") == 0 && put_digest(&out, digest) == 0
                 && put_str(&out, "\",\"modified_at\":\"") == 0
                 && put(&out, iso, (size_t)iso_len) == 0
                 && put_str(&out, "\",\"unix_mode\":") == 0 && put_int(&out, modes[i]) == 0
                 && put_str(&out, ",\"mtime_ns\":") == 0 && put_int(&out, mtimes[i]) == 0
                 && put_str(&out, "}") == 0;
        }
        Py_END_ALLOW_THREADS
        if (out_of_range) {
            PyErr_SetString(PyExc_IndexError, "file index out of range of the paths");
            goto done;
        }
    }
    result = records_result(&out, ok);

done:
    PyMem_RawFree(out.data);
    EVP_MD_CTX_free(ctx);
    for (int i = 0; i < got; i++)
        PyBuffer_Release(views[i]);
    PyBuffer_Release(&ns);
    PyBuffer_Release(&prefix);
    return result;
}

PyDoc_STRVAR(encode_segments_doc,
"encode_segments(namespace, paths, path_ends, seg_file, seg_part, seg_container,\n"
"                seg_container_offset, seg_source_offset, seg_length, start, stop,\n"
"                container_ids, container_id_ends, digests, known)\n"
"--\n\n"
"The catalog's segments records start..stop-1, as orjson.dumps writes their dicts, joined\n"
"by ',\\n': segment_id, file_id, container_id, container_offset, source_offset,\n"
"length_bytes, sha256. None when a path or container id is not UTF-8 or a digest is\n"
"unknown (the caller encodes those records itself).");

static PyObject *encode_segments(PyObject *self, PyObject *args)
{
    Py_buffer ns, b_paths, b_ends, b_file, b_part, b_cont, b_coff, b_soff, b_len, b_cids,
        b_cends, b_dig, b_known;
    PyObject *o_paths, *o_ends, *o_file, *o_part, *o_cont, *o_coff, *o_soff, *o_len, *o_cids,
        *o_cends, *o_dig, *o_known;
    PyObject *result = NULL;
    Py_buffer *views[12] = {&b_paths, &b_ends, &b_file, &b_part, &b_cont, &b_coff, &b_soff,
                            &b_len, &b_cids, &b_cends, &b_dig, &b_known};
    PyObject **objs[12] = {&o_paths, &o_ends, &o_file, &o_part, &o_cont, &o_coff, &o_soff,
                           &o_len, &o_cids, &o_cends, &o_dig, &o_known};
    static const Py_ssize_t sizes[12] = {1, 8, 8, 8, 8, 8, 8, 8, 1, 8, 1, 1};
    Py_ssize_t start, stop;
    int got = 0, ok = 1;
    Bytes out = {0};
    EVP_MD_CTX *ctx = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*OOOOOOOOnnOOOO:encode_segments", &ns, &o_paths, &o_ends,
                          &o_file, &o_part, &o_cont, &o_coff, &o_soff, &o_len, &start, &stop,
                          &o_cids, &o_cends, &o_dig, &o_known))
        return NULL;
    for (int i = 0; i < 12; i++) {
        if (get_column(*objs[i], views[i], "column", sizes[i], 0) < 0)
            goto done;
        got++;
    }
    if (ns.len != 16) {
        PyErr_SetString(PyExc_ValueError, "namespace: want 16 bytes");
        goto done;
    }
    {
        Py_ssize_t n_segs = b_file.len / 8;
        for (int i = 3; i < 8; i++)
            if (views[i]->len / 8 != n_segs) {
                PyErr_SetString(PyExc_ValueError, "the segment columns differ in length");
                goto done;
            }
        if (start < 0 || stop > n_segs || start > stop) {
            PyErr_SetString(PyExc_IndexError, "segment range out of the plan");
            goto done;
        }
    }
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const int64_t *file = b_file.buf, *part = b_part.buf, *cont = b_cont.buf,
                      *coff = b_coff.buf, *soff = b_soff.buf, *length = b_len.buf;
        int64_t id_of = -1; /* the file whose id is in `id` */
        char id[36];
        int out_of_range = 0;
        Py_BEGIN_ALLOW_THREADS /* as in encode_files */
        for (Py_ssize_t k = start; k < stop && ok; k++) {
            const unsigned char *path, *cid, *digest;
            size_t len, cid_len;
            char part_text[24];
            int part_len;
            if (string_at(&b_paths, &b_ends, file[k], &path, &len) < 0
                || string_at(&b_cids, &b_cends, cont[k], &cid, &cid_len) < 0) {
                out_of_range = 1;
                break;
            }
            digest = digest_at(&b_dig, &b_known, k);
            if (digest == NULL) {
                ok = 0;
                break;
            }
            if (file[k] != id_of) {
                if (make_file_id(ctx, ns.buf, path, len, id) < 0) {
                    ok = 0;
                    break;
                }
                id_of = file[k];
            }
            if (part[k] >= 0 && part[k] < 1000) { /* "%03lld", the usual case without printf */
                fixed(part_text, (uint64_t)part[k], 3);
                part_len = 3;
            } else {
                part_len = snprintf(part_text, sizeof part_text, "%03lld", (long long)part[k]);
            }
            ok = (k == start || put_str(&out, ",\n") == 0)
                 && put_str(&out, "{\"segment_id\":\"SEG-") == 0 && put(&out, id, 36) == 0
                 && put_str(&out, "-") == 0 && put(&out, part_text, (size_t)part_len) == 0
                 && put_str(&out, "\",\"file_id\":\"") == 0 && put(&out, id, 36) == 0
                 && put_str(&out, "\",\"container_id\":\"") == 0
                 && put_escaped(&out, cid, cid_len) == 0
                 && put_str(&out, "\",\"container_offset\":") == 0 && put_int(&out, coff[k]) == 0
                 && put_str(&out, ",\"source_offset\":") == 0 && put_int(&out, soff[k]) == 0
                 && put_str(&out, ",\"length_bytes\":") == 0 && put_int(&out, length[k]) == 0
                 && put_str(&out, ",\"sha256\":\"") == 0 && put_digest(&out, digest) == 0
                 && put_str(&out, "\"}") == 0;
        }
        Py_END_ALLOW_THREADS
        if (out_of_range) {
            PyErr_SetString(PyExc_IndexError, "file or container out of range");
            goto done;
        }
    }
    result = records_result(&out, ok);

done:
    PyMem_RawFree(out.data);
    EVP_MD_CTX_free(ctx);
    for (int i = 0; i < got; i++)
        PyBuffer_Release(views[i]);
    PyBuffer_Release(&ns);
    return result;
}

/* ---- plan: the layout's common step, and the sizer's sums ---- */

/* Files per layout_fit call at most (the caller loops): bounds its columns' memory. */
#define LAYOUT_RUN 65536

PyDoc_STRVAR(layout_fit_doc,
"layout_fit(sizes, start, room, container, offset, count)\n"
"--\n\n"
"plan.layout's common step, from file `start` on: each file that fits whole in the open\n"
"container (`room` bytes from `offset` on) becomes one segment of it; a zero-byte file gets\n"
"none. Stops before the first file that does not fit, or after 65536 files. Returns\n"
"(next file, offset, count,\n"
"file_index, part, container_index, container_offset, source_offset, length, file_starts),\n"
"the columns' new items as native int64 bytes.");

static PyObject *layout_fit(PyObject *self, PyObject *args)
{
    PyObject *o_sizes, *result = NULL;
    Py_buffer b_sizes;
    Py_ssize_t start, i;
    long long room, container, offset, count;
    Bytes cols[7] = {{0}};
    (void)self;

    if (!PyArg_ParseTuple(args, "OnLLLL:layout_fit", &o_sizes, &start, &room, &container,
                          &offset, &count))
        return NULL;
    if (get_column(o_sizes, &b_sizes, "sizes", 8, 0) < 0)
        return NULL;
    {
        const int64_t *sizes = b_sizes.buf;
        Py_ssize_t n = b_sizes.len / 8;
        int64_t one = 1, zero = 0;
        Py_ssize_t end = start >= 0 && n - start > LAYOUT_RUN ? start + LAYOUT_RUN : n;
        for (i = start < 0 ? n : start; i < end; i++) {
            int64_t size = sizes[i];
            if (size < 0 || (size > 0 && size > room - offset))
                break;
            if (size > 0) {
                int64_t f = i, c = container, o = offset;
                if (put(&cols[0], &f, 8) < 0 || put(&cols[1], &one, 8) < 0
                    || put(&cols[2], &c, 8) < 0 || put(&cols[3], &o, 8) < 0
                    || put(&cols[4], &zero, 8) < 0 || put(&cols[5], &size, 8) < 0)
                    goto nomem;
                offset += size;
                count++;
            }
            {
                int64_t c = count;
                if (put(&cols[6], &c, 8) < 0)
                    goto nomem;
            }
        }
    }
    result = Py_BuildValue("(nLLy#y#y#y#y#y#y#)", i, offset, count,
                           cols[0].data ? cols[0].data : "", (Py_ssize_t)cols[0].len,
                           cols[1].data ? cols[1].data : "", (Py_ssize_t)cols[1].len,
                           cols[2].data ? cols[2].data : "", (Py_ssize_t)cols[2].len,
                           cols[3].data ? cols[3].data : "", (Py_ssize_t)cols[3].len,
                           cols[4].data ? cols[4].data : "", (Py_ssize_t)cols[4].len,
                           cols[5].data ? cols[5].data : "", (Py_ssize_t)cols[5].len,
                           cols[6].data ? cols[6].data : "", (Py_ssize_t)cols[6].len);
    goto done;
nomem:
    PyErr_NoMemory();
done:
    for (int k = 0; k < 7; k++)
        PyMem_RawFree(cols[k].data);
    PyBuffer_Release(&b_sizes);
    return result;
}

PyDoc_STRVAR(digit_total_doc,
"digit_total(column)\n"
"--\n\n"
"The characters of every integer in an int64 array written in decimal, minus signs included.");

static PyObject *digit_total(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    long long total = 0;
    (void)self;
    if (get_column(arg, &b, "column", 8, 0) < 0)
        return NULL;
    {
        const int64_t *v = b.buf;
        Py_ssize_t n = b.len / 8;
        int unsigned_ = b.format && (b.format[0] == 'Q' || b.format[0] == 'L'
                                     || ((b.format[0] == '@' || b.format[0] == '=')
                                         && (b.format[1] == 'Q' || b.format[1] == 'L')));
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x;
            int digits = 1;
            if (unsigned_) {
                x = (uint64_t)v[i];
            } else if (v[i] < 0) {
                total++; /* the minus sign */
                x = (uint64_t)0 - (uint64_t)v[i];
            } else {
                x = (uint64_t)v[i];
            }
            while (x >= 10) {
                x /= 10;
                digits++;
            }
            total += digits;
        }
    }
    PyBuffer_Release(&b);
    return PyLong_FromLongLong(total);
}

PyDoc_STRVAR(json_strings_size_doc,
"json_strings_size(data, ends)\n"
"--\n\n"
"The bytes of every string of a UTF-8 column as JSON string bodies (escapes counted, quotes\n"
"not), as JsonCatalogCodec.strings_size counts them; None if one is not UTF-8.");

static PyObject *json_strings_size(PyObject *self, PyObject *args)
{
    PyObject *o_data, *o_ends, *result = NULL;
    Py_buffer b_data, b_ends;
    long long total = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO:json_strings_size", &o_data, &o_ends))
        return NULL;
    if (get_column(o_data, &b_data, "data", 1, 0) < 0)
        return NULL;
    if (get_column(o_ends, &b_ends, "ends", 8, 0) < 0) {
        PyBuffer_Release(&b_data);
        return NULL;
    }
    {
        const uint64_t *ends = b_ends.buf;
        const unsigned char *d = b_data.buf;
        Py_ssize_t n = b_ends.len / 8;
        uint64_t at = 0;
        int ok = 1;
        for (Py_ssize_t i = 0; i < n && ok; i++) {
            if (ends[i] < at || ends[i] > (uint64_t)b_data.len) {
                PyErr_SetString(PyExc_ValueError, "ends out of the data");
                goto done;
            }
            ok = valid_utf8(d + at, (size_t)(ends[i] - at));
            for (uint64_t k = at; k < ends[i]; k++) {
                unsigned char c = d[k];
                if (c == '"' || c == '\\' || c == '\b' || c == '\t' || c == '\n' || c == '\f'
                    || c == '\r')
                    total += 2;
                else if (c < 0x20)
                    total += 6;
                else
                    total += 1;
            }
            at = ends[i];
        }
        result = ok ? PyLong_FromLongLong(total) : Py_NewRef(Py_None);
    }
done:
    PyBuffer_Release(&b_data);
    PyBuffer_Release(&b_ends);
    return result;
}

PyDoc_STRVAR(copy_single_segment_digests_doc,
"copy_single_segment_digests(file_starts, seg_digests, seg_known, file_digests, file_known)\n"
"--\n\n"
"Give every file whose digest is unknown and that has exactly one segment, whose digest is\n"
"known, that digest (a file of one segment is that segment). Returns how many it gave.");

static PyObject *copy_single_segment_digests(PyObject *self, PyObject *args)
{
    PyObject *objs[5];
    Py_buffer v[5];
    static const Py_ssize_t sizes[5] = {8, 1, 1, 1, 1};
    int got = 0;
    long long copied = 0;
    PyObject *result = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "OOOOO:copy_single_segment_digests", &objs[0], &objs[1],
                          &objs[2], &objs[3], &objs[4]))
        return NULL;
    for (int i = 0; i < 5; i++) {
        if (get_column(objs[i], &v[i], "column", sizes[i], i >= 3) < 0)
            goto done;
        got++;
    }
    {
        const int64_t *starts = v[0].buf;
        const unsigned char *seg = v[1].buf, *seg_known = v[2].buf;
        unsigned char *file = v[3].buf, *file_known = v[4].buf;
        Py_ssize_t n_files = v[4].len, n_segs = v[2].len;
        if (v[0].len / 8 != n_files + 1 || v[3].len < n_files * SHA256_LEN
            || v[1].len < n_segs * SHA256_LEN) {
            PyErr_SetString(PyExc_ValueError, "the digest columns do not match");
            goto done;
        }
        for (Py_ssize_t f = 0; f < n_files; f++) {
            int64_t s = starts[f];
            if (file_known[f] || starts[f + 1] - s != 1 || s < 0 || s >= n_segs || !seg_known[s])
                continue;
            memcpy(file + f * SHA256_LEN, seg + s * SHA256_LEN, SHA256_LEN);
            file_known[f] = 1; /* after the bytes, as Digests does */
            copied++;
        }
    }
    result = PyLong_FromLongLong(copied);
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&v[i]);
    return result;
}

/* ---- decode_records: catalog record lines back into records ---- */

#define KIND_STR 1
#define KIND_INT 2
#define KIND_BOOL 4
#define KIND_NONE 8
#define MAX_FIELDS 16

/* Results of the parsers below: 1 parsed, 0 left to the Python decoder (which parses it with
 * orjson, or says why it is not a catalog), -1 a Python error (memory). */

/* One field's value as it lies in the line: its kind, and its number, or its string body
 * (escapes still in it: only the two-character ones, checked). */
typedef struct {
    int kind;
    long long number;
    const char *text;
    size_t len;
    int escaped;
} Value;

/* A JSON string whose body starts at p, up to its closing quote (*next after it). Control
 * bytes, \u escapes and text that is not UTF-8 are left to Python. */
static int scan_string(const char *p, const char *end, const char **next, Value *v)
{
    const char *q = p;
    int escaped = 0, ascii = 1;
    /* Eight bytes at a time while none is '"', '\\', a control byte or above 0x7F. */
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    while (end - q >= 8) {
        uint64_t w, quote, slash;
        memcpy(&w, q, 8);
        quote = w ^ (ones * '"');
        slash = w ^ (ones * '\\');
        if (((w - ones * 0x20) | (quote - ones) | (slash - ones) | w) & highs)
            break;
        q += 8;
    }
    while (q < end && *q != '"') {
        if ((unsigned char)*q < 0x20)
            return 0;
        if (*q == '\\') {
            escaped = 1;
            if (end - q < 2 || !strchr("\"\\/bfnrt", q[1]) || q[1] == '\0')
                return 0; /* \u and anything else */
            q += 2;
        } else {
            ascii &= (unsigned char)*q < 0x80;
            q++;
        }
    }
    /* The escapes are ASCII on both sides, so the body is UTF-8 exactly when its text is. */
    if (q >= end || (!ascii && !valid_utf8((const unsigned char *)p, (size_t)(q - p))))
        return 0;
    v->kind = KIND_STR;
    v->text = p;
    v->len = (size_t)(q - p);
    v->escaped = escaped;
    *next = q + 1;
    return 1;
}

/* A string's text (its escapes undone), as a str. */
static PyObject *string_of(const Value *v, Bytes *tmp)
{
    if (!v->escaped)
        return PyUnicode_DecodeUTF8(v->text, (Py_ssize_t)v->len, NULL);
    tmp->len = 0;
    for (const char *s = v->text; s < v->text + v->len; s++) {
        char c = *s;
        if (c == '\\') {
            switch (*++s) {
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            default: c = *s; break; /* '"', '\\' and '/' */
            }
        }
        if (put(tmp, &c, 1) < 0)
            return PyErr_NoMemory();
    }
    return PyUnicode_DecodeUTF8(tmp->data ? tmp->data : "", (Py_ssize_t)tmp->len, NULL);
}

/* A JSON integer of 64-bit magnitude (anything longer, -0, a fraction or an exponent is left
 * to Python). */
static int scan_int(const char *p, const char *end, const char **next, Value *out)
{
    const char *q = p, *digits;
    unsigned long long v = 0; /* 19 digits do not overflow it */
    int neg = q < end && *q == '-';
    q += neg;
    digits = q;
    while (q < end && *q >= '0' && *q <= '9')
        v = v * 10 + (unsigned long long)(*q++ - '0');
    if (q == digits || q - digits > 19 || v > LLONG_MAX
        || (*digits == '0' && (q - digits > 1 || neg)))
        return 0;
    if (q < end && (*q == '.' || *q == 'e' || *q == 'E'))
        return 0;
    out->kind = KIND_INT;
    out->number = neg ? -(long long)v : (long long)v;
    *next = q;
    return 1;
}

static int literal(const char *p, const char *end, const char *word, const char **next)
{
    size_t n = strlen(word);
    if ((size_t)(end - p) < n || memcmp(p, word, n) != 0)
        return 0;
    *next = p + n;
    return 1;
}

typedef struct {
    Py_ssize_t count;
    const char *names[MAX_FIELDS];
    size_t name_lens[MAX_FIELDS];
    unsigned char kinds[MAX_FIELDS];
    unsigned char interned[MAX_FIELDS];
    PyObject *defaults[MAX_FIELDS]; /* borrowed; `missing` for a required field */
} Fields;

/* One record line at p: `{...}` then `,` (1), `],` (2) or `]}` (3), then a newline. Each
 * field's value in values[] (kind 0: its key is absent; a repeated or unknown key, or a value
 * of a kind the field does not take, is left to Python); *next after the newline. Makes no
 * Python object. */
static int parse_fields(const Fields *f, const char *p, const char *end, const char **next,
                        Value *values)
{
    Py_ssize_t guess = 0;
    for (Py_ssize_t i = 0; i < f->count; i++)
        values[i].kind = 0;
    if (p >= end || *p++ != '{')
        return 0;
    if (p < end && *p == '}') {
        p++;
    } else {
        for (;;) {
            const char *key, *q;
            Py_ssize_t i;
            Value v = {0};
            if (p >= end || *p++ != '"')
                return 0;
            key = p;
            while (p < end && *p != '"' && *p != '\\')
                p++;
            if (p >= end || *p != '"')
                return 0;
            /* keys come in field order, as the encoder writes them: try the next one first */
            i = guess < f->count && f->name_lens[guess] == (size_t)(p - key)
                && memcmp(f->names[guess], key, (size_t)(p - key)) == 0 ? guess : f->count;
            for (Py_ssize_t k = 0; i == f->count && k < f->count; k++)
                if (f->name_lens[k] == (size_t)(p - key)
                    && memcmp(f->names[k], key, f->name_lens[k]) == 0)
                    i = k;
            guess = i + 1;
            if (i == f->count || values[i].kind != 0) /* unknown or repeated: Python's call */
                return 0;
            p++;
            if (p >= end || *p++ != ':' || p >= end)
                return 0;
            q = p;
            if (*p == '"') {
                if (!scan_string(p + 1, end, &q, &v))
                    return 0;
            } else if (*p == '-' || (*p >= '0' && *p <= '9')) {
                if (!scan_int(p, end, &q, &v))
                    return 0;
            } else if (literal(p, end, "true", &q)) {
                v.kind = KIND_BOOL;
                v.number = 1;
            } else if (literal(p, end, "false", &q)) {
                v.kind = KIND_BOOL;
            } else if (literal(p, end, "null", &q)) {
                v.kind = KIND_NONE;
            } else {
                return 0;
            }
            if (!(f->kinds[i] & v.kind))
                return 0;
            values[i] = v;
            p = q;
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == '}') {
                p++;
                break;
            }
            return 0;
        }
    }
    for (Py_ssize_t i = 0; i < f->count; i++)
        if (values[i].kind == 0 && f->defaults[i] == NULL)
            return 0; /* a required field is absent */
    if (end - p >= 2 && p[0] == ',' && p[1] == '\n') {
        *next = p + 2;
        return 1;
    }
    if (end - p >= 3 && p[0] == ']' && (p[1] == ',' || p[1] == '}') && p[2] == '\n') {
        *next = p + 3;
        return p[1] == ',' ? 2 : 3;
    }
    return 0;
}

/* The Python object of a parsed value (a new reference), or NULL with an exception set (a
 * UnicodeDecodeError cannot happen: scan_string checked the text). */
static PyObject *object_of(const Value *v, Bytes *tmp)
{
    switch (v->kind) {
    case KIND_STR: return string_of(v, tmp);
    case KIND_INT: return PyLong_FromLongLong(v->number);
    case KIND_BOOL: return Py_NewRef(v->number ? Py_True : Py_False);
    default: return Py_NewRef(Py_None);
    }
}

/* The field specification decode_records and scan_records share. */
static int get_fields(Fields *f, PyObject *names, const Py_buffer *kinds,
                      const Py_buffer *interned, PyObject *defaults, PyObject *missing,
                      const char *fn)
{
    f->count = PyTuple_GET_SIZE(names);
    if (f->count > MAX_FIELDS || kinds->len != f->count || interned->len != f->count
        || PyTuple_GET_SIZE(defaults) != f->count) {
        PyErr_Format(PyExc_ValueError, "%s: fields do not agree", fn);
        return -1;
    }
    for (Py_ssize_t i = 0; i < f->count; i++) {
        Py_ssize_t len;
        f->names[i] = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(names, i), &len);
        if (f->names[i] == NULL)
            return -1;
        f->name_lens[i] = (size_t)len;
        f->kinds[i] = ((const unsigned char *)kinds->buf)[i];
        f->interned[i] = ((const unsigned char *)interned->buf)[i];
        f->defaults[i] = PyTuple_GET_ITEM(defaults, i);
        if (f->defaults[i] == missing)
            f->defaults[i] = NULL;
    }
    return 0;
}

/* A record of cls with these field values, set as the __init__ attrs writes for a frozen
 * class without validators or converters sets them (object.__setattr__), without the call. */
static PyObject *make_record(PyTypeObject *cls, PyObject *names, PyObject **values,
                             Py_ssize_t count)
{
    PyObject *record = cls->tp_new(cls, empty_tuple, NULL);
    for (Py_ssize_t i = 0; record != NULL && i < count; i++)
        if (PyObject_GenericSetAttr(record, PyTuple_GET_ITEM(names, i), values[i]) < 0)
            Py_CLEAR(record);
    return record;
}

PyDoc_STRVAR(decode_records_doc,
"decode_records(data, pos, cls, names, kinds, defaults, interned, ids, missing)\n"
"--\n\n"
"The record lines of one catalog list from data[pos:], as the Python decoder reads them:\n"
"a record of cls per line (an attrs class whose __init__ only sets its fields: they are set\n"
"as it sets them, without the call), fields in the order of names. kinds: per field, the JSON\n"
"types it takes (1 string, 2 integer, 4 true/false, 8 null); defaults: per field, its value\n"
"when the key is absent, or missing when it is required; interned: per field, 1 to keep one\n"
"string per value in the dict ids. Returns (records, pos, status): status 1 when the list\n"
"ended with ']', and 2 when it ended the document with ']}' (pos after the line); 0 when a\n"
"line is anything else (pos at that line, which the Python decoder reads).");

static PyObject *decode_records(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t pos;
    PyObject *cls, *names, *defaults, *ids, *missing, *records = NULL, *result = NULL;
    Py_buffer kinds, interned;
    Fields f;
    Bytes tmp = {0};
    int status = 0;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*nOO!y*O!y*O!O:decode_records", &data, &pos, &cls,
                          &PyTuple_Type, &names, &kinds, &PyTuple_Type, &defaults, &interned,
                          &PyDict_Type, &ids, &missing))
        return NULL;
    if (!PyType_Check(cls) || ((PyTypeObject *)cls)->tp_new == NULL) {
        PyErr_SetString(PyExc_TypeError, "decode_records: cls is not a class it can make");
        goto done;
    }
    if (get_fields(&f, names, &kinds, &interned, defaults, missing, "decode_records") < 0)
        goto done;
    if (pos < 0 || pos > data.len) {
        PyErr_SetString(PyExc_ValueError, "decode_records: pos is out of range");
        goto done;
    }
    records = PyList_New(0);
    if (records == NULL)
        goto done;
    {
        const char *p = (const char *)data.buf + pos, *end = (const char *)data.buf + data.len;
        while (status == 0) {
            Value parsed[MAX_FIELDS];
            PyObject *values[MAX_FIELDS] = {NULL};
            PyObject *record = NULL;
            const char *next = p;
            int got = parse_fields(&f, p, end, &next, parsed);
            for (Py_ssize_t i = 0; got > 0 && i < f.count; i++) {
                if (parsed[i].kind == 0) {
                    values[i] = Py_NewRef(f.defaults[i]);
                    continue;
                }
                values[i] = object_of(&parsed[i], &tmp);
                if (values[i] == NULL) {
                    got = -1;
                } else if (f.interned[i] && parsed[i].kind == KIND_STR) {
                    PyObject *kept = PyDict_SetDefault(ids, values[i], values[i]);
                    if (kept == NULL)
                        got = -1;
                    else
                        Py_SETREF(values[i], Py_NewRef(kept));
                }
            }
            if (got > 0)
                record = make_record((PyTypeObject *)cls, names, values, f.count);
            for (Py_ssize_t i = 0; i < f.count; i++)
                Py_XDECREF(values[i]);
            if (got < 0)
                goto done;
            if (got == 0)
                break; /* p is at the line Python reads */
            if (record == NULL || PyList_Append(records, record) < 0) {
                Py_XDECREF(record);
                goto done;
            }
            Py_DECREF(record);
            p = next;
            status = got - 1;
        }
        result = Py_BuildValue("(Oni)", records, (Py_ssize_t)(p - (const char *)data.buf),
                               status);
    }

done:
    Py_XDECREF(records);
    PyMem_RawFree(tmp.data);
    PyBuffer_Release(&data);
    PyBuffer_Release(&kinds);
    PyBuffer_Release(&interned);
    return result;
}

/* ---- scan_records: a list's record lines checked, not made; some fields as columns ---- */

#define TAKE_INT 1    /* an int64 column */
#define TAKE_DIGEST 2 /* 32 raw bytes from 64 lowercase hex digits (zeros when not), and a flag */
#define TAKE_ID 3     /* an int64 column: the string's number among the ids seen */

/* Lowercase hex digits' values; 16 for every other byte. */
static unsigned char hex_values[256];

static void init_hex_values(void)
{
    memset(hex_values, 16, sizeof hex_values);
    for (int c = 0; c < 16; c++)
        hex_values[(unsigned char)HEX[c]] = (unsigned char)c;
}

/* Strings numbered in the order they are added, found by their bytes (open addressing). The
 * bytes are not copied: they live in the caller's buffers for as long as the table. */
typedef struct {
    const char *text;
    size_t len;
    int escaped;
} IdText;

typedef struct {
    IdText *items;  /* by number */
    int64_t count, cap;
    int64_t *slots; /* number + 1, 0 for empty; a power of two of them */
    int64_t mask;
} IdTable;

static uint64_t text_hash(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h;
}

/* The slot of s[0:n]: where its number is, or the empty slot it would take. */
static int64_t *id_slot(const IdTable *t, const char *s, size_t n)
{
    uint64_t i = text_hash(s, n) & (uint64_t)t->mask;
    for (; t->slots[i]; i = (i + 1) & (uint64_t)t->mask) {
        const IdText *it = &t->items[t->slots[i] - 1];
        if (it->len == n && memcmp(it->text, s, n) == 0)
            break;
    }
    return &t->slots[i];
}

/* Number the string s[0:n] next (a string already numbered keeps being found by its first
 * number); -1 when out of memory. */
static int64_t id_add(IdTable *t, const char *s, size_t n, int escaped)
{
    int64_t *slot;
    if (2 * (t->count + 1) > t->mask + 1) {
        int64_t size = t->mask ? 2 * (t->mask + 1) : 64, *slots;
        slots = PyMem_RawCalloc((size_t)size, sizeof *slots);
        if (slots == NULL)
            return -1;
        PyMem_RawFree(t->slots);
        t->slots = slots;
        t->mask = size - 1;
        for (int64_t k = 0; k < t->count; k++) {
            int64_t *at = id_slot(t, t->items[k].text, t->items[k].len);
            if (!*at)
                *at = k + 1;
        }
    }
    if (t->count == t->cap) {
        int64_t cap = t->cap ? 2 * t->cap : 64;
        IdText *items = PyMem_RawRealloc(t->items, (size_t)cap * sizeof *items);
        if (items == NULL)
            return -1;
        t->items = items;
        t->cap = cap;
    }
    t->items[t->count] = (IdText){s, n, escaped};
    slot = id_slot(t, s, n);
    if (!*slot)
        *slot = t->count + 1;
    return t->count++;
}

/* The number of s[0:n], numbering it when new; -1 when out of memory. Raw (escaped) text is
 * compared as it is: the caller merges strings that read the same once unescaped. */
static int64_t id_number(IdTable *t, const char *s, size_t n, int escaped)
{
    if (t->mask) {
        int64_t *slot = id_slot(t, s, n);
        if (*slot)
            return *slot - 1;
    }
    return id_add(t, s, n, escaped);
}

PyDoc_STRVAR(scan_records_doc,
"scan_records(data, pos, names, kinds, defaults, missing, take, ids)\n"
"--\n\n"
"The record lines of one catalog list from data[pos:], checked as decode_records reads them\n"
"but not made into records (with the GIL released): the lines decode_records would make a\n"
"record of, up to the end of the list. take: per field, what to keep of it (0 nothing, 1 its\n"
"integer, 2 its SHA-256 as 32 raw bytes, 3 its string's number: ids, a tuple of str, are\n"
"numbers 0, 1, ... and other strings are numbered after them as they come). Returns (starts,\n"
"pos, status, columns, ids): starts, 64-bit, where each line begins and where the last one\n"
"ended; status as decode_records gives it, 0 at the first line it leaves to Python (pos\n"
"there); columns, per field, its column (bytes: 64-bit integers, or 32-byte digests) or None,\n"
"and for a digest column a second item: bytes, 1 for a well-formed hash; ids, the list of\n"
"strings by number (a string may appear twice, once as given and once as a line wrote it\n"
"with escapes).");

static PyObject *scan_records(PyObject *self, PyObject *args)
{
    Py_buffer data, kinds, take;
    Py_ssize_t pos, end_pos = 0;
    PyObject *names, *defaults, *missing, *known, *result = NULL, *columns = NULL, *ids = NULL;
    Fields f;
    Bytes starts = {0}, cols[MAX_FIELDS], flags[MAX_FIELDS], tmp = {0};
    IdTable table = {0};
    int status = 0, failed = 0;
    static const unsigned char zeros[MAX_FIELDS] = {0};
    Py_buffer no_interned = {.buf = (void *)zeros};
    (void)self;

    memset(cols, 0, sizeof cols);
    memset(flags, 0, sizeof flags);
    if (!PyArg_ParseTuple(args, "y*nO!y*O!Oy*O!:scan_records", &data, &pos, &PyTuple_Type,
                          &names, &kinds, &PyTuple_Type, &defaults, &missing, &take,
                          &PyTuple_Type, &known))
        return NULL;
    no_interned.len = PyTuple_GET_SIZE(names);
    if (get_fields(&f, names, &kinds, &no_interned, defaults, missing, "scan_records") < 0)
        goto done;
    if (take.len != f.count || pos < 0 || pos > data.len) {
        PyErr_SetString(PyExc_ValueError, "scan_records: take does not agree, or pos is out "
                        "of range");
        goto done;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(known); k++) {
        Py_ssize_t len;
        const char *text;
        PyObject *item = PyTuple_GET_ITEM(known, k);
        if (!PyUnicode_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "scan_records: ids must be strings");
            goto done;
        }
        text = PyUnicode_AsUTF8AndSize(item, &len);
        if (text == NULL)
            goto done;
        if (id_add(&table, text, (size_t)len, 0) < 0) { /* numbered as given */
            PyErr_NoMemory();
            goto done;
        }
    }
    {
        const unsigned char *want = take.buf;
        const char *base = data.buf, *p = base + pos, *end = base + data.len;
        int64_t last_id[MAX_FIELDS];
        Value last_text[MAX_FIELDS];
        for (Py_ssize_t i = 0; i < f.count; i++)
            last_id[i] = -1;
        Py_BEGIN_ALLOW_THREADS
        while (status == 0 && !failed) {
            Value v[MAX_FIELDS];
            const char *next = p;
            int64_t at = p - base;
            int got = parse_fields(&f, p, end, &next, v);
            if (got == 0)
                break; /* p is at the line Python reads */
            failed = put(&starts, &at, 8) < 0;
            for (Py_ssize_t i = 0; i < f.count && !failed; i++) {
                if (want[i] == TAKE_INT) {
                    int64_t n = v[i].kind == KIND_INT ? v[i].number : 0;
                    failed = put(&cols[i], &n, 8) < 0;
                } else if (want[i] == TAKE_DIGEST) {
                    unsigned char raw[SHA256_LEN] = {0};
                    unsigned char ok = v[i].kind == KIND_STR && v[i].len == 2 * SHA256_LEN
                                       && !v[i].escaped;
                    const unsigned char *hex = (const unsigned char *)v[i].text;
                    unsigned char bad = 0;
                    for (int k = 0; ok && k < SHA256_LEN; k++) {
                        unsigned char hi = hex_values[hex[2 * k]], lo = hex_values[hex[2 * k + 1]];
                        bad |= hi | lo;
                        raw[k] = (unsigned char)(hi << 4 | (lo & 15));
                    }
                    ok = ok && bad < 16;
                    if (!ok)
                        memset(raw, 0, sizeof raw);
                    failed = put(&cols[i], raw, sizeof raw) < 0 || put(&flags[i], &ok, 1) < 0;
                } else if (want[i] == TAKE_ID) {
                    int64_t n = -1;
                    if (v[i].kind == KIND_STR) {
                        /* the same text as the last record's: the same number, no lookup */
                        if (last_id[i] >= 0 && last_text[i].len == v[i].len
                            && memcmp(last_text[i].text, v[i].text, v[i].len) == 0) {
                            n = last_id[i];
                        } else {
                            n = id_number(&table, v[i].text, v[i].len, v[i].escaped);
                            failed = n < 0;
                            last_id[i] = n;
                            last_text[i] = v[i];
                        }
                    }
                    failed = failed || put(&cols[i], &n, 8) < 0;
                }
            }
            if (failed)
                break;
            p = next;
            status = got - 1;
        }
        if (!failed && status) { /* where the last line ended */
            int64_t at = p - base;
            failed = put(&starts, &at, 8) < 0;
        }
        Py_END_ALLOW_THREADS
        end_pos = p - base;
    }
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    ids = PyList_New(table.count);
    if (ids == NULL)
        goto done;
    for (int64_t k = 0; k < table.count; k++) {
        PyObject *text;
        if (k < PyTuple_GET_SIZE(known)) {
            text = Py_NewRef(PyTuple_GET_ITEM(known, k));
        } else {
            Value v = {KIND_STR, 0, table.items[k].text, table.items[k].len,
                       table.items[k].escaped};
            text = string_of(&v, &tmp);
            if (text == NULL)
                goto done;
        }
        PyList_SET_ITEM(ids, k, text);
    }
    columns = PyTuple_New(f.count);
    if (columns == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < f.count; i++) {
        const unsigned char *want = take.buf;
        PyObject *col;
        if (want[i] == TAKE_DIGEST)
            col = Py_BuildValue("(y#y#)", cols[i].data ? cols[i].data : "",
                                (Py_ssize_t)cols[i].len, flags[i].data ? flags[i].data : "",
                                (Py_ssize_t)flags[i].len);
        else if (want[i])
            col = PyBytes_FromStringAndSize(cols[i].data ? cols[i].data : "",
                                            (Py_ssize_t)cols[i].len);
        else
            col = Py_NewRef(Py_None);
        if (col == NULL)
            goto done;
        PyTuple_SET_ITEM(columns, i, col);
    }
    result = Py_BuildValue("(y#niOO)", starts.data ? starts.data : "", (Py_ssize_t)starts.len,
                           end_pos, status, columns, ids);

done:
    Py_XDECREF(columns);
    Py_XDECREF(ids);
    for (Py_ssize_t i = 0; i < MAX_FIELDS; i++) {
        PyMem_RawFree(cols[i].data);
        PyMem_RawFree(flags[i].data);
    }
    PyMem_RawFree(starts.data);
    PyMem_RawFree(tmp.data);
    PyMem_RawFree(table.items);
    PyMem_RawFree(table.slots);
    PyBuffer_Release(&data);
    PyBuffer_Release(&kinds);
    PyBuffer_Release(&take);
    return result;
}

/* ---- verify: the segments of a container, checked in the chunks read of it ---- */

PyDoc_STRVAR(check_segments_doc,
"check_segments(chunk, pos, offsets, lengths, digests, known, status, first, limit)\n"
"--\n\n"
"Hash segments first, first + 1, ... (offsets and lengths: 64-bit columns, offsets into the\n"
"container, sorted) while each starts before offset limit and lies wholly in chunk, the\n"
"container's bytes from pos on, with the GIL released, and set status[k] (a bytearray) to 1\n"
"where the SHA-256 is digests[k] (32 raw bytes each) and known[k] is 1, to 2 where it is not.\n"
"Returns the index it stopped at.");

/* Columns objs[0..count-1] as views[] (itemsize and writable per column); the count got. */
static int get_columns(PyObject **objs, Py_buffer *views, const char *const *what,
                       const Py_ssize_t *itemsize, const int *writable, int count)
{
    int got = 0;
    while (got < count
           && get_column(objs[got], &views[got], what[got], itemsize[got], writable[got]) == 0)
        got++;
    return got;
}

static PyObject *check_segments(PyObject *self, PyObject *args)
{
    enum { OFF, LEN, DIG, KNOWN, STATUS, COLUMNS };
    static const char *const what[] = {"offsets", "lengths", "digests", "known", "status"};
    static const Py_ssize_t itemsize[] = {8, 8, 1, 1, 1};
    static const int writable[] = {0, 0, 0, 0, 1};
    Py_buffer chunk, b[COLUMNS];
    PyObject *o[COLUMNS], *result = NULL;
    long long pos, limit;
    Py_ssize_t first, stop, n;
    int got, failed = 0;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*LOOOOOnL:check_segments", &chunk, &pos, &o[OFF], &o[LEN],
                          &o[DIG], &o[KNOWN], &o[STATUS], &first, &limit))
        return NULL;
    got = get_columns(o, b, what, itemsize, writable, COLUMNS);
    if (got < COLUMNS)
        goto done;
    n = b[OFF].len / 8;
    if (b[LEN].len / 8 != n || b[DIG].len != n * SHA256_LEN || b[KNOWN].len != n
        || b[STATUS].len != n || first < 0 || pos < 0 || pos > LLONG_MAX - chunk.len) {
        PyErr_SetString(PyExc_ValueError, "check_segments: bad columns, first or pos");
        goto done;
    }
    {
        const int64_t *off = b[OFF].buf, *len = b[LEN].buf;
        const unsigned char *want = b[DIG].buf, *known = b[KNOWN].buf, *base = chunk.buf;
        unsigned char *status = b[STATUS].buf;
        int64_t end = pos + chunk.len;
        Py_BEGIN_ALLOW_THREADS
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        failed = ctx == NULL;
        for (stop = first; stop < n && !failed; stop++) {
            unsigned char raw[SHA256_LEN];
            if (off[stop] < pos || off[stop] >= limit || len[stop] < 0
                || off[stop] > end - len[stop])
                break;
            failed = !EVP_DigestInit_ex(ctx, sha256_md, NULL)
                     || !EVP_DigestUpdate(ctx, base + (off[stop] - pos), (size_t)len[stop])
                     || !EVP_DigestFinal_ex(ctx, raw, NULL);
            status[stop] = known[stop] && !memcmp(raw, want + stop * SHA256_LEN, SHA256_LEN)
                           ? 1 : 2;
        }
        EVP_MD_CTX_free(ctx);
        Py_END_ALLOW_THREADS
    }
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not compute a SHA-256");
        goto done;
    }
    result = PyLong_FromSsize_t(stop);

done:
    while (got > 0)
        PyBuffer_Release(&b[--got]);
    PyBuffer_Release(&chunk);
    return result;
}

PyDoc_STRVAR(group_segments_doc,
"group_segments(groups, offsets, lengths, count)\n"
"--\n\n"
"The segments (64-bit columns: each one's group, a container's number in 0..count-1, or\n"
"another number for none; its offset and length) in order of group, then offset, then\n"
"length, then index. Returns (order, starts, ends): order, 64-bit indices, or None when\n"
"the segments are in that order already; starts, 64-bit, count + 1 of them: group g's\n"
"segments are order[starts[g]:starts[g + 1]] (segments of no group come last); ends, 64-bit,\n"
"per group: n when its segments cover bytes 0..n-1 each exactly once, else -1.");

typedef struct {
    int64_t offset, length, index;
} Place;

static int by_place(const void *pa, const void *pb)
{
    const Place *a = pa, *b = pb;
    if (a->offset != b->offset)
        return a->offset < b->offset ? -1 : 1;
    if (a->length != b->length)
        return a->length < b->length ? -1 : 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

static PyObject *group_segments(PyObject *self, PyObject *args)
{
    enum { GRP, OFF, LEN, COLUMNS };
    static const char *const what[] = {"groups", "offsets", "lengths"};
    static const Py_ssize_t itemsize[] = {8, 8, 8};
    static const int writable[] = {0, 0, 0};
    Py_buffer b[COLUMNS];
    PyObject *o[COLUMNS], *order = NULL, *starts = NULL, *ends = NULL, *result = NULL;
    Py_ssize_t count, n;
    int got;
    (void)self;

    if (!PyArg_ParseTuple(args, "OOOn:group_segments", &o[GRP], &o[OFF], &o[LEN], &count))
        return NULL;
    got = get_columns(o, b, what, itemsize, writable, COLUMNS);
    if (got < COLUMNS)
        goto done;
    n = b[GRP].len / 8;
    if (b[OFF].len / 8 != n || b[LEN].len / 8 != n || count < 0) {
        PyErr_SetString(PyExc_ValueError, "group_segments: the columns differ in length");
        goto done;
    }
    starts = PyBytes_FromStringAndSize(NULL, (count + 1) * 8);
    if (starts == NULL)
        goto done;
    {
        const int64_t *grp = b[GRP].buf, *off = b[OFF].buf, *len = b[LEN].buf;
        int64_t *first = (int64_t *)PyBytes_AS_STRING(starts);
        int sorted = 1;
        memset(first, 0, (size_t)(count + 1) * 8);
        /* counting sort by group (stable), segments of no group last */
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t g = grp[i] >= 0 && grp[i] < count ? grp[i] : count;
            if (g < count)
                first[g + 1]++;
            if (i > 0) {
                int64_t h = grp[i - 1] >= 0 && grp[i - 1] < count ? grp[i - 1] : count;
                if (h > g || (h == g && g < count
                              && (off[i - 1] > off[i]
                                  || (off[i - 1] == off[i] && len[i - 1] > len[i]))))
                    sorted = 0;
            }
        }
        for (Py_ssize_t g = 0; g < count; g++)
            first[g + 1] += first[g];
        if (!sorted) {
            int64_t *at, *idx;
            Place *places;
            order = PyBytes_FromStringAndSize(NULL, n * 8);
            at = PyMem_RawMalloc((size_t)(count + 1) * 8);
            places = PyMem_RawMalloc(n ? (size_t)n * sizeof(Place) : 1);
            if (order == NULL || at == NULL || places == NULL) {
                PyMem_RawFree(at);
                PyMem_RawFree(places);
                if (order != NULL)
                    PyErr_NoMemory();
                goto done;
            }
            idx = (int64_t *)PyBytes_AS_STRING(order);
            memcpy(at, first, (size_t)(count + 1) * 8);
            for (Py_ssize_t i = 0; i < n; i++) {
                int64_t g = grp[i] >= 0 && grp[i] < count ? grp[i] : count;
                places[at[g]++] = (Place){off[i], len[i], i};
            }
            for (Py_ssize_t g = 0; g < count; g++)
                qsort(places + first[g], (size_t)(first[g + 1] - first[g]), sizeof(Place),
                      by_place);
            for (Py_ssize_t i = 0; i < n; i++)
                idx[i] = places[i].index;
            PyMem_RawFree(at);
            PyMem_RawFree(places);
        }
        ends = PyBytes_FromStringAndSize(NULL, count * 8);
        if (ends == NULL)
            goto done;
        {
            const int64_t *idx = order ? (const int64_t *)PyBytes_AS_STRING(order) : NULL;
            int64_t *tile = (int64_t *)PyBytes_AS_STRING(ends);
            for (Py_ssize_t g = 0; g < count; g++) {
                int64_t at = 0;
                for (int64_t k = first[g]; k < first[g + 1]; k++) {
                    int64_t i = idx ? idx[k] : k;
                    if (len[i] == 0)
                        continue;
                    if (off[i] != at || len[i] < 0 || len[i] > INT64_MAX - at) {
                        at = -1;
                        break;
                    }
                    at += len[i];
                }
                tile[g] = at;
            }
        }
    }
    result = Py_BuildValue("(OOO)", order ? order : Py_None, starts, ends);

done:
    Py_XDECREF(order);
    Py_XDECREF(starts);
    Py_XDECREF(ends);
    while (got > 0)
        PyBuffer_Release(&b[--got]);
    return result;
}

static PyMethodDef methods[] = {
    {"check_segments", check_segments, METH_VARARGS, check_segments_doc},
    {"group_segments", group_segments, METH_VARARGS, group_segments_doc},
    {"scan_records", scan_records, METH_VARARGS, scan_records_doc},
    {"decode_records", decode_records, METH_VARARGS, decode_records_doc},
    {"copy_single_segment_digests", copy_single_segment_digests, METH_VARARGS,
     copy_single_segment_digests_doc},
    {"layout_fit", layout_fit, METH_VARARGS, layout_fit_doc},
    {"digit_total", digit_total, METH_O, digit_total_doc},
    {"json_strings_size", json_strings_size, METH_VARARGS, json_strings_size_doc},
    {"encode_files", encode_files, METH_VARARGS, encode_files_doc},
    {"encode_segments", encode_segments, METH_VARARGS, encode_segments_doc},
    {"list_dir", list_dir, METH_VARARGS, list_dir_doc},
    {"iso_times", iso_times, METH_VARARGS, iso_times_doc},
    {"file_ids", file_ids, METH_VARARGS, file_ids_doc},
    {"read_whole_files", read_whole_files, METH_VARARGS, read_whole_files_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    (void)module;
    if (sha256_md != NULL)
        return 0;
    init_hex_values();
    empty_tuple = PyTuple_New(0);
    if (empty_tuple == NULL)
        return -1;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    /* fetched once: EVP_sha256() would be looked up in the providers at every init */
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
    sha1_md = EVP_MD_fetch(NULL, "SHA1", NULL);
#else
    sha256_md = (EVP_MD *)EVP_sha256();
    sha1_md = (EVP_MD *)EVP_sha1();
#endif
    if (sha256_md == NULL || sha1_md == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA-256 or no SHA-1");
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ltoflow._native",
    .m_doc = "The loops ltoflow runs once per file or record, in C (optional).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModuleDef_Init(&module_def);
}
