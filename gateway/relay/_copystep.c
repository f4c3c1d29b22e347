/* The copy tier's hot path, compiled: read a chunk from one socket, write it to the
 * other, until something stops it (gateway/relay/copy.py, CopyRelay._step); and the
 * relays' event delivery, which moves a parked copy pair's event that way without a
 * Python call, or with one to end a direction (gateway/relay/poller.py rule 6, copy.py
 * rule 8); and the accept loop's accept (gateway/listeners.py).
 *
 * Why C: a kept-alive request through the copy tier makes the same syscalls as
 * HAProxy's, and what is left between them is Python (bench/README.md, "A compiled
 * copy step", "The delivery compiled"). Each chunk through the socket module costs
 * two method calls, a memoryview slice, the GIL released and taken twice; here it
 * costs the two syscalls. Each event through the Python delivery cost four calls and
 * about a hundred bytecodes around them. copy.py and poller.py run the same loop and
 * delivery in Python where this module is not built, and the tests run every copy
 * test both ways.
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
 *
 * deliver(owners, reschedule, clock, events) -> list | None
 *
 *   Poller.deliver (gateway/relay/poller.py) as it is, for trio's epoll events
 *   ``events``: ``owners`` maps a descriptor to (waiter, side); the events of
 *   descriptors it does not own come back, in order (None when there are none);
 *   ``reschedule`` wakes a parked waiter that ``waiter.ready()`` did not serve.
 *   A parked waiter with a ``fast`` path (a copy pair's: serve() below) has an
 *   event that says "readable" or "end" served here (an end too: end_direction()
 *   below); ``clock`` is the run clock's perf_counter, read when bytes moved and
 *   the pair has an idle timeout. An error met serving it becomes ``waiter.error``
 *   and the waiter is woken.
 *
 * wait(owners, reschedule, clock, epfd, timeout, maxevents) -> list | True
 *
 *   trio's wait on its epoll set ``epfd`` and deliver() in one (gateway/runloop.py
 *   share_epoll): epoll.poll(timeout, maxevents) with the events of the descriptors
 *   in ``owners`` delivered as they come, packed as the kernel returns them (no tuple
 *   each). Returns trio's events ((fd, events) pairs; empty when the whole timeout
 *   passed), or True when only owned events came and trio's loop has to look anyway
 *   (a task woken, Python code run, a signal's handler run, or a timeout of 0). Owned
 *   events served with no call into Python leave nothing for trio's loop to do: it
 *   waits on for the rest of the timeout itself, where trio's loop would have come
 *   round (about 120 bytecodes a time) to wait again.
 *
 * accept(listener) -> (fd, peer) | None
 *
 *   accept4(SOCK_NONBLOCK | SOCK_CLOEXEC) on the non-blocking listening socket
 *   ``listener`` (an AF_INET or AF_INET6 socket object): the connection non-blocking
 *   from the start, with no ioctl of its own (socket.socket(family, SOCK_STREAM |
 *   SOCK_NONBLOCK, 0, fd) wraps it in non-blocking mode with no syscall either), and
 *   its peer as the socket module gives it: (host, port) for IPv4, the host written
 *   here rather than by inet_ntop's sprintf (1,700 instructions), (host, port,
 *   flowinfo, scope_id) for IPv6. None when no connection waits, where the socket
 *   module raises BlockingIOError; other errors raise OSError (EBADF once the
 *   listener is closed).
 *
 * serve(waiter, side, events, clock) -> bool
 *
 *   What the delivery does for an event ``events`` of a parked pair's side ``side``
 *   (serve() below), called by the pair's task itself for its first bytes (copy.py,
 *   rule 8): True when it was served and the task can park; False when the task has
 *   to look (as when the delivery would wake it), or when the pair has no fast path.
 *   An error met is raised, not kept.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

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

/* What move_chunks stopped at: move()'s tuple, as a struct. */
struct moved {
    int status;
    long long moved;
    long chunks, sent, held;
};

