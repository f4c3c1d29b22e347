"""Tests for gateway.clienthello: real hellos from the ssl module, crafted ones, hostile bytes."""

from __future__ import annotations

import functools
import itertools
import re
import ssl
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.clienthello import MAX_CLIENT_HELLO, ClientHello, parse_client_hello

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID_SNI = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*")


# --- Building hellos -------------------------------------------------------------------------


@functools.cache
def real_hello(
    host: str | None = "example.com",
    alpn: tuple[str, ...] = (),
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> bytes:
    """The bytes OpenSSL sends first as a client, through the ssl module's memory BIOs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = host is not None
    ctx.minimum_version = minimum
    ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    data = outgoing.read()
    assert data[0] == 22 and data[5] == 1
    return data


def record(body: bytes, content_type: int = 22, version: bytes = b"\x03\x01") -> bytes:
    """One TLS record."""
    return bytes([content_type]) + version + len(body).to_bytes(2) + body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    """One handshake message."""
    return bytes([msg_type]) + len(body).to_bytes(3) + body


def extension(ext_type: int, data: bytes) -> bytes:
    """One extension."""
    return ext_type.to_bytes(2) + len(data).to_bytes(2) + data


def server_name(*entries: tuple[int, bytes]) -> bytes:
    """A server_name extension with the given (name_type, name) entries."""
    names = b"".join(bytes([t]) + len(n).to_bytes(2) + n for t, n in entries)
    return extension(0, len(names).to_bytes(2) + names)


def alpn_ext(*protocols: bytes) -> bytes:
    """An ALPN extension."""
    names = b"".join(bytes([len(p)]) + p for p in protocols)
    return extension(16, len(names).to_bytes(2) + names)


def hello_body(
    extensions: list[bytes] | None,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\xc0\x2f",
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello body; ``extensions=None`` leaves out the extensions block."""
    body = (
        b"\x03\x03"
        + bytes(range(32))
        + bytes([len(session_id)])
        + session_id
        + len(suites).to_bytes(2)
        + suites
        + bytes([len(compression)])
        + compression
    )
    if extensions is not None:
        block = b"".join(extensions)
        body += len(block).to_bytes(2) + block
    return body


def crafted(extensions: list[bytes] | None, **kwargs: bytes) -> bytes:
    """A ClientHello in one record."""
    return record(handshake(hello_body(extensions, **kwargs)))


def refragment(hello: bytes, cuts: list[int], version: bytes = b"\x03\x01") -> bytes:
    """Re-send the handshake message of a one-record hello split at ``cuts``."""
    message = hello[5 : 5 + int.from_bytes(hello[3:5])]
    bounds = sorted({c for c in cuts if 0 < c < len(message)} | {0, len(message)})
    return b"".join(record(message[a:b], version=version) for a, b in itertools.pairwise(bounds))


def check_contract(
    data: bytes, result: ClientHello | int | None, cap: int = MAX_CLIENT_HELLO
) -> None:
    """Assert what parse_client_hello promises for any input."""
    if isinstance(result, ClientHello):
        assert result.sni is None or (len(result.sni) <= 253 and VALID_SNI.fullmatch(result.sni))
        assert all(isinstance(p, str) and p for p in result.alpn)
    elif result is not None:
        assert type(result) is int
        assert len(data) < result <= cap


TLS13_ALPN = real_hello("Example.COM", ("h2", "http/1.1"))
TLS12 = real_hello("api.example.org", ("http/1.1",), maximum=ssl.TLSVersion.TLSv1_2)
TLS13_ONLY = real_hello("svc.internal", minimum=ssl.TLSVersion.TLSv1_3)
REAL_HELLOS = [TLS13_ALPN, TLS12, TLS13_ONLY]


# --- Real hellos -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "alpn", "maximum", "minimum", "expected_sni"),
    [
        ("Example.COM", ("h2", "http/1.1"), None, None, "example.com"),
        ("example.com.", (), None, None, "example.com"),
        ("api.example.org", ("http/1.1",), ssl.TLSVersion.TLSv1_2, None, "api.example.org"),
        ("svc.internal", ("h2",), None, ssl.TLSVersion.TLSv1_3, "svc.internal"),
        ("bücher.de", (), None, None, "xn--bcher-kva.de"),
        ("127.0.0.1", ("h2",), None, None, None),  # no SNI is sent for an IP address
        (None, ("acme-tls/1",), None, None, None),
    ],
)
def test_real_hello(
    host: str | None,
    alpn: tuple[str, ...],
    maximum: ssl.TLSVersion | None,
    minimum: ssl.TLSVersion | None,
    expected_sni: str | None,
) -> None:
    data = real_hello(
        host,
        alpn,
        maximum or ssl.TLSVersion.MAXIMUM_SUPPORTED,
        minimum or ssl.TLSVersion.TLSv1_2,
    )
    assert parse_client_hello(data) == ClientHello(sni=expected_sni, alpn=alpn)


