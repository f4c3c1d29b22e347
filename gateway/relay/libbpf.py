"""A minimal cffi ABI-mode binding of libbpf 1.x (``libbpf.so.1``) for the kernel tiers.

Only the calls the sockmap accelerator (reference/sockmap.md §5) and the shield
(reference/shield.md: XDP and tcx links, tc filters, ``BPF_PROG_TEST_RUN``) need
are declared.

Rules kept (sockmap.md §8 rule 17):

1. ``int`` returns are ``-errno`` on failure, pointer returns are ``NULL`` with
   ``errno`` set; both become :class:`BpfError` with that errno. ``errno`` is read
   right after the call (cffi saves it per thread). ``libbpf_get_error`` is not used.
2. Every ``*_opts`` argument is ``NULL``: a struct-layout mismatch in ABI mode would be
   silent memory corruption. The exceptions are the calls that cannot work without
   one (``bpf_prog_test_run_opts``, the ``bpf_tc_*`` calls, an XDP link's mode
   flags); their structs are copied field for field from libbpf 1.1's ``bpf.h`` and
   ``libbpf.h`` (``size_t :0`` written as the padding it makes), and ``sz`` is the
   size cffi computes. libbpf reads only the fields that fit in ``sz`` and refuses
   non-zero bytes it does not know, so a layout it has outgrown stays safe.
3. The print callback is created once, kept referenced for the life of the process,
   and formats ``va_list`` (passed as ``void*``) with libc ``vsnprintf``; it routes
   libbpf's messages (including the verifier log on a failed load) to :mod:`logging`.

cffi is untyped, so the ``ffi``/``lib`` objects are ``Any`` at this edge; everything
this module exports is typed.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BPF_SK_SKB_STREAM_VERDICT",
    "BPF_TCX_INGRESS",
    "BPF_TC_INGRESS",
    "BPF_XDP",
    "XDP_FLAGS_DRV_MODE",
    "XDP_FLAGS_SKB_MODE",
    "BpfError",
    "BpfObject",
    "KernelObject",
    "ProgRun",
    "U64Ring",
    "captured",
    "install_logging",
    "kernel_objects",
    "link_create",
    "map_delete_elem",
    "map_fd_by_id",
    "map_get_next_key",
    "map_lookup_batches",
    "map_lookup_elem",
    "map_update_elem",
    "num_possible_cpus",
    "object_exists",
    "prog_attach",
    "prog_detach",
    "prog_name",
    "prog_query",
    "prog_test_run",
    "summary",
    "tc_attach",
    "tc_detach",
    "tc_hook_create",
    "tc_query",
    "xdp_attach",
    "xdp_detach",
    "xdp_query_id",
]

log = logging.getLogger("l4gw.relay.libbpf")

# linux/bpf.h: enum bpf_attach_type BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_SKB_STREAM_VERDICT: Final = 5
# linux/bpf.h: map update flags BPF_ANY = 0, BPF_NOEXIST = 1, BPF_EXIST = 2
BPF_ANY: Final = 0
BPF_NOEXIST: Final = 1
BPF_EXIST: Final = 2
# linux/bpf.h: enum bpf_attach_type BPF_XDP = 37, BPF_TCX_INGRESS = 46 (kernel 6.6;
# Debian's libbpf-dev 1.1 headers predate it)
BPF_XDP: Final = 37
BPF_TCX_INGRESS: Final = 46
# linux/if_link.h: XDP_FLAGS_SKB_MODE = 2 (generic), XDP_FLAGS_DRV_MODE = 4 (native)
XDP_FLAGS_SKB_MODE: Final = 2
XDP_FLAGS_DRV_MODE: Final = 4
# bpf/libbpf.h: enum bpf_tc_attach_point BPF_TC_INGRESS = 1
BPF_TC_INGRESS: Final = 1

_CDEF: Final = """
typedef unsigned int __u32;
typedef unsigned long long __u64;
struct bpf_object; struct bpf_program; struct bpf_map;

typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *ap);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
const char *libbpf_version_string(void);
int libbpf_strerror(int err, char *buf, size_t size);

struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *object);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                     const char *name);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);

int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys,
                         void *values, __u32 *count, const void *opts);
