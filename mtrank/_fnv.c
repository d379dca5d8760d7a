/* mtrank._fnv: FNV-1a 64-bit, the project's one hash of feature values (``mtrank.encoding`` wraps it for the
 * trainer and the service alike; the service's experiment arms use ``text``).
 *
 * ucs4(points, width, out) -> None
 *     points: a C-contiguous buffer of n * width uint32 code points (a numpy unicode array [n] viewed as uint32:
 *     each string zero-padded to width); out: a writable C-contiguous buffer of n uint64. Each string, its code
 *     points up to the last non-zero one (numpy's own length of a unicode element), is hashed over its UTF-8 bytes;
 *     a lone surrogate (U+D800..U+DFFF, which JSON's \ud800 escape can produce) over its 3-byte "surrogatepass"
 *     form, so every Python string has one defined byte form.
 * decimal(values, out) -> None
 *     values: a C-contiguous buffer of n int64; out: n uint64: the hash of each value's decimal string,
 *     str(int(v)) ("-" then the digits, no leading zeros), without making the strings.
 * text(data) -> int
 *     The hash of one bytes-like object (a key the caller encoded).
 *
 * The buffers' item sizes are checked (8 / 4 / 8 bytes) and their lengths against each other; the element types
 * are the caller's contract (``mtrank.encoding`` passes int64, uint32 and uint64 numpy arrays). Arrays of more
 * than GIL_FREE_FROM values (a training column) are hashed with the GIL released; a request's few hundred are not:
 * taking the GIL back costs the event loop more than their hashing (docs/benchmarks.md).
 *
 * Tests: tests/test_encoding.py (FNV's published vectors, a pure-Python reference over random, negative, extreme,
 * non-ASCII and surrogate values).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define FNV_OFFSET 0xCBF29CE484222325ULL
#define FNV_PRIME 0x100000001B3ULL
#define GIL_FREE_FROM 65536

/* `call` with the GIL released when it covers more than GIL_FREE_FROM values, else holding it. */
#define MAYBE_WITHOUT_GIL(n, call)                                                                                   \
    do {                                                                                                             \
        if ((n) > GIL_FREE_FROM) {                                                                                   \
            Py_BEGIN_ALLOW_THREADS call;                                                                             \
            Py_END_ALLOW_THREADS                                                                                     \
        } else {                                                                                                     \
            call;                                                                                                    \
        }                                                                                                            \
    } while (0)

static inline uint64_t fnv_byte(uint64_t h, unsigned char b) { return (h ^ b) * FNV_PRIME; }

/* One code point's UTF-8 bytes (surrogates encoded like any other code point below U+10000) into the hash. */
static inline uint64_t fnv_point(uint64_t h, uint32_t c) {
    if (c < 0x80)
        return fnv_byte(h, (unsigned char)c);
    if (c < 0x800) {
        h = fnv_byte(h, (unsigned char)(0xC0 | (c >> 6)));
        return fnv_byte(h, (unsigned char)(0x80 | (c & 0x3F)));
    }
    if (c < 0x10000) {
        h = fnv_byte(h, (unsigned char)(0xE0 | (c >> 12)));
        h = fnv_byte(h, (unsigned char)(0x80 | ((c >> 6) & 0x3F)));
        return fnv_byte(h, (unsigned char)(0x80 | (c & 0x3F)));
    }
    h = fnv_byte(h, (unsigned char)(0xF0 | (c >> 18)));
    h = fnv_byte(h, (unsigned char)(0x80 | ((c >> 12) & 0x3F)));
    h = fnv_byte(h, (unsigned char)(0x80 | ((c >> 6) & 0x3F)));
    return fnv_byte(h, (unsigned char)(0x80 | (c & 0x3F)));
}

static void hash_ucs4(const uint32_t *points, Py_ssize_t width, Py_ssize_t n, uint64_t *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint32_t *s = points + i * width;
        Py_ssize_t len = width;
        while (len > 0 && s[len - 1] == 0)
            len--;
        uint64_t h = FNV_OFFSET;
        for (Py_ssize_t j = 0; j < len; j++)
            h = fnv_point(h, s[j]);
        out[i] = h;
    }
}