@pytest.mark.parametrize("data", REAL_HELLOS)
def test_bytes_like_inputs(data: bytes) -> None:
    expected = parse_client_hello(data)
    assert isinstance(expected, ClientHello)
    buf = bytearray(data)
    assert parse_client_hello(buf) == expected
    buf += b"more"  # the parser released its view: the bytearray can grow again
    assert parse_client_hello(memoryview(data)) == expected
    assert parse_client_hello(memoryview(data)[: len(data)]) == expected
    assert parse_client_hello(memoryview(array("b", data))) == expected  # signed format
    assert parse_client_hello(memoryview(b"\x00" + data)[1:]) == expected
    doubled = bytes(b for byte in data for b in (byte, 0))
    assert parse_client_hello(memoryview(doubled)[::2]) == expected  # not contiguous
    if len(data) % 2 == 0:
        assert parse_client_hello(memoryview(array("H", data))) == expected


@pytest.mark.parametrize("data", REAL_HELLOS)
def test_every_prefix_asks_for_more(data: bytes) -> None:
    assert parse_client_hello(b"") == 5
    for size in range(len(data)):
        needed = parse_client_hello(data[:size])
        assert type(needed) is int
        assert size < needed <= len(data)
    assert isinstance(parse_client_hello(data), ClientHello)


@pytest.mark.parametrize("data", REAL_HELLOS)
def test_following_the_hint_reaches_the_hello(data: bytes) -> None:
    # A caller that sets SO_RCVLOWAT to each answer peeks twice: header, then record.
    answers = []
    result = parse_client_hello(b"")
    while isinstance(result, int):
        answers.append(result)
        result = parse_client_hello(data[:result])
    assert answers == [5, len(data)]
    assert isinstance(result, ClientHello)


@pytest.mark.parametrize("data", REAL_HELLOS)
def test_trailing_records_are_ignored(data: bytes) -> None:
    expected = parse_client_hello(data)
    early_data = record(b"\x17" * 40, content_type=23, version=b"\x03\x03")
    ccs = record(b"\x01", content_type=20, version=b"\x03\x03")
    assert parse_client_hello(data + ccs + early_data) == expected
    assert parse_client_hello(data + b"\xff") == expected
    assert parse_client_hello(data + b"\x00" * 100_000) == expected


# --- Fragmented handshakes -------------------------------------------------------------------


@pytest.mark.parametrize("data", REAL_HELLOS)
def test_one_byte_records(data: bytes) -> None:
    expected = parse_client_hello(data)
    fragmented = refragment(data, list(range(len(data))))
    assert len(fragmented) == 6 * (len(data) - 5)
    assert parse_client_hello(fragmented) == expected
    assert parse_client_hello(fragmented, cap=len(fragmented)) == expected
    assert parse_client_hello(fragmented, cap=len(fragmented) - 1) is None


@PROPERTY
@given(
    data=st.sampled_from(REAL_HELLOS),
    cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=12),
    version=st.sampled_from([b"\x03\x00", b"\x03\x01", b"\x03\x03", b"\x03\x04"]),
)
def test_fragmented_hello_parses(data: bytes, cuts: list[int], version: bytes) -> None:
    fragmented = refragment(data, cuts, version)
    assert parse_client_hello(fragmented) == parse_client_hello(data)


@PROPERTY
@given(
    data=st.sampled_from(REAL_HELLOS),
    cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=8),
    size=st.integers(min_value=0),
)
def test_fragmented_prefix_asks_for_more(data: bytes, cuts: list[int], size: int) -> None:
    fragmented = refragment(data, cuts)
    prefix = fragmented[: size % len(fragmented)]
    needed = parse_client_hello(prefix)
    assert type(needed) is int
    assert len(prefix) < needed <= len(fragmented)