int bpf_prog_attach(int prog_fd, int attachable_fd, int type, unsigned int flags);
int bpf_prog_detach2(int prog_fd, int attachable_fd, int type);
int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
int bpf_prog_query(int target_fd, int type, __u32 query_flags, __u32 *attach_flags,
                   __u32 *prog_ids, __u32 *prog_cnt);

int bpf_prog_get_next_id(__u32 start_id, __u32 *next_id);
int bpf_map_get_next_id(__u32 start_id, __u32 *next_id);
int bpf_link_get_next_id(__u32 start_id, __u32 *next_id);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_map_get_fd_by_id(__u32 id);
int bpf_link_get_fd_by_id(__u32 id);
int bpf_btf_get_fd_by_id(__u32 id);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
int libbpf_num_possible_cpus(void);

struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    __u32 data_size_in;
    __u32 data_size_out;
    const void *ctx_in;
    void *ctx_out;
    __u32 ctx_size_in;
    __u32 ctx_size_out;
    __u32 retval;
    int repeat;
    __u32 duration;
    __u32 flags;
    __u32 cpu;
    __u32 batch_size;
};
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);

/* The head of struct bpf_link_create_opts: libbpf reads flags and, for attach types it
   has no case for (BPF_XDP, BPF_TCX_INGRESS in 1.1), requires the rest to be zero. */
struct l4gw_link_create_opts {
    size_t sz;
    __u32 flags;
    __u32 _pad;
};

int bpf_xdp_attach(int ifindex, int prog_fd, __u32 flags, const void *opts);
int bpf_xdp_detach(int ifindex, __u32 flags, const void *opts);
int bpf_xdp_query_id(int ifindex, int flags, __u32 *prog_id);

struct bpf_tc_hook {
    size_t sz;
    int ifindex;
    int attach_point;
    __u32 parent;
    __u32 _pad;
};
struct bpf_tc_opts {
    size_t sz;
    int prog_fd;
    __u32 flags;
    __u32 prog_id;
    __u32 handle;
    __u32 priority;
    __u32 _pad;
};
int bpf_tc_hook_create(struct bpf_tc_hook *hook);
int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
int bpf_tc_query(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);

