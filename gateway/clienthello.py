"""Parse the TLS ClientHello a client sends first, to route its connection by SNI and ALPN.

The listener peeks at the first bytes of a connection (``MSG_PEEK``, so they stay in the socket
for the backend) and hands them to :func:`parse_client_hello`. The parser only reads: it decides
whether the bytes are a complete ClientHello, need more bytes, or are not a ClientHello at all.

The bytes come from anyone on the network, so the module keeps these rules:

Rule 1: never raise. Any bytes-like input yields a :class:`ClientHello`, an ``int`` or ``None``.
    Malformed or hostile input is ``None``; nothing in the input can make the parser raise
    (only an argument that is not a buffer at all is a ``TypeError``).
Rule 2: bound every length. Each length field is checked against the bytes that enclose it
    before it is used, so a length can make a parse fail but can never make it read outside its
    vector, loop without progress, or wait for more than ``cap`` bytes. Time is linear in
    ``len(data)``: a real hello takes about 15 us, and the worst input of ``cap`` bytes (one-byte
    records or thousands of empty extensions) about 3 ms.
Rule 3: allocate no more than the input. Length fields never size an allocation; only bytes
    actually present are copied: at most one copy of the handshake message (and only when it
    is split across records), plus the strings returned, each decoded from bytes of the input.
Rule 4: an ``int`` is a promise. It is a lower bound on the total bytes a complete ClientHello
    needs, always greater than ``len(data)`` and never greater than ``cap``, so the caller can
    set ``SO_RCVLOWAT`` to it and peek again without spinning or waiting forever.

What is accepted (RFC 8446 sections 4.1.2 and 5.1, RFC 5246 section 6.2, RFC 6066 section 3,
RFC 7301 section 3.1, RFC 8701):

- Records of content type 22 (handshake) only, with version 0x0300 to 0x0304 and a length of
  1 to 2**14 bytes. An SSLv2-compatible hello, any other record type, or other bytes are ``None``.
- The first handshake message must be a ClientHello; it may be fragmented across any number of
  records (reassembled up to ``cap`` bytes of input). It must end at a record boundary, as
  RFC 8446 requires; records after it (early data, ChangeCipherSpec) are not examined.
- The ClientHello body must match its grammar exactly: no bytes after the extensions, and each
  vector within its enclosing one. A server_name or ALPN extension may appear at most once
  (a second copy would let the gateway and the backend see different names).
- In server_name the first entry of type host_name is used. A host name that is not ASCII, is
  longer than 253 characters, or is not made of dot-separated labels of 1 to 63 letters, digits,
  ``-`` or ``_`` gives ``sni=None`` while the hello still parses. An IP literal is returned as
  written; RFC 6066 forbids sending one, but only the backend needs to care.
- GREASE values (RFC 8701) need no special case in extension types (unknown types are
  skipped); GREASE ALPN identifiers are left out of :attr:`ClientHello.alpn`.

With Encrypted Client Hello the name returned is the one in the outer ClientHello, i.e. the
ECH public name, which is all a gateway without the ECH keys can see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_CLIENT_HELLO", "ClientHello", "parse_client_hello"]

MAX_CLIENT_HELLO: Final = 16384 + 5
"""Default ``cap``: one full TLS plaintext record (2**14 bytes) plus its 5-byte header.

Mainstream clients send their ClientHello in one record (even with a post-quantum key share
it is under 2 KB), so a hello that needs more than this is treated as hostile. Pass a larger ``cap``
to :func:`parse_client_hello` to reassemble larger, fragmented hellos.
"""

_CONTENT_HANDSHAKE: Final = 22
_HANDSHAKE_CLIENT_HELLO: Final = 1
_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16
_NAME_TYPE_HOST_NAME: Final = 0

_RECORD_HEADER: Final = 5
_HANDSHAKE_HEADER: Final = 4
# RFC 8446 section 5.1: "The length MUST NOT exceed 2^14 bytes."
_MAX_RECORD_BODY: Final = 1 << 14
# legacy_version (2) + random (32) + empty session id (1) + one cipher suite (2 + 2)
# + one compression method (1 + 1): anything shorter cannot be a ClientHello.
_MIN_CLIENT_HELLO_BODY: Final = 41
_MAX_SESSION_ID: Final = 32
_MAX_HOST_NAME: Final = 253
_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What routing needs from a complete, well-formed ClientHello."""

    sni: str | None
    """The first server_name host_name: ASCII, lower-cased, one trailing dot stripped.

    ``None`` when the extension is absent, has no host_name entry, or the name is not a valid
    DNS name of at most 253 characters.
    """

    alpn: tuple[str, ...]
    """ALPN protocol names in the client's order, ``()`` if the extension is absent.

    Each name is decoded as latin-1, so any byte string maps to exactly one ``str`` and
    ``name.encode("latin-1")`` gives back the bytes on the wire. GREASE identifiers are omitted.
    """