@PROPERTY
@given(
    data=st.sampled_from(REAL_HELLOS),
    cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=8),
    cap=st.integers(min_value=-1, max_value=4000),
)
def test_cap_is_exact(data: bytes, cuts: list[int], cap: int) -> None:
    fragmented = refragment(data, cuts)
    result = parse_client_hello(fragmented, cap=cap)
    if cap >= len(fragmented):
        assert isinstance(result, ClientHello)
    else:
        assert result is None
    for size in (0, 3, 5, 9, len(fragmented) // 2, len(fragmented) - 1):
        prefix = fragmented[:size]
        partial = parse_client_hello(prefix, cap=cap)
        check_contract(prefix, partial, cap)
        assert partial is None or type(partial) is int


def test_records_interleaved_with_other_types_are_rejected() -> None:
    message = TLS12[5:]
    ccs = record(b"\x01", content_type=20)
    assert parse_client_hello(record(message[:50]) + ccs + record(message[50:])) is None


def test_hello_must_end_at_a_record_boundary() -> None:
    message = TLS12[5:]
    finished_too = record(message + handshake(b"\x00" * 12, msg_type=20))
    assert parse_client_hello(finished_too) is None
    assert parse_client_hello(finished_too[:20]) is None  # known as soon as the header is in


def test_hints_are_exact_when_the_rest_comes_in_one_record() -> None:
    data = refragment(TLS12, [100])
    assert parse_client_hello(data[:5]) == 105  # only the first record's length is known
    for size in (9, 50, 104, 105, 107, 109, 110, len(data) - 1):
        assert parse_client_hello(data[:size]) == len(data)
    assert parse_client_hello(data) == parse_client_hello(TLS12)


def test_handshake_header_split_across_records() -> None:
    message = TLS12[5:]
    data = record(message[:1]) + record(message[1:3]) + record(message[3:])
    assert parse_client_hello(data) == parse_client_hello(TLS12)
    assert parse_client_hello(data[:6]) == 11
    assert parse_client_hello(data[:14]) == 18  # 3 of the 4 header bytes: length unknown yet
    assert parse_client_hello(data[:18]) == len(data)
    assert parse_client_hello(data[:19]) == len(data)


# --- Crafted hellos --------------------------------------------------------------------------


def test_server_name_list_takes_first_host_name() -> None:
    sni = server_name((7, b"opaque"), (0, b"First.example"), (0, b"second.example"))
    assert parse_client_hello(crafted([sni])) == ClientHello("first.example", ())


def test_server_name_without_host_name() -> None:
    assert parse_client_hello(crafted([server_name((1, b"x"))])) == ClientHello(None, ())


@pytest.mark.parametrize(
    "name",
    [
        "bücher.example".encode(),
        b"\xff.example",
        b"a" * 254,
        b"",
        b".",
        b"a..b",
        b"a b.example",
        b"a\x00.example",
        b"example.com\r\nx",
        b"[::1]",
        b"a" * 64 + b".example",
    ],
)
def test_invalid_host_name_gives_no_sni(name: bytes) -> None:
    result = parse_client_hello(crafted([server_name((0, name)), alpn_ext(b"h2")]))
    assert result == ClientHello(None, ("h2",))


def test_longest_host_name() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    for sent in (name, name + ".", name.upper()):
        result = parse_client_hello(crafted([server_name((0, sent.encode()))]))
        assert result == ClientHello(name, ())
    too_long = crafted([server_name((0, b"x" + name.encode()))])
    assert parse_client_hello(too_long) == ClientHello(None, ())
    many_labels = "a." * 127  # 254 characters with the trailing dot, 253 without
    result = parse_client_hello(crafted([server_name((0, many_labels.encode()))]))
    assert result == ClientHello(many_labels[:-1], ())


def test_grease() -> None:
    extensions = [
        extension(0x0A0A, b""),
        server_name((0, b"example.com")),
        alpn_ext(b"\x1a\x1a", b"h2", b"\xfa\xfa", b"http/1.1", b"\x0a\x0b"),
        extension(0xFAFA, b"\x00"),
    ]
    result = parse_client_hello(crafted(extensions, suites=b"\x2a\x2a\x13\x01"))
    assert result == ClientHello("example.com", ("h2", "http/1.1", "\n\x0b"))


def test_alpn_names_are_latin1() -> None:
    result = parse_client_hello(crafted([alpn_ext(b"\xff\x00x", b"h3")]))
    assert result == ClientHello(None, ("\xff\x00x", "h3"))
    assert isinstance(result, ClientHello)
    assert result.alpn[0].encode("latin-1") == b"\xff\x00x"


def test_hello_without_extensions() -> None:
    assert parse_client_hello(crafted(None)) == ClientHello(None, ())
    assert parse_client_hello(crafted([])) == ClientHello(None, ())


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            crafted([server_name((0, b"a.example")), server_name((0, b"b.example"))]),
            id="two-server-name-extensions",
        ),
        pytest.param(crafted([alpn_ext(b"h2"), alpn_ext(b"http/1.1")]), id="two-alpn"),
        pytest.param(crafted([extension(0, b"")]), id="empty-server-name"),
        pytest.param(crafted([extension(0, b"\x00\x00")]), id="empty-server-name-list"),
        pytest.param(crafted([extension(0, b"\x00\x04\x00\x00\x05ab")]), id="host-name-overrun"),
        pytest.param(
            crafted([extension(0, b"\x00\x05\x00\x00\x02ab!")]), id="server-name-trailing"
        ),
        pytest.param(crafted([extension(16, b"\x00\x00")]), id="empty-alpn-list"),
        pytest.param(crafted([alpn_ext(b"h2", b"")]), id="empty-alpn-name"),
        pytest.param(crafted([extension(16, b"\x00\x03\x02h2\x00")]), id="alpn-trailing"),
        pytest.param(crafted([extension(99, b"abc")[:-1]]), id="extension-overrun"),
        pytest.param(crafted([], session_id=b"s" * 33), id="session-id-too-long"),
        pytest.param(crafted([], suites=b"\x13\x01\xc0"), id="odd-cipher-suites"),
        pytest.param(crafted([], suites=b""), id="no-cipher-suites"),
        pytest.param(crafted([], compression=b""), id="no-compression"),
        pytest.param(record(handshake(hello_body([]) + b"\x00")), id="after-extensions"),
        pytest.param(record(handshake(hello_body(None) + b"\x00")), id="half-length"),
        pytest.param(record(handshake(b"\x02" + hello_body([])[1:])), id="legacy-version"),
        pytest.param(record(handshake(hello_body([]), msg_type=2)), id="server-hello"),
        pytest.param(record(handshake(b"\x03\x03" + b"\x00" * 38)), id="too-short"),
        pytest.param(b"\x16\x03\x01\x00\x2c\x01\x00\x00\x28", id="too-short-from-header"),
        pytest.param(record(TLS12[5:], content_type=23), id="application-data"),
        pytest.param(record(TLS12[5:], content_type=21), id="alert"),
        pytest.param(record(TLS12[5:], version=b"\x02\x00"), id="record-major"),
        pytest.param(record(TLS12[5:], version=b"\x03\x05"), id="record-minor"),
        pytest.param(b"\x16\x03\x01\x00\x00" + TLS12, id="empty-record"),
        pytest.param(b"\x16\x03\x01\x40\x01" + bytes(16385), id="record-too-long"),
        pytest.param(b"\x16\x03\x01\xff\xff", id="record-0xffff"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\xff\xff\xff", id="handshake-over-cap"),
        pytest.param(b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + bytes(37), id="sslv2"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", id="http"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="proxy-protocol"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh"),
        pytest.param(b"\x17", id="one-byte"),
        pytest.param(b"\x16\x02", id="two-bytes"),
        pytest.param(b"\x16\x03\x09", id="three-bytes"),
        pytest.param(b"\x16\x03\x01\x41", id="four-bytes"),
        pytest.param(b"\x16\x03\x01\x00\x10\x02", id="six-bytes"),
    ],
)
def test_not_a_client_hello(data: bytes) -> None:
    assert parse_client_hello(data) is None