struct ring_buffer;
typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                     const void *opts);
void ring_buffer__free(struct ring_buffer *rb);
int ring_buffer__consume(struct ring_buffer *rb);
int ring_buffer__epoll_fd(const struct ring_buffer *rb);
"""

_ffi: Any = None
_lib: Any = None
_libc: Any = None
_print_cb: Any = None  # must stay referenced while libbpf may call it
_captured: list[tuple[int, str]] | None = None
_CAPTURE_SIZE: Final = 1 << 20


class BpfError(OSError):
    """A libbpf or bpf(2) call failed; ``errno`` is set, ``strerror`` says which call."""


def _load() -> tuple[Any, Any]:
    global _ffi, _lib, _libc
    if _lib is None:
        try:
            import cffi
        except ImportError as exc:  # pragma: no cover - cffi is a dependency
            raise BpfError(_errno.ENOSYS, f"cffi not available: {exc}") from exc
        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        ffi.cdef("int vsnprintf(char *str, size_t size, const char *format, void *ap);")
        try:
            lib = ffi.dlopen("libbpf.so.1")
        except OSError as exc:
            raise BpfError(_errno.ENOENT, f"cannot load libbpf.so.1: {exc}") from exc
        _libc = ffi.dlopen(None)
        _ffi, _lib = ffi, lib
    return _ffi, _lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _check_ptr(ptr: Any, what: str) -> Any:
    ffi, _ = _load()
    if ptr == ffi.NULL:
        err = ffi.errno or _errno.EINVAL
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ptr


def version() -> str:
    """The libbpf version string, e.g. ``"v1.1"``."""
    ffi, lib = _load()
    return str(ffi.string(lib.libbpf_version_string()).decode())


_levels: dict[int, int] = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def install_logging(logger: logging.Logger = log, *, ceiling: int = logging.WARNING) -> None:
    """Route libbpf's messages to ``logger`` (WARN→warning, INFO→info, DEBUG→debug).

    Call before opening an object so open- and load-time messages (the verifier
    log of a rejected program) are captured. The callback is installed once; a
    later call only changes ``ceiling``.

    Args:
        logger: Where libbpf's messages go (fixed by the first call).
        ceiling: The highest level a libbpf message is logged at. A caller that
            reports a failed load in one line of its own passes ``logging.DEBUG``,
            so the verifier's many lines are there with ``--log-level debug``
            and do not drown that one line otherwise.
    """
    global _print_cb
    _levels.update(
        {0: min(logging.WARNING, ceiling), 1: min(logging.INFO, ceiling), 2: logging.DEBUG}
    )
    ffi, lib = _load()
    if _print_cb is not None:
        return

    @ffi.callback("int(int, const char *, void *)")  # type: ignore[untyped-decorator]
    def _cb(level: int, fmt: Any, ap: Any) -> int:
        lvl = _levels.get(level, logging.DEBUG)
        capture = _captured
        if capture is None and not logger.isEnabledFor(lvl):
            return 0
        # A verifier log comes as one message whose end says why: keep room for it
        # while a caller captures.
        size = 4096 if capture is None else _CAPTURE_SIZE
        buf = ffi.new("char[]", size)
        n = _libc.vsnprintf(buf, size, fmt, ap)
        if n > 0:
            text = ffi.string(buf).decode(errors="replace").rstrip()
            if capture is not None:
                capture.append((level, text))
            logger.log(lvl, "%s", text)
        return 0

    _print_cb = _cb
    lib.libbpf_set_print(_cb)


@contextmanager
def captured() -> Iterator[list[tuple[int, str]]]:
    """Collect libbpf's messages, as (level, text), while the block runs (they are
    logged as well); :func:`summary` makes one line of them. Needs
    :func:`install_logging` first."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def summary(messages: list[tuple[int, str]], limit: int = 200) -> str:
    """The one line that says why, from captured libbpf messages: the verifier's last
    word when a program was refused, else libbpf's last warning; "" when none."""
    for _, text in messages:
        if "-- BEGIN PROG LOAD LOG --" not in text:
            continue
        body = text.split("-- BEGIN PROG LOAD LOG --", 1)[1].split("-- END PROG LOAD LOG --")[0]
        lines = [
            line.strip()
            for line in body.splitlines()
            if line.strip() and not line.startswith(("processed ", "verification time"))
        ]
        if lines:
            return lines[-1][:limit]
    warnings = [text for level, text in messages if level == 0 and text]
    return warnings[-1].removeprefix("libbpf: ")[:limit] if warnings else ""


class BpfObject:
    """An opened (and then loaded) BPF ELF object; close it to free programs and maps."""

    def __init__(self, path: str) -> None:
        """Open ``path`` (no load yet, so map sizes may still be changed).

        Args:
            path: The ``.bpf.o`` file.

        Raises:
            BpfError: The file is missing or not a valid BPF object.
        """
        ffi, lib = _load()
        self._obj: Any = _check_ptr(
            lib.bpf_object__open_file(path.encode(), ffi.NULL), f"open {path}"
        )

    def _map(self, name: str) -> Any:
        _, lib = _load()
        return _check_ptr(
            lib.bpf_object__find_map_by_name(self._obj, name.encode()), f"find map {name}"
        )

    def set_max_entries(self, map_name: str, max_entries: int) -> None:
        """Resize a map before :meth:`load`.

        Raises:
            BpfError: Unknown map, or already loaded (``EBUSY``).
        """
        _, lib = _load()
        _check(
            lib.bpf_map__set_max_entries(self._map(map_name), max_entries),
            f"set max_entries of {map_name}",
        )

    def load(self) -> None:
        """Create the maps and load the programs into the kernel.

        Raises:
            BpfError: e.g. ``EPERM`` without CAP_BPF, or a verifier rejection
                (the verifier log goes to the libbpf logger).
        """
        _, lib = _load()
        _check(lib.bpf_object__load(self._obj), "load BPF object")

    def map_fd(self, name: str) -> int:
        """The fd of a loaded map (owned by the object; do not close it)."""
        _, lib = _load()
        return _check(lib.bpf_map__fd(self._map(name)), f"fd of map {name}")

    def program_fd(self, name: str) -> int:
        """The fd of a loaded program, by its C function name."""
        _, lib = _load()
        prog = _check_ptr(
            lib.bpf_object__find_program_by_name(self._obj, name.encode()),
            f"find program {name}",
        )
        return _check(lib.bpf_program__fd(prog), f"fd of program {name}")

    def close(self) -> None:
        """Free the object; the kernel frees maps and programs no one else holds."""
        if self._obj is not None:
            _, lib = _load()
            lib.bpf_object__close(self._obj)
            self._obj = None