class _Malformed(Exception):
    """Internal: the handshake message breaks the ClientHello grammar.

    Raised only by :class:`_Reader` and the extension parsers, and always caught in
    :func:`_parse_body`; it never leaves this module.
    """


def parse_client_hello(
    data: bytes | bytearray | memoryview, cap: int = MAX_CLIENT_HELLO
) -> ClientHello | int | None:
    """Parse the ClientHello at the start of ``data``.

    Bytes after the record that completes the ClientHello are ignored, so ``data`` may be
    whatever a peek returned.

    Args:
        data: The first bytes received on a connection. Any buffer layout is accepted;
            a non-contiguous or non-byte ``memoryview`` is copied once.
        cap: The most bytes the caller is willing to buffer; a ClientHello that needs more
            is ``None``. With ``cap`` below 5 every input is ``None``.

    Returns:
        The :class:`ClientHello` when ``data`` starts with a complete one; an ``int`` N with
        ``len(data) < N <= cap`` when ``data`` is a valid beginning and at least N bytes in
        total are needed; ``None`` when ``data`` is not a TLS ClientHello, is malformed, or
        would need more than ``cap`` bytes.

    Raises:
        TypeError: ``data`` does not support the buffer protocol (the only exception).
    """
    # The with block releases the view at once, so a bytearray passed in can be resized again.
    with memoryview(data) as raw:
        if raw.format == "B" and raw.ndim == 1 and raw.c_contiguous:
            return _parse_records(raw, cap)
        copy = raw.tobytes()
    return _parse_records(memoryview(copy), cap)


def _parse_records(view: memoryview, cap: int) -> ClientHello | int | None:
    """Walk the handshake records at the start of ``view`` (see :func:`parse_client_hello`).

    This pass only checks record headers and counts handshake bytes, so an incomplete hello
    is never copied; the message is gathered once it is complete.
    """
    size = len(view)
    pos = 0  # start of the current record
    got = 0  # handshake bytes in the records before the current one
    head = b""  # the first bytes (up to 4) of the handshake message: its header
    total = -1  # length of the handshake message including its header, once known
    while True:
        if not _header_ok(view, pos, size):
            return None
        body_start = pos + _RECORD_HEADER
        if size < body_start:
            # Every handshake byte still missing comes after this record header.
            needed = body_start + max(total - got, 0)
            return needed if needed <= cap else None
        length = view[pos + 3] << 8 | view[pos + 4]
        record_end = body_start + length
        if len(head) < _HANDSHAKE_HEADER:
            # The header may itself be split across records; collect it as bytes arrive.
            head_end = min(record_end, size, body_start + _HANDSHAKE_HEADER - len(head))
            head += view[body_start:head_end]
            if head and head[0] != _HANDSHAKE_CLIENT_HELLO:
                return None
            if len(head) == _HANDSHAKE_HEADER:
                total = _HANDSHAKE_HEADER + int.from_bytes(head[1:])
                if total - _HANDSHAKE_HEADER < _MIN_CLIENT_HELLO_BODY:
                    return None
        if total >= 0:
            missing = total - got
            if missing < length:
                # The ClientHello would end inside this record, and RFC 8446 section 5.1
                # requires it to end at a record boundary.
                return None
            needed = record_end + (_RECORD_HEADER + missing - length if missing > length else 0)
        else:
            needed = record_end
        if needed > cap:
            return None
        if size < record_end:
            return needed
        got += length
        if got == total:
            return _parse_message(view, record_end, total)
        pos = record_end


def _header_ok(view: memoryview, pos: int, size: int) -> bool:
    """Check the bytes present of the record header at ``view[pos:]``.

    Args:
        view: The input.
        pos: Where the record header starts.
        size: How many bytes of ``view`` there are; header bytes beyond are not checked.

    Returns:
        Whether the bytes present can begin a handshake record of 1 to 2**14 bytes
        (RFC 8446 section 5.1: "The length MUST NOT exceed 2^14 bytes" and handshake
        records must not be empty).
    """
    present = size - pos
    if present >= _RECORD_HEADER:
        return (
            view[pos] == _CONTENT_HANDSHAKE
            and view[pos + 1] == 3
            and view[pos + 2] <= 4
            and 0 < (view[pos + 3] << 8 | view[pos + 4]) <= _MAX_RECORD_BODY
        )
    return (
        (present < 1 or view[pos] == _CONTENT_HANDSHAKE)
        and (present < 2 or view[pos + 1] == 3)
        and (present < 3 or view[pos + 2] <= 4)
        # The high length byte alone already rules out lengths of 0x4100 and more.
        and (present < 4 or view[pos + 3] <= _MAX_RECORD_BODY >> 8)
    )


