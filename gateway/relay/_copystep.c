/* The copy tier's inner loop, compiled: read a chunk from one socket, write it to
 * the other, until something stops it (gateway/relay/copy.py, CopyRelay._step).
 *
 * Why C: a kept-alive request through the copy tier makes the same syscalls as
 * HAProxy's, and what is left between them is Python (bench/README.md, "A compiled
 * copy step"). Each chunk through the socket module costs two method calls, a
 * memoryview slice, the GIL released and taken twice; here it costs the two
 * syscalls. copy.py runs the same loop in Python where this module is not built,
 * and the tests run every copy test both ways.
 *
 * The GIL is kept: every call here is MSG_DONTWAIT (the sockets are non-blocking
 * anyway), so none waits.
 *
 * move(scratch, src, dst, budget, stop_short, limit)
 *     -> (status, moved, chunks, sent, held)
 *
 *   scratch     a writable buffer (the relay's shared scratch); one chunk is
 *               at most its length.
 *   src, dst    file descriptors of non-blocking sockets.
 *   budget      stop after this many whole chunks (> 0).
 *   stop_short  a read shorter than asked ends the loop (copy.py, rule 6).
 *   limit       stop once this many bytes moved (0: no limit); the promotion's
 *               byte count.
 *
 *   status      why it stopped: one of the module's constants.
 *   moved       bytes of the whole chunks written (not the held one).
 *   chunks      whole chunks written.
 *   sent, held  for HELD: the last chunk read is scratch[0:held], and dst took
 *               only scratch[0:sent]; the caller keeps scratch[sent:held].
 *               For SRC_ERROR and DST_ERROR: sent is the errno.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sys/socket.h>

enum {
    DRAINED = 0,   /* the read met EAGAIN */
    SHORT = 1,     /* a short read, with stop_short */
    BUDGET = 2,    /* budget chunks moved */
    LIMIT = 3,     /* limit bytes moved */
    END = 4,       /* the read returned 0: src's peer sent its FIN */
    HELD = 5,      /* dst took less than a whole chunk */
    SRC_ERROR = 6, /* the read failed */
    DST_ERROR = 7, /* the write failed */
};

static int
as_int(PyObject *o, const char *what, long min, long *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < min || v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "move(): %s out of range: %ld", what, v);
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *
move(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "move() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    long src, dst, budget;
    if (as_int(args[1], "src", 0, &src) < 0 || as_int(args[2], "dst", 0, &dst) < 0
        || as_int(args[3], "budget", 1, &budget) < 0)
        return NULL;
    int stop_short = PyObject_IsTrue(args[4]);
    if (stop_short < 0)
        return NULL;
    long long limit = PyLong_AsLongLong(args[5]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer scratch;
    if (PyObject_GetBuffer(args[0], &scratch, PyBUF_WRITABLE) < 0)
        return NULL;
    char *buf = scratch.buf;
    size_t size = (size_t)scratch.len;

    int status;
    long long moved = 0;
    long chunks = 0, sent = 0, held = 0;
    if (size == 0) {
        PyBuffer_Release(&scratch);
        PyErr_SetString(PyExc_ValueError, "move(): empty scratch buffer");
        return NULL;
    }
    for (;;) {
        ssize_t n = recv((int)src, buf, size, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                status = DRAINED;
            } else {
                status = SRC_ERROR;
                sent = errno;
            }
            break;
        }
        if (n == 0) {
            status = END;
            break;
        }
        ssize_t s;
        do {
            /* MSG_NOSIGNAL: a peer gone is an error to report, not a SIGPIPE. */
            s = send((int)dst, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (s < 0 && errno == EINTR);
        if (s < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                status = DST_ERROR;
                sent = errno;
                break;
            }
            s = 0;
        }
        if (s < n) {
            status = HELD;
            sent = (long)s;
            held = (long)n;
            break;
        }
        moved += n;
        chunks++;
        if (stop_short && (size_t)n < size) {
            status = SHORT;
            break;
        }
        if (limit > 0 && moved >= limit) {
            status = LIMIT;
            break;
        }
        if (chunks >= budget) {
            status = BUDGET;
            break;
        }
    }
    PyBuffer_Release(&scratch);

    PyObject *out = PyTuple_New(5);
    if (out == NULL)
        return NULL;
    PyObject *items[5] = {
        PyLong_FromLong(status), PyLong_FromLongLong(moved), PyLong_FromLong(chunks),
        PyLong_FromLong(sent), PyLong_FromLong(held),
    };
    for (int i = 0; i < 5; i++) {
        if (items[i] == NULL) {
            for (int j = 0; j < 5; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(out);
            return NULL;
        }
    }
    for (int i = 0; i < 5; i++)
        PyTuple_SET_ITEM(out, i, items[i]);
    return out;
}

static PyMethodDef methods[] = {
    {"move", (PyCFunction)(void (*)(void))move, METH_FASTCALL,
     "move(scratch, src, dst, budget, stop_short, limit) -> (status, moved, chunks, sent, held)\n"
     "Relay whole chunks from src to dst until a stop (see the module's constants)."},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *m)
{
    static const struct {
        const char *name;
        int value;
    } consts[] = {
        {"DRAINED", DRAINED}, {"SHORT", SHORT},         {"BUDGET", BUDGET},
        {"LIMIT", LIMIT},     {"END", END},             {"HELD", HELD},
        {"SRC_ERROR", SRC_ERROR}, {"DST_ERROR", DST_ERROR},
    };
    for (size_t i = 0; i < sizeof(consts) / sizeof(consts[0]); i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0)
            return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway.relay._copystep",
    .m_doc = "The copy tier's inner loop, compiled (gateway/relay/copy.py falls back to Python).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__copystep(void)
{
    return PyModuleDef_Init(&module_def);
}