def test_partial_header_asks_for_the_header() -> None:
    for prefix in (b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x40"):
        assert parse_client_hello(prefix) == 5


def test_small_cap() -> None:
    assert parse_client_hello(b"", cap=5) == 5
    for cap in (-1, 0, 4):
        assert parse_client_hello(b"", cap=cap) is None
        assert parse_client_hello(TLS12, cap=cap) is None
    assert parse_client_hello(TLS12[:5], cap=len(TLS12)) == len(TLS12)
    assert parse_client_hello(TLS12[:5], cap=len(TLS12) - 1) is None


# --- Properties ------------------------------------------------------------------------------

labels = st.text(alphabet="abcxyzABCXYZ0189-_", min_size=1, max_size=63)
host_names = st.lists(labels, min_size=1, max_size=5).map(".".join).filter(lambda h: len(h) <= 253)
unknown_extensions = st.builds(
    extension,
    st.integers(min_value=0, max_value=0xFFFF).filter(lambda t: t not in (0, 16)),
    st.binary(max_size=40),
)


@PROPERTY
@given(
    host=st.none() | host_names,
    trailing_dot=st.booleans(),
    protocols=st.none() | st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=5),
    others=st.lists(unknown_extensions, max_size=6),
    position=st.integers(min_value=0, max_value=6),
    cuts=st.lists(st.integers(min_value=1, max_value=500), max_size=4),
)
def test_crafted_round_trip(
    host: str | None,
    trailing_dot: bool,
    protocols: list[bytes] | None,
    others: list[bytes],
    position: int,
    cuts: list[int],
) -> None:
    extensions = list(others)
    if host is not None:
        sent = host + "." if trailing_dot else host
        extensions.insert(position % (len(extensions) + 1), server_name((0, sent.encode())))
    if protocols is not None:
        extensions.insert(position // 2 % (len(extensions) + 1), alpn_ext(*protocols))
    data = refragment(crafted(extensions), cuts)
    expected_alpn = tuple(
        p.decode("latin-1")
        for p in protocols or ()
        if not (len(p) == 2 and p[0] == p[1] and p[0] & 0x0F == 0x0A)
    )
    expected_sni = None if host is None else host.lower()
    assert parse_client_hello(data) == ClientHello(expected_sni, expected_alpn)


@PROPERTY
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    check_contract(data, parse_client_hello(data))


@PROPERTY
@given(
    version=st.integers(min_value=0, max_value=5),
    length=st.integers(min_value=0, max_value=0xFFFF),
    rest=st.binary(max_size=600),
)
def test_random_bytes_after_a_record_header(version: int, length: int, rest: bytes) -> None:
    data = bytes([22, 3, version]) + length.to_bytes(2) + rest
    check_contract(data, parse_client_hello(data))


@PROPERTY
@given(data=st.sampled_from(REAL_HELLOS), size=st.integers(min_value=0, max_value=600))
def test_truncated_real_hello(data: bytes, size: int) -> None:
    prefix = data[:size]
    result = parse_client_hello(prefix)
    check_contract(prefix, result)
    if size < len(data):
        assert type(result) is int and result <= len(data)
    else:
        assert isinstance(result, ClientHello)


@PROPERTY
@given(
    data=st.sampled_from(REAL_HELLOS),
    flips=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
        min_size=1,
        max_size=6,
    ),
    size=st.none() | st.integers(min_value=0, max_value=600),
    cuts=st.lists(st.integers(min_value=1, max_value=600), max_size=3),
)
def test_mutated_real_hello(
    data: bytes, flips: list[tuple[int, int]], size: int | None, cuts: list[int]
) -> None:
    mutated = bytearray(refragment(data, cuts))
    for index, mask in flips:
        mutated[index % len(mutated)] ^= mask
    candidate = bytes(mutated[:size])
    check_contract(candidate, parse_client_hello(candidate))


@PROPERTY
@given(
    record_length=st.integers(min_value=16385, max_value=0xFFFF),
    rest=st.binary(max_size=100),
)
def test_oversized_record_is_rejected(record_length: int, rest: bytes) -> None:
    data = b"\x16\x03\x01" + record_length.to_bytes(2) + rest
    assert parse_client_hello(data) is None
    if record_length >= 0x4100:  # the first length byte alone is enough to tell
        assert parse_client_hello(data[:4]) is None


@PROPERTY
@given(
    cap=st.integers(min_value=50, max_value=100_000),
    handshake_length=st.integers(min_value=41, max_value=(1 << 24) - 1),
    record_length=st.integers(min_value=4, max_value=16384),
)
def test_handshake_longer_than_cap(cap: int, handshake_length: int, record_length: int) -> None:
    data = b"\x16\x03\x01" + record_length.to_bytes(2) + b"\x01" + handshake_length.to_bytes(3)
    result = parse_client_hello(data, cap=cap)
    check_contract(data, result, cap)
    if 5 + 4 + handshake_length > cap or 5 + record_length > cap:
        assert result is None