def _parse_message(view: memoryview, end: int, total: int) -> ClientHello | None:
    """Gather the handshake message held by the records in ``view[:end]`` and parse it.

    Args:
        view: The input, whose records up to ``end`` were already checked.
        end: The end of the record that completes the message.
        total: The length of the handshake message, header included.

    Returns:
        The parsed ClientHello, or ``None`` if it is malformed.
    """
    if view[3] << 8 | view[4] == total:
        # The common case, one record: parse in place, without a copy.
        return _parse_body(view[_RECORD_HEADER + _HANDSHAKE_HEADER : end])
    message = bytearray(total)  # total < end <= len(view): bounded by the input
    pos = filled = 0
    while pos < end:
        start = pos + _RECORD_HEADER
        pos = start + (view[pos + 3] << 8 | view[pos + 4])
        message[filled : filled + pos - start] = view[start:pos]
        filled += pos - start
    with memoryview(message) as body:
        return _parse_body(body[_HANDSHAKE_HEADER:])


def _parse_body(body: memoryview) -> ClientHello | None:
    """Parse a ClientHello body (RFC 8446 section 4.1.2), strictly.

    Args:
        body: The handshake message without its 4-byte header.

    Returns:
        The parsed ClientHello, or ``None`` if the body breaks the grammar.
    """
    try:
        reader = _Reader(body)
        if reader.u8() != 3:  # legacy_version major
            return None
        reader.skip(1 + 32)  # legacy_version minor, random
        reader.vector(1, max_len=_MAX_SESSION_ID)  # legacy_session_id
        if reader.vector(2, min_len=2).remaining % 2:  # cipher_suites, 2 bytes each
            return None
        reader.vector(1, min_len=1)  # legacy_compression_methods
        if reader.remaining == 0:  # before TLS 1.2 extensions may be absent
            return ClientHello(sni=None, alpn=())
        extensions = reader.vector(2).contents()
        reader.expect_end()
        return _parse_extensions(extensions)
    except _Malformed:
        return None


# The loops below run once per extension, server name or protocol name, which a hostile
# client can make thousands of within the cap; they index the buffer directly instead of
# going through _Reader so that even then a parse stays within a few milliseconds.


def _parse_extensions(block: memoryview) -> ClientHello:
    """Pick server_name and ALPN out of the extensions block.

    Args:
        block: The contents of the extensions vector.

    Returns:
        The ClientHello built from them.

    Raises:
        _Malformed: An extension breaks its grammar or server_name or ALPN is repeated.
    """
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    seen_sni = seen_alpn = False
    pos, end = 0, len(block)
    while pos < end:
        if end - pos < 4:  # extension_type and the length of extension_data
            raise _Malformed
        ext_type = block[pos] << 8 | block[pos + 1]
        start = pos + 4
        pos = start + (block[pos + 2] << 8 | block[pos + 3])
        if pos > end:
            raise _Malformed
        if ext_type == _EXT_SERVER_NAME:
            if seen_sni:
                raise _Malformed
            seen_sni = True
            sni = _parse_server_name(block[start:pos])
        elif ext_type == _EXT_ALPN:
            if seen_alpn:
                raise _Malformed
            seen_alpn = True
            alpn = _parse_alpn(block[start:pos])
    return ClientHello(sni=sni, alpn=alpn)


def _list_contents(ext_data: memoryview) -> memoryview:
    """Return the contents of the non-empty, 2-byte-length list that must fill ``ext_data``.

    Raises:
        _Malformed: The list is empty or its length does not match the extension's.
    """
    if len(ext_data) <= 2 or ext_data[0] << 8 | ext_data[1] != len(ext_data) - 2:
        raise _Malformed
    return ext_data[2:]


