/* Byte planes of fixed-size elements, both ways, for the bgzstd codec (ckpt/codecs/planes.py).
 *
 * split(data, out, itemsize): byte i of element j of `data` goes to out[i * n + j].
 * join(planes, out, itemsize): the inverse, from `itemsize` planes of n bytes each.
 *
 * Plain loops the compiler vectorizes (gcc -O3 turns them into byte shuffles): on this
 * project's 2-core AMD EPYC machine, 16 MiB of float32 join in 0.96 ms and split in 1.6 ms,
 * against 4.7 ms and 3.2-3.6 ms for numpy's strided copies and word shifts. numpy's copies
 * move one byte per iteration; no library on PyPI exposes a byte (un)shuffle into a given
 * buffer (blosc2's runs inside its own frame format only). The format is the same either way:
 * planes.py falls back to numpy when this module is not built.
 *
 * The GIL is released while bytes move: decoding runs on a pool of threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define SPLIT(K)                                                                  \
    static void split##K(const uint8_t *restrict in, uint8_t *restrict out, size_t n) { \
        for (size_t j = 0; j < n; j++)                                            \
            for (size_t i = 0; i < K; i++) out[i * n + j] = in[j * K + i];        \
    }
#define JOIN(K)                                                                   \
    static void join##K(uint8_t *const *planes, uint8_t *restrict out, size_t n) {  \
        const uint8_t *restrict p[K];                                             \
        for (size_t i = 0; i < K; i++) p[i] = planes[i];                          \
        for (size_t j = 0; j < n; j++)                                            \
            for (size_t i = 0; i < K; i++) out[j * K + i] = p[i][j];              \
    }

/* Element sizes with loops of their own (unrolled by the compiler); others take the generic one. */
SPLIT(2)
SPLIT(4)
SPLIT(8)

static void join2(uint8_t *const *planes, uint8_t *restrict out, size_t n) {
    const uint8_t *restrict a = planes[0], *restrict b = planes[1];
    for (size_t j = 0; j < n; j++) {
        out[2 * j] = a[j];
        out[2 * j + 1] = b[j];
    }
}
static void join4(uint8_t *const *planes, uint8_t *restrict out, size_t n) {
    const uint8_t *restrict a = planes[0], *restrict b = planes[1], *restrict c = planes[2], *restrict d = planes[3];
    for (size_t j = 0; j < n; j++) {
        out[4 * j] = a[j];
        out[4 * j + 1] = b[j];
        out[4 * j + 2] = c[j];
        out[4 * j + 3] = d[j];
    }
}
JOIN(8)

static void split_any(const uint8_t *restrict in, uint8_t *restrict out, size_t n, size_t k) {
    for (size_t j = 0; j < n; j++)
        for (size_t i = 0; i < k; i++) out[i * n + j] = in[j * k + i];
}

static void join_any(uint8_t *const *planes, uint8_t *restrict out, size_t n, size_t k) {
    for (size_t j = 0; j < n; j++)
        for (size_t i = 0; i < k; i++) out[j * k + i] = planes[i][j];
}

#define MAX_ITEMSIZE 64

static int overlap(const void *a, Py_ssize_t alen, const void *b, Py_ssize_t blen) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return alen > 0 && blen > 0 && x < y + (uintptr_t)blen && y < x + (uintptr_t)alen;
}

static PyObject *split(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "y*w*n", &data, &out, &k)) return NULL;
    PyObject *result = NULL;
    if (k < 1 || k > MAX_ITEMSIZE || data.len % k || out.len != data.len) {
        PyErr_Format(PyExc_ValueError, "split: %zd bytes into %zd of itemsize %zd", data.len, out.len, k);
        goto done;
    }
    if (overlap(data.buf, data.len, out.buf, out.len)) {
        PyErr_SetString(PyExc_ValueError, "split: data and out overlap");
        goto done;
    }
    size_t n = (size_t)(data.len / k);
    const uint8_t *in = data.buf;
    uint8_t *to = out.buf;
    Py_BEGIN_ALLOW_THREADS switch (k) {
    case 2: split2(in, to, n); break;
    case 4: split4(in, to, n); break;
    case 8: split8(in, to, n); break;
    default: split_any(in, to, n, (size_t)k);
    }
    Py_END_ALLOW_THREADS result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *join(PyObject *self, PyObject *args) {
    PyObject *seq;
    Py_buffer out;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "Ow*n", &seq, &out, &k)) return NULL;
    PyObject *result = NULL, *fast = NULL;
    Py_buffer views[MAX_ITEMSIZE];
    uint8_t *planes[MAX_ITEMSIZE];
    Py_ssize_t held = 0;
    if (k < 1 || k > MAX_ITEMSIZE || out.len % k) {
        PyErr_Format(PyExc_ValueError, "join: %zd bytes of itemsize %zd", out.len, k);
        goto done;
    }
    fast = PySequence_Fast(seq, "join: planes must be a sequence");
    if (fast == NULL) goto done;
    if (PySequence_Fast_GET_SIZE(fast) != k) {
        PyErr_Format(PyExc_ValueError, "join: %zd planes for itemsize %zd", PySequence_Fast_GET_SIZE(fast), k);
        goto done;
    }
    Py_ssize_t n = out.len / k;
    for (; held < k; held++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, held), &views[held], PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (views[held].len != n) {
            PyErr_Format(PyExc_ValueError, "join: plane %zd has %zd bytes, expected %zd", held, views[held].len, n);
            held++;
            goto done;
        }
        planes[held] = views[held].buf;
        if (overlap(views[held].buf, n, out.buf, out.len)) {
            PyErr_Format(PyExc_ValueError, "join: plane %zd overlaps out", held);
            held++;
            goto done;
        }
    }
    uint8_t *to = out.buf;
    Py_BEGIN_ALLOW_THREADS switch (k) {
    case 2: join2(planes, to, (size_t)n); break;
    case 4: join4(planes, to, (size_t)n); break;
    case 8: join8(planes, to, (size_t)n); break;
    default: join_any(planes, to, (size_t)n, (size_t)k);
    }
    Py_END_ALLOW_THREADS result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    Py_XDECREF(fast);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS, "split(data, out, itemsize): byte i of element j into out[i * n + j]"},
    {"join", join, METH_VARARGS, "join(planes, out, itemsize): the inverse of split, from itemsize planes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", "Byte planes of fixed-size elements.", -1, methods};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