class U64Ring:
    """A ``BPF_MAP_TYPE_RINGBUF`` map whose records are one ``__u64`` each, read with
    libbpf's ``ring_buffer``: wait until :meth:`fileno` is readable, then :meth:`consume`.
    """

    def __init__(self, map_fd: int) -> None:
        """Map the ring buffer ``map_fd`` (the map's fd stays the caller's).

        Raises:
            BpfError: ``map_fd`` is not a ring buffer, or out of memory.
        """
        ffi, lib = _load()
        self._got: list[int] = []
        got = self._got
        as_u64 = ffi.cast

        @ffi.callback("int(void *, void *, size_t)")  # type: ignore[untyped-decorator]
        def _record(_ctx: Any, data: Any, size: int) -> int:
            if size >= 8:
                got.append(int(as_u64("__u64 *", data)[0]))
            return 0

        self._callback = _record  # referenced for as long as libbpf may call it (rule 3)
        self._rb: Any = _check_ptr(
            lib.ring_buffer__new(map_fd, _record, ffi.NULL, ffi.NULL), "ring_buffer__new"
        )

    def fileno(self) -> int:
        """An epoll fd (libbpf's) that is readable while records wait."""
        _, lib = _load()
        if self._rb is None:
            raise BpfError(_errno.EBADF, "ring buffer closed")
        return _check(lib.ring_buffer__epoll_fd(self._rb), "ring_buffer__epoll_fd")

    def consume(self) -> list[int]:
        """Every record waiting now, oldest first (without waiting)."""
        _, lib = _load()
        if self._rb is None:
            raise BpfError(_errno.EBADF, "ring buffer closed")
        _check(lib.ring_buffer__consume(self._rb), "ring_buffer__consume")
        got = self._got[:]
        self._got.clear()
        return got

    def close(self) -> None:
        if self._rb is not None:
            _, lib = _load()
            lib.ring_buffer__free(self._rb)
            self._rb = None


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    """``bpf_prog_attach``: the attachment lives as long as the target map."""
    _, lib = _load()
    _check(lib.bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "bpf_prog_attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """``bpf_prog_detach2``."""
    _, lib = _load()
    _check(lib.bpf_prog_detach2(prog_fd, target_fd, attach_type), "bpf_prog_detach2")


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    """``bpf_link_create`` (kernel ≥ 6.10 for sockmaps): returns a link fd that
    detaches the program when closed, including when the process dies.

    Args:
        prog_fd: The program.
        target_fd: The map, or for ``BPF_XDP``/``BPF_TCX_INGRESS`` the ifindex.
        attach_type: ``enum bpf_attach_type``.
        flags: ``link_create.flags`` (for ``BPF_XDP`` the ``XDP_FLAGS_*`` mode).
    """
    ffi, lib = _load()
    opts = ffi.NULL
    if flags:
        opts = ffi.new("struct l4gw_link_create_opts *")
        opts.sz = ffi.sizeof("struct l4gw_link_create_opts")
        opts.flags = flags
    return _check(lib.bpf_link_create(prog_fd, target_fd, attach_type, opts), "bpf_link_create")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """``bpf_prog_query``: the ids of the programs attached to ``target_fd`` (for
    ``BPF_TCX_INGRESS`` an ifindex of this network namespace) as ``attach_type``."""
    ffi, lib = _load()
    ids = ffi.new("__u32[]", 64)
    count = ffi.new("__u32 *", 64)
    ret = lib.bpf_prog_query(target_fd, attach_type, 0, ffi.NULL, ids, count)
    if ret == -_errno.ENOENT:
        return []
    _check(ret, "bpf_prog_query")
    return [int(ids[i]) for i in range(min(int(count[0]), 64))]


def num_possible_cpus() -> int:
    """How many per-CPU slots a ``PERCPU_*`` map value has."""
    _, lib = _load()
    return _check(lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


@dataclass(frozen=True, slots=True)
class ProgRun:
    """The outcome of one ``BPF_PROG_TEST_RUN``.

    Attributes:
        retval: The program's return value (a u32: tc's -1 is 0xFFFFFFFF).
        duration_ns: Average run time per repetition.
    """

    retval: int
    duration_ns: int


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1) -> ProgRun:
    """Run a loaded XDP or tc program on ``data`` (a frame from its Ethernet header).

    Raises:
        BpfError: e.g. ``EINVAL`` for a frame shorter than an Ethernet header.
    """
    ffi, lib = _load()
    buf = ffi.new("char[]", data)
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    opts.data_in = buf
    opts.data_size_in = len(data)
    opts.repeat = repeat
    _check(lib.bpf_prog_test_run_opts(prog_fd, opts), "bpf_prog_test_run_opts")
    return ProgRun(int(opts.retval), int(opts.duration))


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    """``bpf_xdp_attach`` (netlink: the program stays after the process dies)."""
    ffi, lib = _load()
    _check(lib.bpf_xdp_attach(ifindex, prog_fd, flags, ffi.NULL), "bpf_xdp_attach")


def xdp_detach(ifindex: int, flags: int) -> None:
    """``bpf_xdp_detach``. Pass the mode (``XDP_FLAGS_SKB_MODE`` for a generic one):
    with flags 0 it returned 0 and left a generic program attached (shield.md §1).

    Raises:
        BpfError: ``EBUSY`` when the program is held by a link (netlink cannot touch it).
    """
    ffi, lib = _load()
    _check(lib.bpf_xdp_detach(ifindex, flags, ffi.NULL), "bpf_xdp_detach")


def xdp_query_id(ifindex: int, flags: int) -> int:
    """The id of the XDP program attached in mode ``flags`` (0 when none)."""
    ffi, lib = _load()
    out = ffi.new("__u32 *")
    _check(lib.bpf_xdp_query_id(ifindex, flags, out), "bpf_xdp_query_id")
    return int(out[0])


def _tc_hook(ifindex: int) -> Any:
    ffi, _ = _load()
    hook = ffi.new("struct bpf_tc_hook *")
    hook.sz = ffi.sizeof("struct bpf_tc_hook")
    hook.ifindex = ifindex
    hook.attach_point = BPF_TC_INGRESS
    return hook


def _tc_opts(handle: int, priority: int, prog_fd: int = 0) -> Any:
    ffi, _ = _load()
    opts = ffi.new("struct bpf_tc_opts *")
    opts.sz = ffi.sizeof("struct bpf_tc_opts")
    opts.handle = handle
    opts.priority = priority
    opts.prog_fd = prog_fd
    return opts


def tc_hook_create(ifindex: int) -> bool:
    """Add the clsact qdisc to ``ifindex``; ``False`` when it was there already."""
    _, lib = _load()
    ret = lib.bpf_tc_hook_create(_tc_hook(ifindex))
    if ret == -_errno.EEXIST:
        return False
    _check(ret, "bpf_tc_hook_create")
    return True


def tc_attach(ifindex: int, prog_fd: int, handle: int, priority: int) -> None:
    """A direct-action ingress filter (netlink: it stays after the process dies)."""
    _, lib = _load()
    _check(
        lib.bpf_tc_attach(_tc_hook(ifindex), _tc_opts(handle, priority, prog_fd)),
        "bpf_tc_attach",
    )


def tc_query(ifindex: int, handle: int, priority: int) -> int | None:
    """The program id of the ingress filter ``handle``/``priority``; ``None`` when absent."""
    _, lib = _load()
    opts = _tc_opts(handle, priority)
    ret = lib.bpf_tc_query(_tc_hook(ifindex), opts)
    if ret in (-_errno.ENOENT, -_errno.EINVAL):  # no filter; no clsact qdisc at all
        return None
    _check(ret, "bpf_tc_query")
    return int(opts.prog_id)


def tc_detach(ifindex: int, handle: int, priority: int) -> None:
    """Remove the ingress filter ``handle``/``priority`` (only that one: never
    ``bpf_tc_hook_destroy``, which flushes every ingress filter, other tools' too)."""
    _, lib = _load()
    _check(lib.bpf_tc_detach(_tc_hook(ifindex), _tc_opts(handle, priority)), "bpf_tc_detach")


def map_update_elem(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """``bpf_map_update_elem`` with raw key/value bytes of the map's sizes."""
    _, lib = _load()
    _check(lib.bpf_map_update_elem(fd, key, value, flags), "bpf_map_update_elem")


def map_lookup_elem(fd: int, key: bytes, value_size: int) -> bytes | None:
    """``bpf_map_lookup_elem``; ``None`` when the key is absent."""
    ffi, lib = _load()
    buf = ffi.new("char[]", value_size)
    ret = lib.bpf_map_lookup_elem(fd, key, buf)
    if ret == -_errno.ENOENT:
        return None
    _check(ret, "bpf_map_lookup_elem")
    return bytes(ffi.buffer(buf, value_size))


def map_lookup_batches(
    fd: int, key_size: int, value_size: int, chunk: int = 1024
) -> Iterator[tuple[memoryview, memoryview]]:
    """Every entry of a hash or array map through ``bpf_map_lookup_batch``, ``chunk``
    entries a call: per call, its keys and its values, each packed back to back. The
    views are of buffers the next call reuses: read them before asking for more.

    Raises:
        BpfError: The kernel has no batch lookup for this map (EINVAL, ENOTSUPP), or
            another failure (ENOSPC: a hash bucket holds more than ``chunk``).
    """
    ffi, lib = _load()
    keys = ffi.new("char[]", chunk * key_size)
    values = ffi.new("char[]", chunk * value_size)
    # The position between calls: a u32 bucket for hash maps, a key for arrays.
    batch_in, batch_out = ffi.new("char[]", max(8, key_size)), ffi.new("char[]", max(8, key_size))
    count = ffi.new("__u32 *")
    first = True
    while True:
        count[0] = chunk
        ret = lib.bpf_map_lookup_batch(
            fd, ffi.NULL if first else batch_in, batch_out, keys, values, count, ffi.NULL
        )
        if ret < 0 and ret != -_errno.ENOENT:
            _check(ret, "bpf_map_lookup_batch")
        n = count[0]
        if n:
            yield (
                memoryview(ffi.buffer(keys, n * key_size)),
                memoryview(ffi.buffer(values, n * value_size)),
            )
        if ret == -_errno.ENOENT:  # the end of the map
            return
        ffi.memmove(batch_in, batch_out, ffi.sizeof(batch_out))
        first = False


def map_delete_elem(fd: int, key: bytes) -> bool:
    """``bpf_map_delete_elem``; ``False`` when the key was absent."""
    _, lib = _load()
    ret = lib.bpf_map_delete_elem(fd, key)
    if ret == -_errno.ENOENT:
        return False
    _check(ret, "bpf_map_delete_elem")
    return True


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """``bpf_map_get_next_key``; ``key=None`` gives the first key, ``None`` at the end."""
    ffi, lib = _load()
    out = ffi.new("char[]", key_size)
    ret = lib.bpf_map_get_next_key(fd, ffi.NULL if key is None else key, out)
    if ret == -_errno.ENOENT:
        return None
    _check(ret, "bpf_map_get_next_key")
    return bytes(ffi.buffer(out, key_size))


# --- enumerating the kernel's BPF objects (needs CAP_SYS_ADMIN) ---------------------

# linux/bpf.h struct bpf_prog_info: name[16] at offset 64 (layout fixed by the UAPI);
# struct bpf_map_info: name[16] at 24; struct bpf_link_info: prog_id (u32) at 8. The
# buffers are zeroed and no longer than what we read: the kernel copies
# min(its size, ours) and ignores the rest.
_PROG_INFO_LEN: Final = 80
_PROG_NAME_AT: Final = 64
_MAP_INFO_LEN: Final = 40
_MAP_NAME_AT: Final = 24
_LINK_INFO_LEN: Final = 12
_LINK_PROG_AT: Final = 8
_OBJ_NAME_LEN: Final = 16


@dataclass(frozen=True, slots=True)
class KernelObject:
    """One BPF program, map or link that exists in the kernel right now.

    Attributes:
        kind: "prog", "map" or "link".
        id: The kernel's id (unique while the object lives; ids are not reused soon).
        name: The object's name (a link has none: ``link→prog <id>``).
        prog_id: For a link, the id of its program; else 0.
    """

    kind: str
    id: int
    name: str
    prog_id: int = 0


def _info(fd: int, size: int) -> bytes:
    ffi, lib = _load()
    buf = ffi.new("char[]", size)
    length = ffi.new("__u32 *", size)
    _check(lib.bpf_obj_get_info_by_fd(fd, buf, length), "bpf_obj_get_info_by_fd")
    return bytes(ffi.buffer(buf, size))


def _name(raw: bytes, at: int) -> str:
    return raw[at : at + _OBJ_NAME_LEN].split(b"\0", 1)[0].decode(errors="replace")


def kernel_objects(kind: str) -> list[KernelObject]:
    """Every BPF object of ``kind`` ("prog", "map", "link") in the kernel.

    Objects that vanish while we walk the ids are skipped.

    Raises:
        BpfError: ``EPERM`` without CAP_SYS_ADMIN.
    """
    ffi, lib = _load()
    next_id = getattr(lib, f"bpf_{kind}_get_next_id")
    fd_by_id = getattr(lib, f"bpf_{kind}_get_fd_by_id")
    out: list[KernelObject] = []
    current = 0
    nxt = ffi.new("__u32 *")
    while True:
        ret = next_id(current, nxt)
        if ret == -_errno.ENOENT:
            return out
        _check(ret, f"bpf_{kind}_get_next_id")
        current = int(nxt[0])
        fd = fd_by_id(current)
        if fd == -_errno.ENOENT:
            continue
        _check(fd, f"bpf_{kind}_get_fd_by_id")
        try:
            if kind == "prog":
                raw = _info(fd, _PROG_INFO_LEN)
                out.append(KernelObject(kind, current, _name(raw, _PROG_NAME_AT)))
            elif kind == "map":
                raw = _info(fd, _MAP_INFO_LEN)
                out.append(KernelObject(kind, current, _name(raw, _MAP_NAME_AT)))
            else:
                raw = _info(fd, _LINK_INFO_LEN)
                prog = int.from_bytes(raw[_LINK_PROG_AT : _LINK_PROG_AT + 4], "little")
                out.append(KernelObject(kind, current, f"link→prog {prog}", prog))
        finally:
            os.close(fd)


def object_exists(kind: str, object_id: int) -> bool:
    """Whether the BPF object ``kind`` ("prog", "map", "link", "btf") ``object_id`` exists.

    Raises:
        BpfError: ``EPERM`` without CAP_SYS_ADMIN.
    """
    _, lib = _load()
    fd = getattr(lib, f"bpf_{kind}_get_fd_by_id")(object_id)
    if fd == -_errno.ENOENT:
        return False
    _check(fd, f"bpf_{kind}_get_fd_by_id")
    os.close(fd)
    return True


def map_fd_by_id(map_id: int) -> int:
    """An fd of the map with id ``map_id`` (the caller closes it).

    Raises:
        BpfError: ``ENOENT`` when it no longer exists; ``EPERM`` without CAP_SYS_ADMIN.
    """
    _, lib = _load()
    return _check(lib.bpf_map_get_fd_by_id(map_id), "bpf_map_get_fd_by_id")


def prog_name(prog_id: int) -> str | None:
    """The name of the BPF program ``prog_id``; ``None`` when it no longer exists.

    Raises:
        BpfError: ``EPERM`` without CAP_SYS_ADMIN.
    """
    _, lib = _load()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd == -_errno.ENOENT:
        return None
    _check(fd, "bpf_prog_get_fd_by_id")
    try:
        return _name(_info(fd, _PROG_INFO_LEN), _PROG_NAME_AT)
    finally:
        os.close(fd)
