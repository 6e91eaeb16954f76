/* ltoflow._native: the per-file loop of a backup of many small files, in C.
 *
 * One call opens, reads, checks and hashes a run of whole small files with the GIL released,
 * where the same loop in Python costs ~20 us a file on top of the system calls. It only takes
 * the plain case: the moment a file is anything else (it will not open, reads short, changed
 * since the scan, or its path needs the component-by-component walk), the call stops before
 * it and returns what it did; the Python reader then handles that file with its own checks and
 * error messages. So this module decides nothing; it is only a faster way to do what
 * `SourceCursor.fill` does for such files.
 *
 * Build: an optional extension (see setup.py). Without it ltoflow runs the same loop in
 * Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <openssl/evp.h>

#define SHA256_LEN 32
/* Files per call at most: the caller loops; this bounds the call's hex buffer (512 KiB). */
#define MAX_RUN 8192
/* Runs of at least this many files are read by two threads. */
#define SPLIT_MIN 64

static EVP_MD *sha256_md, *sha1_md;
static int have_openat2 = 1; /* cleared the first time the kernel says ENOSYS */

static const int FILE_FLAGS = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK;

/* A directory under the root, opened O_PATH with no symlink followed and never above the
 * root; -1 with errno set otherwise. */
static int open_dir_beneath(int root_fd, const char *dir)
{
    struct open_how how;
    long fd;
    if (!have_openat2) {
        errno = ENOSYS;
        return -1;
    }
    memset(&how, 0, sizeof how);
    how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    fd = syscall(SYS_openat2, root_fd, dir, &how, sizeof how);
    if (fd < 0 && errno == ENOSYS)
        have_openat2 = 0;
    return (int)fd;
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

typedef struct {
    /* inputs, all borrowed from Py_buffers */
    int root_fd;
    const unsigned char *paths; /* every file's path relative to the root, end to end */
    const uint64_t *path_ends;  /* path i is paths[path_ends[i-1] : path_ends[i]] */
    const int64_t *seg_file, *seg_length, *seg_container, *file_starts, *sizes, *mtimes;
    Py_ssize_t n_files;
    Py_ssize_t seg, seg_end;    /* the segments to go through, in order */
    Py_ssize_t stop_file;       /* the first file not to take (the caller's exceptions) */
    int64_t container;          /* only segments of this container; -1: any */
    unsigned char *buf;
    Py_ssize_t pos, cap;
    /* outputs */
    char *hex;                  /* 64 hex characters per segment done */
    Py_ssize_t done;
} Run;

/* Whether segment k is a whole file that this loop may take, and fits. */
static int takes(const Run *r, Py_ssize_t k, Py_ssize_t pos)
{
    int64_t f = r->seg_file[k];
    if (f < 0 || f >= r->n_files || f >= r->stop_file)
        return 0;
    if (r->file_starts[f + 1] - r->file_starts[f] != 1)
        return 0;
    if (r->container >= 0 && r->seg_container[k] != r->container)
        return 0;
    return r->seg_length[k] <= r->cap - pos && r->seg_length[k] == r->sizes[f];
}

/* Segments [first, end) of a run that `takes` accepted, the first at `pos` in the buffer. */
typedef struct {
    const Run *r;
    Py_ssize_t first, end, pos;
    char *hex; /* 64 hex characters for each segment done */
    Py_ssize_t done;
} Part;

/* Read, check and hash a part's files in order; stop at the first that fails any check. */
static void *read_part(void *arg)
{
    Part *p = arg;
    const Run *r = p->r;
    char path[PATH_MAX];
    char dir[PATH_MAX];
    size_t dir_len = (size_t)-1; /* no directory open yet */
    int dir_fd = -1;
    unsigned char digest[SHA256_LEN];
    unsigned int digest_len = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    Py_ssize_t pos = p->pos;

    if (ctx == NULL)
        return NULL;
    for (Py_ssize_t k = p->first; k < p->end; k++) {
        int64_t f = r->seg_file[k];
        int64_t length = r->seg_length[k];
        uint64_t start = f ? r->path_ends[f - 1] : 0, end = r->path_ends[f];
        size_t len = (size_t)(end - start);
        const char *slash;
        size_t head;
        int at, fd;
        struct stat st;
        int ok;

        if (len == 0 || len >= sizeof path)
            break;
        memcpy(path, r->paths + start, len);
        path[len] = '\0';
        if (memchr(path, '\0', len) != NULL)
            break;
        slash = memrchr(path, '/', len);
        head = slash ? (size_t)(slash - path) : 0;
        if (head == 0) {
            at = r->root_fd;
        } else {
            if (head != dir_len || memcmp(dir, path, head) != 0) {
                if (dir_fd >= 0)
                    close(dir_fd);
                memcpy(dir, path, head);
                dir[head] = '\0';
                dir_len = (size_t)-1;
                dir_fd = open_dir_beneath(r->root_fd, dir);
                if (dir_fd < 0)
                    break;
                dir_len = head;
            }
            at = dir_fd;
        }
        fd = openat(at, slash ? slash + 1 : path, FILE_FLAGS);
        if (fd < 0)
            break;
        ok = read_all(fd, r->buf + pos, length) == 0 && fstat(fd, &st) == 0
             && S_ISREG(st.st_mode) && st.st_nlink > 0 && st.st_size == r->sizes[f]
             && (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec == r->mtimes[f];
        close(fd);
        if (!ok)
            break;
        if (!EVP_DigestInit_ex(ctx, sha256_md, NULL)
            || !EVP_DigestUpdate(ctx, r->buf + pos, (size_t)length)
            || !EVP_DigestFinal_ex(ctx, digest, &digest_len) || digest_len != SHA256_LEN)
            break;
        {
            char *out = p->hex + 64 * p->done;
            for (int b = 0; b < SHA256_LEN; b++) {
                out[2 * b] = HEX[digest[b] >> 4];
                out[2 * b + 1] = HEX[digest[b] & 15];
            }
        }
        pos += length;
        p->done++;
    }
    if (dir_fd >= 0)
        close(dir_fd);
    EVP_MD_CTX_free(ctx);
    return NULL;
}

/* The run, with the GIL released: nothing here touches a Python object. A run of at least
 * SPLIT_MIN files is shared with a second thread, which takes its second half (the system
 * calls, not the hashing, are most of the time, and they run on both cores). */
static void run_files(Run *r)
{
    Py_ssize_t k = r->seg, pos = r->pos;
    Part a, b;
    pthread_t helper;

    while (k < r->seg_end && takes(r, k, pos)) {
        pos += r->seg_length[k];
        k++;
    }
    a = (Part){r, r->seg, k, r->pos, r->hex, 0};
    if (k - r->seg >= SPLIT_MIN) {
        Py_ssize_t mid = r->seg + (k - r->seg) / 2, mid_pos = r->pos;
        for (Py_ssize_t i = r->seg; i < mid; i++)
            mid_pos += r->seg_length[i];
        b = (Part){r, mid, k, mid_pos, r->hex + 64 * (mid - r->seg), 0};
        if (pthread_create(&helper, NULL, read_part, &b) == 0) {
            a.end = mid;
            read_part(&a);
            pthread_join(helper, NULL);
            /* the second half counts only if the first is whole */
            r->done = a.done == mid - r->seg ? a.done + b.done : a.done;
            return;
        }
    }
    read_part(&a);
    r->done = a.done;
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
"still a regular file of the scanned size and mtime). The columns are the plan's and the\n"
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
        if (r.n_files && ((const uint64_t *)b_ends.buf)[r.n_files - 1] > (uint64_t)b_paths.len) {
            PyErr_SetString(PyExc_ValueError, "path_ends run past the paths");
            goto done;
        }
    }
    r.buf = b_buf.buf;
    r.cap = b_buf.len;
    if (r.pos < 0 || r.pos > r.cap) {
        PyErr_SetString(PyExc_IndexError, "pos out of the buffer");
        goto done;
    }
    if (r.seg_end - r.seg > MAX_RUN)
        r.seg_end = r.seg + MAX_RUN;
    r.hex = PyMem_RawMalloc(64 * (size_t)(r.seg_end - r.seg) + 1);
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
        const uint64_t *ends = b_ends.buf;
        const int64_t *idx = b_idx.buf;
        const unsigned char *paths = b_paths.buf;
        Py_ssize_t n_paths = b_ends.len / 8, n = b_idx.len / 8;
        result = PyList_New(n);
        if (result == NULL)
            goto done;
        for (Py_ssize_t k = 0; k < n; k++) {
            int64_t i = idx[k];
            uint64_t start, end;
            unsigned char md[EVP_MAX_MD_SIZE];
            unsigned int md_len = 0;
            char x[40], id[36];
            PyObject *s;
            if (i < 0 || i >= n_paths) {
                PyErr_SetString(PyExc_IndexError, "file index out of range");
                Py_CLEAR(result);
                goto done;
            }
            start = i ? ends[i - 1] : 0;
            end = ends[i];
            if (end < start || end > (uint64_t)b_paths.len) {
                PyErr_SetString(PyExc_ValueError, "path_ends run past the paths");
                Py_CLEAR(result);
                goto done;
            }
            if (!EVP_DigestInit_ex(ctx, sha1_md, NULL) || !EVP_DigestUpdate(ctx, ns.buf, 16)
                || !EVP_DigestUpdate(ctx, paths + start, (size_t)(end - start))
                || !EVP_DigestFinal_ex(ctx, md, &md_len) || md_len < 16) {
                PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to hash");
                Py_CLEAR(result);
                goto done;
            }
            for (int b = 0; b < 20; b++) {
                x[2 * b] = HEX[md[b] >> 4];
                x[2 * b + 1] = HEX[md[b] & 15];
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

static PyMethodDef methods[] = {
    {"file_ids", file_ids, METH_VARARGS, file_ids_doc},
    {"read_whole_files", read_whole_files, METH_VARARGS, read_whole_files_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    (void)module;
    if (sha256_md != NULL)
        return 0;
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
    .m_doc = "The per-file loop of a backup of many small files, in C (optional).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModuleDef_Init(&module_def);
}
