"""PROXY protocol v1 and v2 codec (HAProxy's proxy-protocol.txt), pure and I/O-free.

The gateway reads this header from clients it does not trust and writes it to backends, so the
parser is written for hostile input. It keeps these rules:

Rule 1: bounded work. A v1 line is at most 107 bytes (the spec's worst case, CRLF included); a v2
payload is at most ``MAX_V2_LENGTH`` bytes. Nothing longer is buffered or scanned, so a peer
cannot make us hold or walk more than ~2 KiB per header however large the buffer handed in.

Rule 2: ``parse`` raises nothing but ``ProxyProtocolError``, whatever the bytes. Every other
failure is a bug. Byte values, lengths and text are checked before they are used.

Rule 3: the result never depends on bytes after the header. ``ProxyHeader.length`` is exactly
what the caller consumes; the rest of the stream is the proxied protocol's.

Rule 4: reject early. Bytes that can never become a valid header (a wrong first byte, a v2 length
over the cap, a port that is already too long) raise as soon as they are seen, so a junk client
is dropped without waiting for its timeout. Conversely, the "need more" answer is never larger
than the shortest valid header that could still follow, so a peer that sent a complete header
and waits for a reply is never left waiting for bytes it will not send.

Rule 5: one reading. Addresses come back in canonical text (``ipaddress``), and TLVs that l4gw
interprets (ALPN, AUTHORITY, CRC32C, UNIQUE_ID, NETNS, TRACEPARENT) may appear at most once, so
two components can never disagree on which copy counts. A CRC32C TLV, when present, is verified.

The encoders build what ``parse`` accepts (same checks, same cap) and raise ``ValueError`` on
bad arguments: those are caller errors, not peer input.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "MAX_V2_LENGTH",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_TRACEPARENT",
    "PP2_TYPE_UNIQUE_ID",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v2",
    "parse",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# The spec lets the v2 length field reach 65535. We carry two addresses (216 bytes at most, for
# AF_UNIX) and a few short TLVs (authority, traceparent, CRC32C, unique id <= 128 bytes), which
# fit easily in 2 KiB. A larger cap would only let a peer make us buffer 64 KiB per connection
# before we can say no.
MAX_V2_LENGTH = 2048

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_NETNS = 0x30
# l4gw's own TLV, in the range the spec reserves for custom use (0xE0-0xEF): a W3C traceparent
# (ASCII) so a backend can continue the gateway's trace.
PP2_TYPE_TRACEPARENT = 0xE0

_V1_PREFIX = b"PROXY "
# "PROXY UNKNOWN " + two 39-char IPv6 addresses + two 5-digit ports + separators + CRLF.
_V1_MAX_LENGTH = 107
_V1_MIN_LENGTH = len(b"PROXY UNKNOWN\r\n")
_V2_FIXED_LENGTH = 16
_V2_MIN_LENGTH = _V2_FIXED_LENGTH

_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_DIGITS = frozenset(b"0123456789")
_V4_CHARS = _DIGITS | frozenset(b".")
# IPv6 text may end in a dotted quad ("::ffff:192.0.2.1"); '%' (scope ids) is deliberately absent.
_V6_CHARS = _DIGITS | frozenset(b"abcdefABCDEF:.")
_V4_TEXT_MAX = len("255.255.255.255")
_V6_TEXT_MAX = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
# The seven family/protocol bytes the spec defines; it says any other must be rejected.
# Value: (transport, address block length, ip version or None).
_V2_FAMILIES: dict[int, tuple[str | None, int, int | None]] = {
    0x00: (None, 0, None),  # AF_UNSPEC: the address block, if any, is opaque.
    0x11: ("tcp", 12, 4),
    0x12: ("udp", 12, 4),
    0x21: ("tcp", 36, 6),
    0x22: ("udp", 36, 6),
    0x31: (None, 216, None),  # AF_UNIX stream: two 108-byte paths, not reported.
    0x32: (None, 216, None),  # AF_UNIX dgram.
}
_V2_TRANSPORTS = {"tcp": 0x1, "udp": 0x2}

_SINGLE_TLVS = frozenset(
    {
        PP2_TYPE_ALPN,
        PP2_TYPE_AUTHORITY,
        PP2_TYPE_CRC32C,
        PP2_TYPE_UNIQUE_ID,
        PP2_TYPE_NETNS,
        PP2_TYPE_TRACEPARENT,
    }
)
_UNIQUE_ID_MAX = 128  # The spec's bound on PP2_TYPE_UNIQUE_ID.
_TLV_VALUE_MAX = 0xFFFF


class ProxyProtocolError(ValueError):
    """The header is malformed; str() is a short reason for the log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY protocol header."""

    version: int
    "1 or 2."
    command: str
    '"PROXY", or "LOCAL" (v2 only: a health check from the proxy itself; use the real peer).'
    transport: str | None
    '"tcp" or "udp"; None for v1 UNKNOWN, v2 LOCAL, AF_UNSPEC and AF_UNIX.'
    source: tuple[str, int] | None
    """(ip, port) of the original client; None when not given. The ip is canonical text: IPv6
    without brackets, compressed, lower case, IPv4-mapped as ``::ffff:192.0.2.1``."""
    destination: tuple[str, int] | None
    "(ip, port) the client connected to; None when not given."
    length: int
    "Total header length in bytes: how many to consume from the stream."
    tlvs: tuple[tuple[int, bytes], ...] = ()
    "v2 TLVs (type, value) in wire order, NOOP and unknown types included; empty for v1."

    def tlv(self, kind: int) -> bytes | None:
        """Return the value of the first TLV of type ``kind``.

        Args:
            kind: TLV type, e.g. ``PP2_TYPE_AUTHORITY``.

        Returns:
            The value, or None if the header has no such TLV.
        """
        for tlv_kind, value in self.tlvs:
            if tlv_kind == kind:
                return value
        return None

    @property
    def authority(self) -> str | None:
        """The AUTHORITY TLV (the host name the client asked for, e.g. TLS SNI), or None.

        Raises:
            UnicodeDecodeError: only for a header built by hand with a non-UTF-8 value;
                ``parse`` rejects those.
        """
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8")

    @property
    def traceparent(self) -> str | None:
        """l4gw's TRACEPARENT TLV (a W3C traceparent), or None.

        Only visible ASCII is checked here; the W3C syntax is the propagator's to judge, since
        a bad trace context must not cost the client its connection.

        Raises:
            UnicodeDecodeError: only for a header built by hand with a non-ASCII value;
                ``parse`` rejects those.
        """
        value = self.tlv(PP2_TYPE_TRACEPARENT)
        return None if value is None else value.decode("ascii")


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | int:
    """Parse a PROXY protocol v1 or v2 header at the start of ``data``.

    Args:
        data: the bytes received so far. Bytes after the header are ignored.

    Returns:
        The header (consume ``header.length`` bytes), or an int N > len(data): read until at
        least N bytes are buffered in total, then call again. N never exceeds the length of a
        valid header that starts with ``data``, so waiting for N bytes cannot deadlock.

    Raises:
        ProxyProtocolError: ``data`` can never become a valid header: bad signature, v1 line
            over 107 bytes without CRLF, v2 length over ``MAX_V2_LENGTH``, wrong version,
            unknown command or family, address family/length mismatch, bad TLV bounds or
            content, CRC32C mismatch, bad v1 address or port. Nothing else is raised.
    """
    buf = memoryview(data).cast("B")
    if not buf:
        return min(_V1_MIN_LENGTH, _V2_MIN_LENGTH)
    if buf[0] == V2_SIGNATURE[0]:
        return _parse_v2(buf)
    if buf[0] == _V1_PREFIX[0]:
        return _parse_v1(buf)
    raise ProxyProtocolError("no PROXY protocol signature")


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """Build a v1 line, ``PROXY TCP4 ...`` or ``PROXY TCP6 ...`` by address family.

    Args:
        source: (ip, port) of the original client.
        destination: (ip, port) the client connected to.

    Returns:
        The header, CRLF included.

    Raises:
        ValueError: an address does not parse, has a scope id, a port is outside 0-65535, or
            the two addresses are of different families.
    """
    src_ip, src_port, dst_ip, dst_port = _check_endpoints(source, destination)
    proto = "TCP4" if src_ip.version == 4 else "TCP6"
    line = f"PROXY {proto} {_ip_text(src_ip)} {_ip_text(dst_ip)} {src_port} {dst_port}\r\n"
    return line.encode("ascii")


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    transport: str = "tcp",
    tlvs: Sequence[tuple[int, bytes]] = (),
    local: bool = False,
) -> bytes:
    """Build a v2 header.

    Args:
        source: (ip, port) of the original client; None with ``local``.
        destination: (ip, port) the client connected to; None with ``local``.
        transport: "tcp" or "udp".
        tlvs: (type, value) pairs, written in order. A ``(PP2_TYPE_CRC32C, b"")`` entry asks
            for a checksum: the encoder fills it in over the finished header.
        local: build a LOCAL header (AF_UNSPEC, no addresses, no TLVs), as for a health check.

    Returns:
        The header.

    Raises:
        ValueError: bad or mixed-family addresses, bad ports, unknown transport, a TLV that
            ``parse`` would reject (bad type, duplicate, bad content, non-empty CRC32C
            placeholder), addresses or TLVs with ``local``, or a payload over MAX_V2_LENGTH.
    """
    if local:
        if source is not None or destination is not None or tlvs:
            raise ValueError("a LOCAL header carries no addresses and no TLVs")
        return V2_SIGNATURE + bytes([0x20 | _CMD_LOCAL, 0x00]) + b"\x00\x00"
    if source is None or destination is None:
        raise ValueError("a PROXY header needs a source and a destination")
    if transport not in _V2_TRANSPORTS:
        raise ValueError(f"transport must be 'tcp' or 'udp', not {transport!r}")
    src_ip, src_port, dst_ip, dst_port = _check_endpoints(source, destination)
    family = 0x10 if src_ip.version == 4 else 0x20
    payload = bytearray(src_ip.packed + dst_ip.packed)
    payload += src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")

    crc_offset: int | None = None
    seen: set[int] = set()
    for kind, raw in tlvs:
        value = bytes(raw)
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type {kind} is not a byte")
        if len(value) > _TLV_VALUE_MAX:
            raise ValueError(f"TLV {kind:#04x} value longer than {_TLV_VALUE_MAX}")
        if kind in _SINGLE_TLVS and kind in seen:
            raise ValueError(f"TLV {kind:#04x} given twice")
        seen.add(kind)
        if kind == PP2_TYPE_CRC32C:
            if value:
                raise ValueError("pass (PP2_TYPE_CRC32C, b'') and the encoder fills it in")
            value = b"\x00\x00\x00\x00"
            crc_offset = _V2_FIXED_LENGTH + len(payload) + 3
        else:
            _check_tlv(kind, value)
        payload += bytes([kind]) + len(value).to_bytes(2, "big") + value

    if len(payload) > MAX_V2_LENGTH:
        raise ValueError(f"v2 payload of {len(payload)} bytes exceeds {MAX_V2_LENGTH}")
    header = bytearray(V2_SIGNATURE)
    header += bytes([0x20 | _CMD_PROXY, family | _V2_TRANSPORTS[transport]])
    header += len(payload).to_bytes(2, "big") + payload
    if crc_offset is not None:
        header[crc_offset : crc_offset + 4] = _crc32c(header).to_bytes(4, "big")
    return bytes(header)


# --- v1 ------------------------------------------------------------------------------------------


def _parse_v1(buf: memoryview) -> ProxyHeader | int:
    # The first LF ends the line; bytes after it are never interpreted.
    head = bytes(buf[:_V1_MAX_LENGTH])
    lf = head.find(b"\n")
    if lf < 0:
        partial = head[:-1] if head.endswith(b"\r") else head
        _check_v1_line(partial, complete=False)
        need = max(_V1_MIN_LENGTH, len(head) + (1 if head.endswith(b"\r") else 2))
        if need > _V1_MAX_LENGTH:
            raise ProxyProtocolError("v1 line without CRLF within 107 bytes")
        return need
    if lf == 0 or head[lf - 1] != ord("\r"):
        raise ProxyProtocolError("v1 line ends in a bare LF")
    line = head[: lf - 1]
    fields = _check_v1_line(line, complete=True)
    if fields is None:
        return ProxyHeader(1, "PROXY", None, None, None, length=lf + 1)
    src, dst, sport, dport = fields
    return ProxyHeader(1, "PROXY", "tcp", (src, sport), (dst, dport), length=lf + 1)


def _check_v1_line(line: bytes, *, complete: bool) -> tuple[str, str, int, int] | None:
    """Check a v1 line without its CRLF, or the start of one (``complete=False``).

    Returns:
        (source ip, destination ip, source port, destination port) for a complete TCP4/TCP6
        line; None for UNKNOWN or for a partial line that may still become valid.

    Raises:
        ProxyProtocolError: the line (or any line starting with it) is invalid.
    """
    if line[: len(_V1_PREFIX)] != _V1_PREFIX[: len(line)]:
        raise ProxyProtocolError("no PROXY protocol signature")
    if b"\r" in line:
        raise ProxyProtocolError("v1 line has a CR before its end")
    rest = line[len(_V1_PREFIX) :]
    if rest.startswith(b"UNKNOWN"):
        # The spec says to ignore whatever follows UNKNOWN; we still want a separator.
        if rest[7:8] not in (b"", b" "):
            raise ProxyProtocolError("v1 unknown protocol")
        return None
    if not rest.startswith((b"TCP4 ", b"TCP6 ")):
        if complete or not any(proto.startswith(rest) for proto in _V1_PROTOCOLS):
            raise ProxyProtocolError("v1 unknown protocol")
        return None

    version = 4 if rest.startswith(b"TCP4") else 6
    fields = rest[5:].split(b" ")
    if len(fields) > 4 or (complete and len(fields) < 4):
        raise ProxyProtocolError("v1 line needs exactly 2 addresses and 2 ports")
    if not complete:
        # Every field but the last is whole; the last may still grow.
        for index, field in enumerate(fields):
            if index < 2:
                _v1_address_prefix(field, version)
                if index < len(fields) - 1:
                    _v1_address(field, version)
            else:
                _v1_port_prefix(field)
                if index < len(fields) - 1:
                    _v1_port(field)
        return None
    return (
        _v1_address(fields[0], version),
        _v1_address(fields[1], version),
        _v1_port(fields[2]),
        _v1_port(fields[3]),
    )


def _v1_address(field: bytes, version: int) -> str:
    """Parse a whole v1 address field into canonical text."""
    _v1_address_prefix(field, version)
    text = field.decode("ascii")  # _v1_address_prefix let through ASCII only.
    try:
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 bad IPv{version} address") from None
    return _ip_text(address)


def _v1_address_prefix(field: bytes, version: int) -> None:
    """Reject ``field`` if no IPv``version`` address text can start with it."""
    chars, longest = (_V4_CHARS, _V4_TEXT_MAX) if version == 4 else (_V6_CHARS, _V6_TEXT_MAX)
    if not chars.issuperset(field) or len(field) > longest:
        raise ProxyProtocolError(f"v1 bad IPv{version} address")


def _v1_port(field: bytes) -> int:
    """Parse a whole v1 port field."""
    _v1_port_prefix(field)
    if not field:
        raise ProxyProtocolError("v1 empty port")
    return int(field)


def _v1_port_prefix(field: bytes) -> None:
    """Reject ``field`` if no port (0-65535, no leading zero) can start with it."""
    if not _DIGITS.issuperset(field):
        raise ProxyProtocolError("v1 port is not decimal")
    if len(field) > 1 and field[0] == ord("0"):
        raise ProxyProtocolError("v1 port has a leading zero")
    # Five digits at most; the length test first keeps int() away from long input.
    if len(field) > 5 or (field and int(field) > 0xFFFF):
        raise ProxyProtocolError("v1 port out of range")


# --- v2 ------------------------------------------------------------------------------------------


def _parse_v2(buf: memoryview) -> ProxyHeader | int:
    fixed = bytes(buf[:_V2_FIXED_LENGTH])
    signature = fixed[: len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[: len(signature)]:
        raise ProxyProtocolError("no PROXY protocol signature")
    if len(fixed) > 12:
        if fixed[12] >> 4 != 2:
            raise ProxyProtocolError("v2 unsupported version")
        if fixed[12] & 0x0F not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyProtocolError("v2 unknown command")
    local = len(fixed) > 12 and fixed[12] & 0x0F == _CMD_LOCAL
    # LOCAL ignores the family byte (spec: "discard the protocol block including the family").
    if len(fixed) > 13 and not local and fixed[13] not in _V2_FAMILIES:
        raise ProxyProtocolError("v2 unknown address family or protocol")
    if len(fixed) < _V2_FIXED_LENGTH:
        return _V2_FIXED_LENGTH

    payload_length = int.from_bytes(fixed[14:16], "big")
    if payload_length > MAX_V2_LENGTH:
        raise ProxyProtocolError("v2 length over limit")
    transport, address_length, ip_version = _V2_FAMILIES.get(fixed[13], (None, 0, None))
    if not local and payload_length < address_length:
        raise ProxyProtocolError("v2 length too short for the address family")
    total = _V2_FIXED_LENGTH + payload_length
    if len(buf) < total:
        return total
    if local:
        return ProxyHeader(2, "LOCAL", None, None, None, length=total)

    header = bytes(buf[:total])
    source = destination = None
    if ip_version is not None:
        addresses = header[_V2_FIXED_LENGTH : _V2_FIXED_LENGTH + address_length]
        size = 4 if ip_version == 4 else 16
        # Both addresses share the family byte, so a v4/v6 mix cannot be expressed.
        ip_type = ipaddress.IPv4Address if ip_version == 4 else ipaddress.IPv6Address
        src_ip = _ip_text(ip_type(addresses[:size]))
        dst_ip = _ip_text(ip_type(addresses[size : 2 * size]))
        ports = addresses[2 * size :]
        source = (src_ip, int.from_bytes(ports[:2], "big"))
        destination = (dst_ip, int.from_bytes(ports[2:], "big"))
    if fixed[13] == 0x00:
        # AF_UNSPEC: address information of unknown size may be present, so TLVs cannot be
        # located. The spec says to ignore the block.
        return ProxyHeader(2, "PROXY", None, None, None, length=total)
    tlvs = _parse_tlvs(header, _V2_FIXED_LENGTH + address_length)
    return ProxyHeader(2, "PROXY", transport, source, destination, length=total, tlvs=tlvs)


def _parse_tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    """Parse the TLVs in ``header[start:]`` and verify a CRC32C TLV if there is one."""
    tlvs: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    crc_offset: int | None = None
    offset = start
    while offset < len(header):
        if len(header) - offset < 3:
            raise ProxyProtocolError("v2 truncated TLV header")
        kind = header[offset]
        value_length = int.from_bytes(header[offset + 1 : offset + 3], "big")
        value_start = offset + 3
        if value_start + value_length > len(header):
            raise ProxyProtocolError("v2 TLV overruns the header")
        value = header[value_start : value_start + value_length]
        if kind in _SINGLE_TLVS and kind in seen:
            raise ProxyProtocolError(f"v2 duplicate TLV {kind:#04x}")
        seen.add(kind)
        _check_tlv(kind, value)
        if kind == PP2_TYPE_CRC32C:
            crc_offset = value_start
        tlvs.append((kind, value))
        offset = value_start + value_length
    if crc_offset is not None:
        expected = int.from_bytes(header[crc_offset : crc_offset + 4], "big")
        zeroed = header[:crc_offset] + b"\x00\x00\x00\x00" + header[crc_offset + 4 :]
        if _crc32c(zeroed) != expected:
            raise ProxyProtocolError("v2 CRC32C mismatch")
    return tuple(tlvs)


def _check_tlv(kind: int, value: bytes) -> None:
    """Check the content of TLV types that l4gw interprets; others are opaque."""
    if kind == PP2_TYPE_CRC32C and len(value) != 4:
        raise ProxyProtocolError("v2 CRC32C TLV is not 4 bytes")
    if kind == PP2_TYPE_UNIQUE_ID and len(value) > _UNIQUE_ID_MAX:
        raise ProxyProtocolError("v2 UNIQUE_ID longer than 128 bytes")
    if kind == PP2_TYPE_AUTHORITY:
        # Control characters in a host name only serve log injection.
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyProtocolError("v2 AUTHORITY is not UTF-8") from None
        if not text.isprintable():
            raise ProxyProtocolError("v2 AUTHORITY has unprintable characters")
    if kind == PP2_TYPE_TRACEPARENT and not all(0x21 <= byte <= 0x7E for byte in value):
        raise ProxyProtocolError("v2 TRACEPARENT is not visible ASCII")


# --- shared --------------------------------------------------------------------------------------

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def _check_endpoints(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[_IPAddress, int, _IPAddress, int]:
    src_ip, src_port = _check_endpoint(source)
    dst_ip, dst_port = _check_endpoint(destination)
    if src_ip.version != dst_ip.version:
        raise ValueError("source and destination are of different address families")
    return src_ip, src_port, dst_ip, dst_port


def _check_endpoint(endpoint: tuple[str, int]) -> tuple[_IPAddress, int]:
    host, port = endpoint
    if not isinstance(host, str):
        raise ValueError(f"address must be text, not {type(host).__name__}")
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError("the PROXY protocol cannot carry an IPv6 scope id")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be an int in 0-65535, not {port!r}")
    return address, port


def _ip_text(address: _IPAddress) -> str:
    """Canonical text for ``address``, the same on every Python version.

    IPv4-mapped IPv6 addresses keep the dotted quad RFC 5952 section 5 recommends: Python 3.11
    prints ``::ffff:102:304`` where 3.13 prints ``::ffff:1.2.3.4``.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _crc32c_table() -> tuple[int, ...]:
    # Castagnoli polynomial, reflected (RFC 3720 appendix B.4), as the spec prescribes.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def _crc32c(data: bytes | bytearray) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
