/* Compiled inner loop of beam_pipeline.fast_header._elements (optional; pure Python otherwise).
 *
 * walk() advances over the plain elements of an explicit VR little endian dataset -- known VR,
 * ascending tag below (7FE0,0008), defined length, ending inside the window, the file and the
 * dataset -- and appends the raw bytes of the needed non-sequence ones to `collected`, exactly as
 * the Python loop does for them. At the first element that is anything else (a needed sequence,
 * an undefined length, the Specific Character Set, a value beyond the window, an odd tag or VR, the
 * end of the window or of the dataset) it returns, and the Python loop handles that element with
 * every check it has. It never declines or raises for content: deciding stays in Python.
 *
 * walk(data, base, pos, stop, prev, table, collected, last_end, vr_header, charset)
 *     -> (pos, prev, walked, last_end)
 *
 * data:      bytes of the window, starting at file offset `base`
 * stop:      min(dataset end, file size): no element may end beyond it
 * table:     dict tag -> (attribute, item table or None), as fast_header._table builds it
 * vr_header: 65536 bytes, header size (8 or 12, 0 = unknown VR) by the VR's two bytes (little endian)
 * charset:   the (0008,0005) tag, always left to Python
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FIRST_STOP 0x7FE00008u
#define UNDEFINED 0xFFFFFFFFu
#define MAX_OFFSET (1LL << 56)  /* far beyond any file; keeps pos + 12 + 2^32 inside long long */

static inline uint16_t u16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* 1 and *out set, or 0 with a Python error (-1 is a valid value: PyErr_Occurred tells). */
static int as_long_long(PyObject *obj, long long *out) {
    *out = PyLong_AsLongLong(obj);
    return !(*out == -1 && PyErr_Occurred());
}

static PyObject *walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "walk() takes 10 arguments");
        return NULL;
    }
    PyObject *data_obj = args[0], *table = args[5], *collected = args[6], *vr_obj = args[8];
    if (!PyBytes_Check(data_obj) || !PyDict_Check(table) || !PyList_Check(collected)
        || !PyBytes_Check(vr_obj) || PyBytes_GET_SIZE(vr_obj) != 65536) {
        PyErr_SetString(PyExc_TypeError, "walk(): bad argument types");
        return NULL;
    }
    long long base, pos, stop, prev, last_end, charset;
    if (!as_long_long(args[1], &base) || !as_long_long(args[2], &pos) || !as_long_long(args[3], &stop)
        || !as_long_long(args[4], &prev) || !as_long_long(args[7], &last_end)
        || !as_long_long(args[9], &charset))
        return NULL;
    if (base < 0 || pos < base || base > MAX_OFFSET || pos > MAX_OFFSET || stop > MAX_OFFSET)
        return Py_BuildValue("(LLiL)", pos, prev, 0, last_end);  /* no offset arithmetic can overflow below */

    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(data_obj);
    const unsigned char *vr_header = (const unsigned char *)PyBytes_AS_STRING(vr_obj);
    long long data_end = base + PyBytes_GET_SIZE(data_obj);
    long long walked = 0;

    while (pos < stop && pos + 12 <= data_end && pos >= base) {
        const unsigned char *p = data + (pos - base);
        uint32_t group = u16(p), elem = u16(p + 2);
        uint32_t tag = group << 16 | elem;
        if (tag >= FIRST_STOP || group == 0 || (long long)tag <= prev) break;
        int header_size = vr_header[u16(p + 4)];
        if (header_size == 0) break;
        uint32_t length = header_size == 12 ? u32(p + 8) : u16(p + 6);
        if (length == UNDEFINED) break;
        long long start = pos + header_size, end = start + (long long)length;
        if (end > stop) break;
        PyObject *key = PyLong_FromUnsignedLong(tag);
        if (key == NULL) return NULL;
        PyObject *entry = PyDict_GetItemWithError(table, key);  /* borrowed */
        Py_DECREF(key);
        if (entry == NULL && PyErr_Occurred()) return NULL;
        if (entry != NULL) {
            if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) break;
            if (PyTuple_GET_ITEM(entry, 1) != Py_None) break;  /* a needed sequence */
            if (p[4] == 'S' && p[5] == 'Q') break;
            if ((long long)tag == charset) break;
            if (length) {
                if (end > data_end) break;  /* the value needs another read */
                /* entry is borrowed and an allocation may run a finalizer: hold what we use */
                PyObject *attribute = PyTuple_GET_ITEM(entry, 0);
                Py_INCREF(attribute);
                PyObject *value = PyBytes_FromStringAndSize((const char *)data + (start - base), length);
                if (value == NULL) {
                    Py_DECREF(attribute);
                    return NULL;
                }
                PyObject *pair = PyTuple_Pack(2, attribute, value);
                Py_DECREF(attribute);
                Py_DECREF(value);
                if (pair == NULL) return NULL;
                int failed = PyList_Append(collected, pair);
                Py_DECREF(pair);
                if (failed) return NULL;
            }
        }
        pos = end;
        last_end = end;
        prev = tag;
        walked++;
    }
    return Py_BuildValue("(LLLL)", pos, prev, walked, last_end);
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "Advance over plain elements; see beam_pipeline/_walk.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_walk", NULL, -1, methods};

PyMODINIT_FUNC PyInit__walk(void) { return PyModule_Create(&module); }