/* The loop itself, shared by move() and the delivery's fast path (deliver()). */
static void
move_chunks(char *buf, size_t size, int src, int dst, long budget, int stop_short,
            long long limit, struct moved *r)
{
    int status;
    long long moved = 0;
    long chunks = 0, sent = 0, held = 0;
    for (;;) {
        ssize_t n = recv(src, buf, size, MSG_DONTWAIT);
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
            s = send(dst, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
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
    r->status = status;
    r->moved = moved;
    r->chunks = chunks;
    r->sent = sent;
    r->held = held;
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
    if (scratch.len == 0) {
        PyBuffer_Release(&scratch);
        PyErr_SetString(PyExc_ValueError, "move(): empty scratch buffer");
        return NULL;
    }
    struct moved r;
    move_chunks(scratch.buf, (size_t)scratch.len, (int)src, (int)dst, budget, stop_short, limit, &r);
    PyBuffer_Release(&scratch);

    PyObject *out = PyTuple_New(5);
    if (out == NULL)
        return NULL;
    PyObject *items[5] = {
        PyLong_FromLong(r.status), PyLong_FromLongLong(r.moved), PyLong_FromLong(r.chunks),
        PyLong_FromLong(r.sent), PyLong_FromLong(r.held),
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

/* ---- The relays' event delivery (gateway/relay/poller.py, Poller.deliver) ---- */

/* Interned at import: the names the delivery calls and passes. */
static PyObject *s_ready, *s_add_event, *s_half_closed, *s_client, *s_backend, *s_client_eof,
    *s_backend_eof, *s_by_kwnames;

/* Set where the delivery calls back into Python (a waiter's ready(), a wakeup, a span
 * event, an error kept): wait() goes on waiting in place of trio's loop only after
 * events served with none of that, which cannot have changed what trio waits for. */
static int python_ran;

/* The waiters' attributes by slot. Each attribute the delivery reads or writes is a
 * ``__slots__`` entry of copy.py's and poller.py's classes (and RelayStats'): read
 * through PyObject_GetAttr each cost a type lookup and a descriptor call, about 125
 * instructions, up to 14 of them per kept-alive request (bench/README.md, "Attributes
 * by slot, trio's wait compiled"). Here an attribute's slot, once found for a type, is read
 * and written at once while the type is unchanged (its version tag, which Python
 * resets when a class or a base changes); two types are remembered per attribute (a
 * pair's two directions are of two classes). An attribute that is not a plain
 * writable slot of its type (a property, an instance dict, a class with attribute
 * hooks of its own: the tests' stand-ins) takes the generic path as before. */
struct attr {
    PyObject *name; /* interned at import */
    struct {
        PyTypeObject *type; /* a strong reference */
        unsigned int version;
        PyMemberDef *member; /* NULL: the generic path for this type */
    } seen[2];
    int last; /* the entry filled last */
};

static struct attr a_readable, a_writable, a_task, a_fast, a_deadline, a_error, a_from_client,
    a_to_client, a_c2u, a_u2c, a_done, a_first_eof, a_promoting, a_fastpath;

static PyMemberDef *
slot_of(PyObject *obj, struct attr *a)
{
    PyTypeObject *type = Py_TYPE(obj);
    for (int i = 0; i < 2; i++)
        if (a->seen[i].type == type && a->seen[i].version != 0
            && a->seen[i].version == type->tp_version_tag)
            return a->seen[i].member;
    PyMemberDef *member = NULL;
    if (type->tp_getattro == PyObject_GenericGetAttr
        && type->tp_setattro == PyObject_GenericSetAttr) {
        /* Borrowed; sets no error; gives the type a valid version tag when it can. */
        PyObject *descr = _PyType_Lookup(type, a->name);
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
            if (m->type == T_OBJECT_EX && !(m->flags & READONLY))
                member = m;
        }
    }
    a->last ^= 1;
    PyTypeObject *old = a->seen[a->last].type;
    a->seen[a->last].type = (PyTypeObject *)Py_NewRef(type);
    a->seen[a->last].version =
        PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG) ? type->tp_version_tag : 0;
    a->seen[a->last].member = member;
    Py_XDECREF(old);
    return member;
}

/* obj.<a>, a new reference (NULL: an error). */
static PyObject *
get_attr(PyObject *obj, struct attr *a)
{
    PyMemberDef *m = slot_of(obj, a);
    return m != NULL ? PyMember_GetOne((const char *)obj, m) : PyObject_GetAttr(obj, a->name);
}

/* obj.<a> = value */
static int
set_attr(PyObject *obj, struct attr *a, PyObject *value)
{
    PyMemberDef *m = slot_of(obj, a);
    return m != NULL ? PyMember_SetOne((char *)obj, m, value)
                     : PyObject_SetAttr(obj, a->name, value);
}

#define FAST_SIZE 11 /* the items of a fast path (serve()) */

#define EV_READ (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)
#define EV_ENDS (EPOLLRDHUP | EPOLLHUP | EPOLLERR)
#define EV_WRITE (EPOLLOUT | EPOLLHUP | EPOLLERR)
#define SIDE_CLIENT 1 /* copy.py _CLIENT; side 0 is the upstream */

/* waiter.<flags>[side] = value */
static int
set_flag(PyObject *waiter, struct attr *flags_name, long side, PyObject *value)
{
    PyObject *flags = get_attr(waiter, flags_name);
    if (flags == NULL)
        return -1;
    Py_INCREF(value);
    int rc = PyList_SetItem(flags, side, value); /* steals value; checks the list */
    Py_DECREF(flags);
    return rc;
}

static int
tuple_long(PyObject *t, Py_ssize_t i, long *out)
{
    *out = PyLong_AsLong(PyTuple_GET_ITEM(t, i));
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
tuple_double(PyObject *t, Py_ssize_t i, double *out)
{
    *out = PyFloat_AsDouble(PyTuple_GET_ITEM(t, i));
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* stats.bytes_from_client (side 1) or stats.bytes_to_client (side 0) += moved */
static int
count_moved(PyObject *stats, long side, long long moved)
{
    struct attr *name = side == SIDE_CLIENT ? &a_from_client : &a_to_client;
    PyObject *count = get_attr(stats, name);
    if (count == NULL)
        return -1;
    PyObject *more = PyLong_FromLongLong(moved);
    PyObject *sum = more == NULL ? NULL : PyNumber_Add(count, more);
    Py_DECREF(count);
    Py_XDECREF(more);
    if (sum == NULL)
        return -1;
    int rc = set_attr(stats, name, sum);
    Py_DECREF(sum);
    return rc;
}

/* The end of the direction from ``side`` met on a parked pair's fast path (nothing
 * held, no promotion stopping it), its bytes before it moved and counted: ended as
 * copy.py's CopyRelay._eof ends it, here, where ``waiter.ended`` cost two Python frames
 * per end (a short connection has two). 1: the pair stays parked; 0: both directions
 * are over, wake its task; -1: an error.
 *
 * The direction is marked done. The first end of a pair (the other side's bit is not
 * in ``ended``) is its ``first_eof``, an event "half_closed" on the flow's span (the
 * fast path's ``flow``, None for stats that are not a flow), the promotion given up
 * (a half-closed pair stays in this tier), the fast path told that this side is over,
 * and the FIN passed on: shutdown(SHUT_WR) of the other socket. The second end needs
 * none of that: the pair's task, woken, sees both directions over, and the caller's
 * close sends the FIN. */
static int
end_direction(PyObject *waiter, PyObject *fast, long side, long ended, long dst)
{
    PyObject *d = get_attr(waiter, side == SIDE_CLIENT ? &a_c2u : &a_u2c);
    if (d == NULL)
        return -1;
    int rc = set_attr(d, &a_done, Py_True);
    Py_DECREF(d);
    if (rc < 0)
        return -1;
    if (ended & (1L << (1 - side)))
        return 0;
    if (set_attr(waiter, &a_first_eof, side == SIDE_CLIENT ? s_client_eof : s_backend_eof) < 0)
        return -1;
    PyObject *flow = PyTuple_GET_ITEM(fast, 10);
    if (flow != Py_None) {
        python_ran = 1;
        PyObject *args[3] = {flow, s_half_closed, side == SIDE_CLIENT ? s_client : s_backend};
        PyObject *result = PyObject_VectorcallMethod(
            s_add_event, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, s_by_kwnames);
        if (result == NULL)
            return -1;
        Py_DECREF(result);
    }
    if (set_attr(waiter, &a_promoting, Py_False) < 0)
        return -1;
    PyObject *next = PyTuple_New(FAST_SIZE);
    if (next == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < FAST_SIZE; i++) {
        PyObject *item;
        if (i == 7)
            item = PyLong_FromLong(ended | 1L << side);
        else if (i == 8)
            item = PyLong_FromLong(-1);
        else if (i == 9)
            item = PyFloat_FromDouble(0.0);
        else
            item = Py_NewRef(PyTuple_GET_ITEM(fast, i));
        if (item == NULL) {
            Py_DECREF(next);
            return -1;
        }
        PyTuple_SET_ITEM(next, i, item);
    }
    rc = set_attr(waiter, &a_fastpath, next);
    if (rc == 0)
        rc = set_attr(waiter, &a_fast, next);
    Py_DECREF(next);
    if (rc < 0)
        return -1;
    (void)shutdown((int)dst, SHUT_WR); /* as _eof: a peer already gone is no error here */
    return 1;
}

/* A parked copy pair's event (no error), served without Python where it can be: its
 * fast path is the tuple copy.py keeps in ``waiter.fast`` while the pair holds
 * nothing and is not stopping for a promotion, (fd of side 0, fd of side 1, scratch
 * bytearray, stats, idle, clock offset, budget, ended, promote_bytes, promote_at,
 * flow): ``ended`` the mask of the sides whose direction is over (1 << side); the
 * promotion due at ``promote_bytes`` bytes moved or at ``promote_at`` on the run clock
 * (-1 and 0.0: none to come); ``flow`` the stats when they are a flow (its span gets
 * the "half_closed" event), else None. 1: served, the pair stays parked; 0: wake it;
 * -1: an error.
 *
 * The bytes are moved as CopyRelay._step moves them (to the end, when the event says
 * the peer's FIN is queued) and counted. A move that met the end ends that direction
 * here (end_direction()). Whatever else it stopped at (a held chunk, a full budget, a
 * reset, an idle deadline due to move, or a promotion due) goes to ``waiter.ready``
 * with the move's result, which handles it as CopyRelay._step would have. */
static int
serve(PyObject *waiter, PyObject *fast, long side, long ev, PyObject *clock)
{
    int ends = (ev & EV_ENDS) != 0;
    if (!(ev & EPOLLIN) && !ends)
        return 1; /* writable only: nothing is held, so nothing waits for it */
    long src, dst, budget, ended;
    long long promote_bytes, total = 0, limit = 0;
    double idle, offset, promote_at;
    PyObject *scratch, *stats;
    if (!PyTuple_Check(fast) || PyTuple_GET_SIZE(fast) != FAST_SIZE
        || !PyByteArray_Check(scratch = PyTuple_GET_ITEM(fast, 2))
        || PyByteArray_GET_SIZE(scratch) == 0) {
        PyErr_SetString(PyExc_TypeError, "deliver(): a waiter's fast path is not its tuple");
        return -1;
    }
    if (tuple_long(fast, side, &src) < 0 || tuple_long(fast, 1 - side, &dst) < 0
        || tuple_double(fast, 4, &idle) < 0 || tuple_double(fast, 5, &offset) < 0
        || tuple_long(fast, 6, &budget) < 0 || tuple_long(fast, 7, &ended) < 0
        || tuple_double(fast, 9, &promote_at) < 0)
        return -1;
    promote_bytes = PyLong_AsLongLong(PyTuple_GET_ITEM(fast, 8));
    if (promote_bytes == -1 && PyErr_Occurred())
        return -1;
    if (ended & (1L << side))
        return 1; /* this side's direction is over: nothing to read, nothing held */
    stats = PyTuple_GET_ITEM(fast, 3);
    int promoting = promote_bytes >= 0;
    if (promoting) {
        /* As _step: stop at the chunk that reaches the promotion's byte count. */
        long long counts[2];
        struct attr *names[2] = {&a_from_client, &a_to_client};
        for (int i = 0; i < 2; i++) {
            PyObject *count = get_attr(stats, names[i]);
            if (count == NULL)
                return -1;
            counts[i] = PyLong_AsLongLong(count);
            Py_DECREF(count);
            if (counts[i] == -1 && PyErr_Occurred())
                return -1;
        }
        total = counts[0] + counts[1];
        limit = promote_bytes - total < 1 ? 1 : promote_bytes - total;
    }
    struct moved r;
    move_chunks(PyByteArray_AS_STRING(scratch), (size_t)PyByteArray_GET_SIZE(scratch), (int)src,
                (int)dst, budget, !ends, limit, &r);
    if (r.status > SHORT && r.status != END)
        goto to_python;
    if (r.moved > 0 && (idle > 0 || promoting)) {
        /* The idle deadline moves only once it fell behind now + idle (copy.py
         * _moved), and a promotion comes once: those rare cases are Python's. */
        PyObject *now = PyObject_CallNoArgs(clock);
        if (now == NULL)
            return -1;
        double t = PyFloat_AsDouble(now);
        Py_DECREF(now);
        if (t == -1.0 && PyErr_Occurred())
            return -1;
        t += offset;
        if (promoting && (total + r.moved >= promote_bytes || t >= promote_at))
            goto to_python;
        if (idle > 0) {
            PyObject *deadline = get_attr(waiter, &a_deadline);
            if (deadline == NULL)
                return -1;
            double d = PyFloat_AsDouble(deadline);
            Py_DECREF(deadline);
            if (d == -1.0 && PyErr_Occurred())
                return -1;
            if (d < t + idle)
                goto to_python;
        }
    }
    if (r.moved > 0 && count_moved(stats, side, r.moved) < 0)
        return -1;
    if (r.status == END)
        return end_direction(waiter, fast, side, ended, dst);
    PyObject *zero = PyLong_FromLong(0);
    int rc = set_flag(waiter, &a_readable, side, zero);
    Py_DECREF(zero);
    return rc < 0 ? -1 : 1;
to_python:;
    PyObject *args[7] = {waiter, NULL, NULL, NULL, NULL, NULL, NULL};
    long long values[6] = {side, r.status, r.moved, r.chunks, r.sent, r.held};
    int ok = 1;
    for (int i = 0; i < 6; i++)
        if ((args[i + 1] = PyLong_FromLongLong(values[i])) == NULL)
            ok = 0;
    PyObject *result = NULL;
    python_ran = 1;
    if (ok)
        result = PyObject_VectorcallMethod(s_ready, args, 7 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    for (int i = 1; i < 7; i++)
        Py_XDECREF(args[i]);
    if (result == NULL)
        return -1;
    int served = PyObject_IsTrue(result);
    Py_DECREF(result);
    return served;
}

/* An error met serving a pair's event is the pair's, not the run's (as _Pair.ready
 * keeps one): it becomes ``waiter.error``, which the woken task raises, and the
 * delivery goes on. 0 (wake the owner), or -1 if even that failed. */
static int
keep_for_owner(PyObject *waiter)
{
    PyObject *type, *value, *tb;
    python_ran = 1;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    int rc = value == NULL ? -1 : set_attr(waiter, &a_error, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return rc < 0 ? -1 : 0;
}

/* One event for an owned descriptor: Poller.deliver's loop body. */
static int
deliver_one(PyObject *owner, long ev, PyObject *reschedule, PyObject *clock)
{
    if (!PyTuple_Check(owner) || PyTuple_GET_SIZE(owner) != 2) {
        PyErr_SetString(PyExc_TypeError, "deliver(): an owner is not (waiter, side)");
        return -1;
    }
    PyObject *waiter = PyTuple_GET_ITEM(owner, 0);
    long side;
    if (tuple_long(owner, 1, &side) < 0)
        return -1;
    if (ev & EV_READ) {
        PyObject *flag = PyLong_FromLong(ev & EV_ENDS ? 2 : 1); /* READABLE[_TO_END] */
        int rc = set_flag(waiter, &a_readable, side, flag);
        Py_DECREF(flag);
        if (rc < 0)
            return -1;
    }
    if ((ev & EV_WRITE) && set_flag(waiter, &a_writable, side, Py_True) < 0)
        return -1;
    PyObject *task = get_attr(waiter, &a_task);
    if (task == NULL)
        return -1;
    int served = 1;
    if (task != Py_None) {
        served = 2; /* not decided: waiter.ready() decides */
        if (!(ev & EPOLLERR)) {
            PyObject *fast = get_attr(waiter, &a_fast);
            if (fast == NULL)
                goto fail;
            if (fast != Py_None) {
                served = serve(waiter, fast, side, ev, clock);
                if (served < 0)
                    served = keep_for_owner(waiter);
            }
            Py_DECREF(fast);
        }
        if (served == 2) {
            python_ran = 1;
            PyObject *result = PyObject_CallMethodNoArgs(waiter, s_ready);
            if (result == NULL)
                goto fail;
            served = PyObject_IsTrue(result);
            Py_DECREF(result);
        }
        if (served < 0)
            goto fail;
        if (served == 0) {
            python_ran = 1;
            if (set_attr(waiter, &a_task, Py_None) < 0)
                goto fail;
            PyObject *result = PyObject_CallOneArg(reschedule, task);
            if (result == NULL)
                goto fail;
            Py_DECREF(result);
        }
    }
    Py_DECREF(task);
    return 0;
fail:
    Py_DECREF(task);
    return -1;
}

/* One event of a wait: to its owner, or into ``theirs`` (made when first needed) for
 * trio, as ``item`` when it is a tuple already, else as a new (fd, events) one. */
static int
deliver_event(PyObject *owners, PyObject *fd, long ev, PyObject *item, PyObject **theirs,
              PyObject *reschedule, PyObject *clock)
{
    PyObject *owner = PyDict_GetItemWithError(owners, fd);
    if (owner == NULL) {
        if (PyErr_Occurred())
            return -1;
        if (*theirs == NULL && (*theirs = PyList_New(0)) == NULL)
            return -1;
        if (item != NULL)
            return PyList_Append(*theirs, item);
        PyObject *flags = PyLong_FromLong(ev);
        PyObject *pair = flags == NULL ? NULL : PyTuple_Pack(2, fd, flags);
        Py_XDECREF(flags);
        int rc = pair == NULL ? -1 : PyList_Append(*theirs, pair);
        Py_XDECREF(pair);
        return rc;
    }
    /* Held: what the waiter runs may forget its descriptor (and the owner). */
    Py_INCREF(owner);
    int rc = deliver_one(owner, ev, reschedule, clock);
    Py_DECREF(owner);
    return rc;
}

static PyObject *
deliver(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "deliver() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *owners = args[0], *reschedule = args[1], *clock = args[2];
    if (!PyDict_Check(owners)) {
        PyErr_SetString(PyExc_TypeError, "deliver(): owners must be a dict");
        return NULL;
    }
    PyObject *theirs = NULL;
    PyObject *events = PySequence_Fast(args[3], "deliver(): events must be a sequence");
    if (events == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(events);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(events, i);
        long ev;
        int rc = -1;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2)
            PyErr_SetString(PyExc_TypeError, "deliver(): an event is not (fd, events)");
        else if (tuple_long(item, 1, &ev) == 0)
            rc = deliver_event(owners, PyTuple_GET_ITEM(item, 0), ev, item, &theirs, reschedule,
                               clock);
        if (rc < 0) {
            Py_DECREF(events);
            goto fail;
        }
    }
    Py_DECREF(events);
    if (theirs == NULL)
        Py_RETURN_NONE;
    return theirs;
fail:
    Py_XDECREF(theirs);
    return NULL;
}

static long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static PyObject *
wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "wait() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *owners = args[0], *reschedule = args[1], *clock = args[2];
    if (!PyDict_Check(owners)) {
        PyErr_SetString(PyExc_TypeError, "wait(): owners must be a dict");
        return NULL;
    }
    long epfd, maxevents;
    if (as_int(args[3], "epfd", 0, &epfd) < 0 || as_int(args[5], "maxevents", 1, &maxevents) < 0)
        return NULL;
    double timeout = PyFloat_AsDouble(args[4]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (isnan(timeout)) {
        PyErr_SetString(PyExc_ValueError, "wait(): timeout is NaN");
        return NULL;
    }
    /* Rounded up, as epoll.poll rounds it: a wait never ends before its deadline. */
    long long ms = timeout < 0                 ? -1
                   : timeout * 1e3 >= INT_MAX ? INT_MAX
                                               : (long long)ceil(timeout * 1e3);
    long long deadline = ms > 0 ? monotonic_ns() + ms * 1000000 : 0;
    struct epoll_event *evs = PyMem_New(struct epoll_event, (size_t)maxevents);
    if (evs == NULL)
        return PyErr_NoMemory();
    PyObject *out = NULL;
    for (;;) {
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait((int)epfd, evs, (int)maxevents, (int)ms);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno != EINTR) {
                PyErr_SetFromErrno(PyExc_OSError);
                break;
            }
            /* A signal: its Python handler runs now, and trio's loop looks again. */
            if (PyErr_CheckSignals() == 0)
                out = Py_NewRef(Py_True);
            break;
        }
        if (n == 0) {
            out = PyList_New(0); /* the whole timeout passed */
            break;
        }
        PyObject *theirs = NULL;
        python_ran = 0;
        int rc = 0;
        for (int i = 0; i < n && rc == 0; i++) {
            PyObject *fd = PyLong_FromLong(evs[i].data.fd);
            rc = fd == NULL ? -1
                            : deliver_event(owners, fd, (long)evs[i].events, NULL, &theirs,
                                            reschedule, clock);
            Py_XDECREF(fd);
        }
        if (rc < 0) {
            Py_XDECREF(theirs);
            break;
        }
        if (theirs != NULL) {
            out = theirs;
            break;
        }
        if (python_ran || ms == 0) {
            /* Served, nothing of trio's, but trio's loop has to look (a task woken, or
             * code run that may have changed its deadlines; or it only asked for a
             * poll): "events came", not "the wait timed out". */
            out = Py_NewRef(Py_True);
            break;
        }
        /* Every event was a relay's and served here with no Python: nothing trio
         * waits for changed, so wait on for the rest of its timeout, where its loop
         * would have come round to wait again. A signal that came meanwhile has its
         * handler run first, as the loop would have (what a handler asks of trio's
         * loop comes through its wakeup socket, an event of trio's). */
        if (PyErr_CheckSignals() < 0)
            break;
        if (ms > 0) {
            long long left = deadline - monotonic_ns();
            if (left <= 0) {
                out = PyList_New(0);
                break;
            }
            ms = (left + 999999) / 1000000; /* rounded up: never before the deadline */
        }
    }
    PyMem_Free(evs);
    return out;
}

/* "a.b.c.d" of an IPv4 address in network order, into out (16 bytes); its length. */
static int
ipv4_text(const struct in_addr *addr, char *out)
{
    const unsigned char *b = (const unsigned char *)&addr->s_addr;
    int n = 0;
    for (int i = 0; i < 4; i++) {
        unsigned v = b[i];
        if (v >= 100)
            out[n++] = (char)('0' + v / 100);
        if (v >= 10)
            out[n++] = (char)('0' + v / 10 % 10);
        out[n++] = (char)('0' + v % 10);
        if (i < 3)
            out[n++] = '.';
    }
    return n;
}

static PyObject *
accept_one(PyObject *module, PyObject *listener)
{
    (void)module;
    int lfd = PyObject_AsFileDescriptor(listener);
    if (lfd < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            return NULL;
        PyErr_Clear(); /* fileno() -1: closed */
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct sockaddr_storage ss;
    socklen_t len;
    int fd;
    for (;;) {
        len = sizeof ss;
        fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0)
            break;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        if (errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    PyObject *peer = NULL;
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
        char text[16];
        int n = ipv4_text(&a->sin_addr, text);
        PyObject *host = PyUnicode_DecodeASCII(text, n, NULL);
        PyObject *port = PyLong_FromLong(ntohs(a->sin_port));
        if (host != NULL && port != NULL)
            peer = PyTuple_Pack(2, host, port);
        Py_XDECREF(host);
        Py_XDECREF(port);
    } else if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
        char text[INET6_ADDRSTRLEN];
        if (inet_ntop(AF_INET6, &a->sin6_addr, text, sizeof text) == NULL)
            PyErr_SetFromErrno(PyExc_OSError);
        else
            peer = Py_BuildValue("(siII)", text, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                                 a->sin6_scope_id);
    } else {
        PyErr_Format(PyExc_ValueError, "accept(): a listener of family %d", ss.ss_family);
    }
    PyObject *out = NULL;
    if (peer != NULL) {
        PyObject *fdobj = PyLong_FromLong(fd);
        if (fdobj != NULL)
            out = PyTuple_Pack(2, fdobj, peer);
        Py_XDECREF(fdobj);
        Py_DECREF(peer);
    }
    if (out == NULL)
        close(fd);
    return out;
}

static PyObject *
serve_first(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "serve() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *waiter = args[0];
    long side, ev;
    if (as_int(args[1], "side", 0, &side) < 0 || as_int(args[2], "events", 0, &ev) < 0)
        return NULL;
    if (side > 1) {
        PyErr_Format(PyExc_ValueError, "serve(): side out of range: %ld", side);
        return NULL;
    }
    PyObject *fast = get_attr(waiter, &a_fast);
    if (fast == NULL)
        return NULL;
    int served = fast == Py_None ? 0 : serve(waiter, fast, side, ev, args[3]);
    Py_DECREF(fast);
    if (served < 0)
        return NULL;
    return PyBool_FromLong(served);
}

static PyMethodDef methods[] = {
    {"accept", (PyCFunction)accept_one, METH_O,
     "accept(listener) -> (fd, peer) | None\n"
     "accept4(SOCK_NONBLOCK | SOCK_CLOEXEC) on an inet listener; None when none waits."},
    {"move", (PyCFunction)(void (*)(void))move, METH_FASTCALL,
     "move(scratch, src, dst, budget, stop_short, limit) -> (status, moved, chunks, sent, held)\n"
     "Relay whole chunks from src to dst until a stop (see the module's constants)."},
    {"serve", (PyCFunction)(void (*)(void))serve_first, METH_FASTCALL,
     "serve(waiter, side, events, clock) -> bool\n"
     "Serve the epoll ``events`` of the copy pair ``waiter``'s side as the delivery would\n"
     "(False: its task has to look; without a fast path, at once)."},
    {"wait", (PyCFunction)(void (*)(void))wait, METH_FASTCALL,
     "wait(owners, reschedule, clock, epfd, timeout, maxevents) -> list | True\n"
     "epoll.poll(timeout, maxevents) on epfd with deliver() of the owned events; trio's events,\n"
     "or True when only owned ones came and trio's loop has to look."},
    {"deliver", (PyCFunction)(void (*)(void))deliver, METH_FASTCALL,
     "deliver(owners, reschedule, clock, events) -> list | None\n"
     "gateway/relay/poller.py Poller.deliver, with a parked copy pair's plain event served here."},
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
    static const struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&a_readable.name, "readable"}, {&a_writable.name, "writable"}, {&a_task.name, "task"},
        {&a_fast.name, "fast"},         {&s_ready, "ready"},       {&a_error.name, "error"},
        {&a_deadline.name, "deadline"}, {&a_from_client.name, "bytes_from_client"},
        {&a_to_client.name, "bytes_to_client"}, {&a_c2u.name, "c2u"}, {&a_u2c.name, "u2c"},
        {&a_done.name, "done"}, {&a_first_eof.name, "first_eof"}, {&a_promoting.name, "promoting"},
        {&a_fastpath.name, "fastpath"}, {&s_add_event, "add_event"},
        {&s_half_closed, "half_closed"}, {&s_client, "client"}, {&s_backend, "backend"},
        {&s_client_eof, "client_eof"}, {&s_backend_eof, "backend_eof"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (*names[i].name == NULL && (*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL)
            return -1;
    if (s_by_kwnames == NULL && (s_by_kwnames = Py_BuildValue("(s)", "by")) == NULL)
        return -1;
    /* copy.py checks that these are its CloseReason's values. */
    if (PyModule_AddObjectRef(m, "CLIENT_EOF", s_client_eof) < 0
        || PyModule_AddObjectRef(m, "BACKEND_EOF", s_backend_eof) < 0)
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
