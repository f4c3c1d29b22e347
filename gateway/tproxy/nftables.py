"""A minimal cffi ABI-mode binding of libnftables (``libnftables.so.1``), JSON in and out.

nftables is driven through its own library, never by running ``nft``: one call
submits a whole ``{"nftables": [...]}`` document, and libnftables sends every
command in it as one netlink batch, which the kernel applies atomically (all or
nothing). That is what makes "replace our table" a single step.

Rules kept:

1. One context per :class:`Nftables`, freed by :meth:`Nftables.close` (or the
   ``with`` block). A context is not thread-safe; do not share one.
2. Input and output are JSON. libnftables 1.0.6 (Debian 12) has no input flag;
   with the JSON output flag set it parses a buffer as JSON first, which is the
   documented way on those versions.
3. A non-zero return becomes :class:`NftablesError` carrying nft's own message
   (the error buffer), so a user sees what ``nft`` would have said.

cffi is untyped, so ``ffi``/``lib`` are ``Any`` at this edge; what the module
exports is typed.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any, Final

__all__ = ["Nftables", "NftablesError"]

_CDEF: Final = """
struct nft_ctx;
struct nft_ctx *nft_ctx_new(uint32_t flags);
void nft_ctx_free(struct nft_ctx *ctx);
unsigned int nft_ctx_output_get_flags(struct nft_ctx *ctx);
void nft_ctx_output_set_flags(struct nft_ctx *ctx, unsigned int flags);
int nft_ctx_buffer_output(struct nft_ctx *ctx);
int nft_ctx_buffer_error(struct nft_ctx *ctx);
const char *nft_ctx_get_output_buffer(struct nft_ctx *ctx);
const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx);
int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf);
"""

# nftables/libnftables.h: NFT_CTX_DEFAULT = 0
NFT_CTX_DEFAULT: Final = 0
# nftables/libnftables.h: NFT_CTX_OUTPUT_HANDLE = 1 << 3, NFT_CTX_OUTPUT_JSON = 1 << 4
NFT_CTX_OUTPUT_HANDLE: Final = 1 << 3
NFT_CTX_OUTPUT_JSON: Final = 1 << 4

_ffi: Any = None
_lib: Any = None


class NftablesError(Exception):
    """libnftables refused a command; ``str()`` is nft's message."""


def _load() -> tuple[Any, Any]:
    global _ffi, _lib
    if _lib is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        try:
            lib = ffi.dlopen("libnftables.so.1")
        except OSError as exc:
            raise NftablesError(
                f"cannot load libnftables.so.1 ({exc}); install libnftables1 (Debian, Ubuntu) "
                "or nftables-libs"
            ) from exc
        _ffi, _lib = ffi, lib
    return _ffi, _lib


class Nftables:
    """A libnftables context in the network namespace of the calling thread."""

    def __init__(self) -> None:
        ffi, lib = _load()
        ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if ctx == ffi.NULL:
            raise NftablesError("nft_ctx_new failed (out of memory?)")
        self._ctx: Any = ctx
        flags = lib.nft_ctx_output_get_flags(ctx)
        lib.nft_ctx_output_set_flags(ctx, flags | NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_HANDLE)
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise NftablesError("cannot buffer libnftables output")

    def __enter__(self) -> Nftables:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Free the context; safe to call twice."""
        if self._ctx is not None:
            _, lib = _load()
            lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Submit ``commands`` as one ``{"nftables": [...]}`` document (one transaction).

        Args:
            commands: JSON command objects, e.g. ``{"add": {"table": {...}}}``.

        Returns:
            The ``nftables`` array of the output (what a ``list`` command printed);
            empty when the commands print nothing.

        Raises:
            NftablesError: with nft's message, when any command fails; then none
                of them took effect.
        """
        if self._ctx is None:
            raise NftablesError("context closed")
        ffi, lib = _load()
        request = json.dumps({"nftables": commands}).encode()
        rc = lib.nft_run_cmd_from_buffer(self._ctx, request)
        output = ffi.string(lib.nft_ctx_get_output_buffer(self._ctx)).decode()
        error = ffi.string(lib.nft_ctx_get_error_buffer(self._ctx)).decode()
        if rc != 0:
            raise NftablesError(_message(error) or f"nft failed (code {rc})")
        if not output.strip():
            return []
        items: list[dict[str, Any]] = json.loads(output).get("nftables", [])
        return items

    def ruleset(self) -> list[dict[str, Any]]:
        """``list ruleset``: every table, chain, rule and set, as JSON objects.

        Raises:
            NftablesError: e.g. "Operation not permitted" without CAP_NET_ADMIN.
        """
        return self.run([{"list": {"ruleset": None}}])


def _message(error: str) -> str:
    """nft's error text without the echo of our (one-line, long) JSON input."""
    # nft prefixes each message with the input's location, meaningless for JSON input.
    lines = [line.removeprefix("internal:0:0-0: ") for line in error.splitlines() if line.strip()]
    kept = [line for line in lines if not line.lstrip().startswith(("{", "^"))]
    return "; ".join(kept or lines)