def _parse_server_name(ext_data: memoryview) -> str | None:
    """Parse a server_name extension (RFC 6066 section 3).

    Every entry is read as a name type and a 2-byte length vector, which is the only layout
    RFC 6066 defines and the one TLS stacks accept.

    Args:
        ext_data: The extension's data.

    Returns:
        The normalised first host_name, or ``None`` if there is none or it is not valid.

    Raises:
        _Malformed: The list is empty or its lengths do not add up.
    """
    names = _list_contents(ext_data)
    host: bytes | None = None
    pos, end = 0, len(names)
    while pos < end:
        if end - pos < 3:  # name_type and the length of the name
            raise _Malformed
        name_type = names[pos]
        start = pos + 3
        pos = start + (names[pos + 1] << 8 | names[pos + 2])
        if pos > end:
            raise _Malformed
        if name_type == _NAME_TYPE_HOST_NAME and host is None:
            host = bytes(names[start:pos])
    return None if host is None else _normalise_host(host)


def _normalise_host(raw: bytes) -> str | None:
    """Turn a host_name into the form routes are matched on.

    Args:
        raw: The host_name bytes as sent.

    Returns:
        The name lower-cased with one trailing dot stripped, or ``None`` if it is not ASCII,
        is longer than 253 characters, or is not dot-separated labels of 1 to 63 characters
        from ``[a-z0-9_-]``.
    """
    if len(raw) > _MAX_HOST_NAME + 1 or not raw.isascii():
        return None
    host = raw.decode("ascii").lower()
    if host.endswith("."):
        host = host[:-1]
    if len(host) > _MAX_HOST_NAME or not _HOST_NAME.fullmatch(host):
        return None
    return host


def _parse_alpn(ext_data: memoryview) -> tuple[str, ...]:
    """Parse an application_layer_protocol_negotiation extension (RFC 7301 section 3.1).

    Args:
        ext_data: The extension's data.

    Returns:
        The protocol names in order, latin-1 decoded, without GREASE identifiers.

    Raises:
        _Malformed: The list or a name is empty, or the lengths do not add up.
    """
    # latin-1 maps each byte to one character, so the decoded list keeps its byte offsets.
    names = str(_list_contents(ext_data), "latin-1")
    protocols: list[str] = []
    pos, end = 0, len(names)
    while pos < end:
        start = pos + 1
        pos = start + ord(names[start - 1])
        if pos == start or pos > end:
            raise _Malformed
        name = names[start:pos]
        if not _is_grease(name):
            protocols.append(name)
    return tuple(protocols)


def _is_grease(name: str) -> bool:
    """Whether ``name`` is a GREASE ALPN identifier: 0x0A0A, 0x1A1A, ..., 0xFAFA (RFC 8701)."""
    return len(name) == 2 and name[0] == name[1] and ord(name[0]) & 0x0F == 0x0A


class _Reader:
    """A cursor over ``buf[pos:end]`` that raises :class:`_Malformed` instead of overrunning."""

    __slots__ = ("_buf", "_end", "_pos")

    def __init__(self, buf: memoryview, pos: int = 0, end: int | None = None) -> None:
        """Read ``buf[pos:end]``; ``end`` defaults to the end of ``buf``."""
        self._buf = buf
        self._pos = pos
        self._end = len(buf) if end is None else end

    @property
    def remaining(self) -> int:
        """Bytes left to read."""
        return self._end - self._pos

    def _take(self, count: int) -> int:
        """Advance past ``count`` bytes and return where they start."""
        start = self._pos
        if count > self._end - start:
            raise _Malformed
        self._pos = start + count
        return start

    def u8(self) -> int:
        """Read a 1-byte unsigned integer."""
        return self._buf[self._take(1)]

    def skip(self, count: int) -> None:
        """Skip ``count`` bytes."""
        self._take(count)

    def vector(self, length_size: int, min_len: int = 0, max_len: int | None = None) -> _Reader:
        """Read a vector with a ``length_size``-byte length prefix and return a reader over it.

        Args:
            length_size: Bytes in the length prefix (1 or 2).
            min_len: The least length the grammar allows.
            max_len: The most length the grammar allows, if less than the prefix can express.

        Returns:
            A reader bounded to the vector's contents.

        Raises:
            _Malformed: The length is out of range or runs past this reader's end.
        """
        start = self._take(length_size)
        length = int.from_bytes(self._buf[start : start + length_size])
        if length < min_len or (max_len is not None and length > max_len):
            raise _Malformed
        start = self._take(length)
        return _Reader(self._buf, start, start + length)

    def contents(self) -> memoryview:
        """Consume the bytes left and return a view of them (not a copy)."""
        start = self._take(self.remaining)
        return self._buf[start : self._end]

    def expect_end(self) -> None:
        """Raise :class:`_Malformed` unless everything was read."""
        if self._pos != self._end:
            raise _Malformed