static void hash_decimal(const int64_t *values, Py_ssize_t n, uint64_t *out) {
    char digits[20];
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t v = values[i];
        uint64_t h = FNV_OFFSET;
        uint64_t a = v < 0 ? (uint64_t)(-(v + 1)) + 1 : (uint64_t)v; /* |v|, also for INT64_MIN */
        if (v < 0)
            h = fnv_byte(h, '-');
        int k = 0;
        do {
            digits[k++] = (char)('0' + a % 10);
            a /= 10;
        } while (a);
        while (k)
            h = fnv_byte(h, (unsigned char)digits[--k]);
        out[i] = h;
    }
}

/* The buffer of `obj`, C-contiguous (writable when asked), with items of `itemsize` bytes; 0 with an error set. */
static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable, const char *fn, const char *arg) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return 0;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s %s: items of %zd bytes expected, got %zd", fn, arg, itemsize, view->itemsize);
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

/* A hashing call's input (items of `in_size` bytes) and output (uint64) buffers; 0 with an error set. */
static int get_in_out(PyObject *in_obj, Py_buffer *in, Py_ssize_t in_size, PyObject *out_obj, Py_buffer *out,
                      const char *fn) {
    if (!get_buffer(in_obj, in, in_size, 0, fn, "input"))
        return 0;
    if (!get_buffer(out_obj, out, 8, 1, fn, "out")) {
        PyBuffer_Release(in);
        return 0;
    }
    return 1;
}

/* Releases both buffers: None, or NULL when the call set an error. */
static PyObject *done(Py_buffer *in, Py_buffer *out) {
    PyBuffer_Release(in);
    PyBuffer_Release(out);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *ucs4(PyObject *self, PyObject *args) {
    PyObject *points_obj, *out_obj;
    Py_ssize_t width;
    Py_buffer points, out;
    if (!PyArg_ParseTuple(args, "OnO:ucs4", &points_obj, &width, &out_obj))
        return NULL;
    if (width < 1)
        return PyErr_Format(PyExc_ValueError, "ucs4: width must be >= 1, got %zd", width);
    if (!get_in_out(points_obj, &points, 4, out_obj, &out, "ucs4"))
        return NULL;
    Py_ssize_t n = out.len / 8;
    if (points.len / 4 != n * width)
        PyErr_Format(PyExc_ValueError, "ucs4: %zd code points for %zd strings of width %zd", points.len / 4, n, width);
    else
        MAYBE_WITHOUT_GIL(n, hash_ucs4((const uint32_t *)points.buf, width, n, (uint64_t *)out.buf));
    return done(&points, &out);
}

static PyObject *decimal(PyObject *self, PyObject *args) {
    PyObject *values_obj, *out_obj;
    Py_buffer values, out;
    if (!PyArg_ParseTuple(args, "OO:decimal", &values_obj, &out_obj))
        return NULL;
    if (!get_in_out(values_obj, &values, 8, out_obj, &out, "decimal"))
        return NULL;
    Py_ssize_t n = values.len / 8;
    if (out.len / 8 != n)
        PyErr_Format(PyExc_ValueError, "decimal: %zd values, room for %zd hashes", n, out.len / 8);
    else
        MAYBE_WITHOUT_GIL(n, hash_decimal((const int64_t *)values.buf, n, (uint64_t *)out.buf));
    return done(&values, &out);
}

static PyObject *text(PyObject *self, PyObject *arg) {
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0)
        return NULL;
    uint64_t h = FNV_OFFSET;
    const unsigned char *p = (const unsigned char *)data.buf;
    for (Py_ssize_t i = 0; i < data.len; i++)
        h = fnv_byte(h, p[i]);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

static PyMethodDef methods[] = {
    {"ucs4", ucs4, METH_VARARGS, "ucs4(points, width, out): FNV-1a 64 of each zero-padded UCS-4 string's UTF-8 bytes."},
    {"decimal", decimal, METH_VARARGS, "decimal(values, out): FNV-1a 64 of each int64's decimal string."},
    {"text", text, METH_O, "text(data) -> int: FNV-1a 64 of one bytes-like object."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fnv", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fnv(void) { return PyModule_Create(&module); }
