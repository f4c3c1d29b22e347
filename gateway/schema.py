"""A small declarative schema for TOML sections, with key-path errors.

The core config and every plugin's ``[plugin.<name>]`` section are checked
with the same pieces, so ``l4gw check`` reports a plugin's mistakes exactly
like the core's: one line per problem, ``<key path>: <what is wrong>``.

Rules kept here:

* Converters are plain functions ``value -> converted`` that raise
  :class:`Invalid`; they never see the key path, :func:`check_section` adds it.
* Every problem is collected; nothing stops at the first error.
* Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

# What a plugin declares its section with (docs/plugins.md); the rest serves the core.
__all__ = [
    "Converter",
    "Field",
    "Invalid",
    "Schema",
    "address",
    "boolean",
    "choice",
    "duration",
    "integer",
    "list_of",
    "name",
    "network",
    "number",
    "port",
    "positive_duration",
    "secret_file",
    "size",
    "string",
    "table",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Invalid(Exception):
    """A value does not convert. ``problems`` holds ``(sub path, message)`` pairs."""

    def __init__(self, message: str = "", problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = list(problems) or [("", message)]


Converter = Callable[[Any], Any]

REQUIRED: Any = object()


@dataclass(frozen=True, slots=True)
class Field:
    """One key of a section.

    Attributes:
        convert: turns the TOML value into the runtime value or raises Invalid.
        default: used when the key is absent; ``REQUIRED`` makes it mandatory.
        doc: one line for the reference documentation.
    """

    convert: Converter
    default: Any = REQUIRED
    doc: str = ""


Schema = Mapping[str, Field]


def check_section(
    raw: Any, path: str, schema: Schema, problems: list[str]
) -> dict[str, Any] | None:
    """Validate one table against ``schema``.

    Returns the converted values (defaults filled in), or None when ``raw`` is
    not a table or any of its keys has a problem. Problems are appended to ``problems`` as
    ``"path.key: message"``.
    """
    if not isinstance(raw, Mapping):
        problems.append(f"{path}: expected a table, got {type_name(raw)}")
        return None
    out: dict[str, Any] = {}
    before = len(problems)
    for key in raw:
        if key not in schema:
            problems.append(f"{join(path, key)}: unknown key")
        elif key.endswith("_file") and key[:-5] in schema and raw[key] and raw.get(key[:-5]):
            # A value and the file holding it: which one is in force would be a guess.
            # ("" is unset, as for every string key that switches something on.)
            problems.append(f"{join(path, key)}: give {key[:-5]} or {key}, not both")
    for key, field in schema.items():
        if key not in raw:
            if field.default is REQUIRED:
                problems.append(f"{join(path, key)}: required")
            else:
                out[key] = field.default
            continue
        try:
            out[key] = field.convert(raw[key])
        except Invalid as exc:
            for sub, message in exc.problems:
                problems.append(f"{join(path, key)}{sub}: {message}")
    return out if len(problems) == before else None


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def type_name(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


# --- converters -------------------------------------------------------------


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {type_name(value)}")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {type_name(value)}")
    return value


def name(value: Any) -> str:
    text = string(value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise Invalid(f"not a name (letters, digits, '_', '.', '-'): {text!r}")
    return text


def integer(low: int | None = None, high: int | None = None) -> Converter:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer, got {type_name(value)}")
        if low is not None and value < low:
            raise Invalid(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise Invalid(f"must be at most {high}, got {value}")
        return value

    return convert


def number(low: float | None = None, high: float | None = None) -> Converter:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"expected a number, got {type_name(value)}")
        if low is not None and value < low:
            raise Invalid(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise Invalid(f"must be at most {high}, got {value}")
        return float(value)

    return convert


def choice(*options: str) -> Converter:
    def convert(value: Any) -> str:
        if value not in options:
            shown = ", ".join(f'"{o}"' for o in options)
            raise Invalid(f"must be one of {shown}, got {value!r}")
        return str(value)

    return convert


_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>ms|us|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse "30s", "500ms", "1m30s", "2h" into seconds. Raises ValueError."""
    pos, total = 0, 0.0
    text = text.strip()
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if not m:
            raise ValueError(f'not a duration (like "30s", "500ms", "5m"): "{text}"')
        total += float(m["n"]) * _DURATION_UNITS[m["unit"]]
        pos = m.end()
    if not text:
        raise ValueError('not a duration (like "30s", "500ms", "5m"): ""')
    return total


def duration(value: Any) -> float:
    """A duration in seconds; ``0`` is allowed bare (it needs no unit)."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    if not isinstance(value, str):
        raise Invalid(f'expected a duration string like "30s", got {type_name(value)}')
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise Invalid(str(exc))


def positive_duration(value: Any) -> float:
    """A duration longer than 0s: a timeout or period that cannot be zero.

    A zero timeout fails every attempt at once and a zero period turns a loop
    into a busy loop, so ``0`` is refused where nothing could work with it.
    """
    seconds = duration(value)
    if seconds <= 0:
        raise Invalid("must be longer than 0s")
    return seconds


_SIZE = re.compile(r"(?P<n>\d+)\s*(?P<unit>B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "k": 1024,
    "K": 1024,
    "MiB": 1024**2,
    "M": 1024**2,
    "GiB": 1024**3,
    "G": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def size(value: Any) -> int:
    """A byte count: an integer, or a string like "64KiB", "1MiB", "512B"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if not isinstance(value, str):
        raise Invalid(f'expected a size like "64KiB", got {type_name(value)}')
    m = _SIZE.fullmatch(value.strip())
    if not m:
        raise Invalid(f'not a size (like "64KiB", "1MiB"): "{value}"')
    try:
        n = int(m["n"])
    except ValueError:  # more digits than int() reads (sys.get_int_max_str_digits())
        raise Invalid(f'not a size (like "64KiB", "1MiB"): a number of {len(m["n"])} digits')
    return n * _SIZE_UNITS[m["unit"]]


def format_size(n: int) -> str:
    """``n`` bytes as a config file would say it: "64KiB", "1MiB", or "512"."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def size_in(low: int, high: int) -> Converter:
    """A size (see :func:`size`) from ``low`` to ``high`` bytes.

    A size is easily off by a unit ("64GB" for "64MB"): a bound turns that into
    a problem at check time rather than a MemoryError, or a gateway that closes
    every connection, at run time.
    """

    def convert(value: Any) -> int:
        n = size(value)
        shown = f'"{value}"' if isinstance(value, str) else str(n)
        if n < low:
            raise Invalid(f"must be at least {format_size(low)}, got {shown}")
        if n > high:
            raise Invalid(f"must be at most {format_size(high)}, got {shown}")
        return n

    return convert


def list_of(item: Converter, *, min_items: int = 0) -> Converter:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise Invalid(f"expected an array, got {type_name(value)}")
        if len(value) < min_items:
            raise Invalid(f"needs at least {min_items} item{'s' if min_items > 1 else ''}")
        out: list[Any] = []
        problems: list[tuple[str, str]] = []
        for i, element in enumerate(value):
            try:
                out.append(item(element))
            except Invalid as exc:
                problems.extend((f"[{i}]{sub}", msg) for sub, msg in exc.problems)
        if problems:
            raise Invalid(problems=problems)
        return tuple(out)

    return convert


def table(schema: Schema) -> Converter:
    """A nested table checked against its own schema."""

    def convert(value: Any) -> dict[str, Any]:
        problems: list[str] = []
        out = check_section(value, "", schema, problems)
        if problems or out is None:
            raise Invalid(problems=[_split(p) for p in problems])
        return out

    return convert


def _split(problem: str) -> tuple[str, str]:
    # check_section with an empty path yields "key: message" or ": message".
    key, _, message = problem.partition(": ")
    return ((f".{key}" if key else ""), message)


# --- secrets in files -------------------------------------------------------

SECRET_FILE_MAX = 64 << 10
"""Largest secret file read: a token, a URL or a passphrase is a line, and a
mistyped path (``/dev/zero``) must not be read whole."""


@dataclass(frozen=True, slots=True)
class SecretFile:
    """A secret read from a file: what a ``*_file`` key holds once validated.

    Shown as its path (``str``, ``repr``, ``/config``), never as its value.
    """

    path: str
    """The file, as the configuration names it."""
    value: Any = dataclass_field(repr=False)
    """The file's text, one trailing newline removed (and converted by the
    key's content check, when it has one)."""

    def __str__(self) -> str:
        return self.path


def secret_file(content: Converter | None = None) -> Converter:
    """A key naming a file that holds a secret (a mounted Kubernetes Secret).

    The file is read when the configuration is validated, so every reload
    (SIGHUP) reads it again: a rotated secret applies with the reload. One
    trailing newline (``\\n`` or ``\\r\\n``, as ``echo`` and editors leave) is
    removed; an empty, unreadable or non-UTF-8 file is a problem naming the
    file. A problem never quotes the file's text. ``""`` is unset (None).

    Args:
        content: checks or converts the text (a URL parser, say); its
            problems are reported with the file's path.
    """

    def convert(value: Any) -> SecretFile | None:
        path = string(value)
        if not path:
            return None  # "" is unset, like the key's absence
        try:
            with open(path, "rb") as f:
                data = f.read(SECRET_FILE_MAX + 1)
        except OSError as exc:
            raise Invalid(f'cannot read "{path}": {exc.strerror}')
        if len(data) > SECRET_FILE_MAX:
            raise Invalid(f'"{path}" is larger than {format_size(SECRET_FILE_MAX)}')
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise Invalid(f'"{path}" is not UTF-8 text')
        text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
        if not text:
            raise Invalid(f'"{path}" is empty')
        if content is None:
            return SecretFile(path, text)
        try:
            return SecretFile(path, content(text))
        except Invalid as exc:
            raise Invalid(problems=[(sub, f'in "{path}": {msg}') for sub, msg in exc.problems])

    return convert


# --- network values ---------------------------------------------------------


def split_host_port(text: str) -> tuple[str, int]:
    """Split "1.2.3.4:80" or "[::1]:80" into a canonical (host, port). Raises ValueError."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError
        ip = ipaddress.IPv4Address(host)
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (len(port) > 1 and port[0] == "0"):
        raise ValueError
    return str(ip), int(port)


def address(value: Any) -> tuple[str, int]:
    """An "ip:port" or "[ipv6]:port" string."""
    text = string(value)
    try:
        return split_host_port(text)
    except ValueError:
        raise Invalid(f'not an address: "{text}" (expected "1.2.3.4:80" or "[::1]:80")')


def network(value: Any) -> IPNetwork:
    text = string(value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise Invalid(f'not a CIDR: "{text}"')


def port(value: Any) -> int:
    result: int = integer(1, 65535)(value)
    return result


def hostname_pattern(value: Any) -> str:
    """An SNI name or "*.suffix" wildcard, stored lower-case."""
    text = string(value).lower().rstrip(".")
    body = text[2:] if text.startswith("*.") else text
    if not body or not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", body):
        raise Invalid(f'not a host name or "*.domain" pattern: "{value}"')
    return text


ALPN_MAX = 255
"""An ALPN protocol name is 1 to 255 bytes (RFC 7301 section 3.1: a one-byte length)."""


def alpn_protocol(value: Any) -> str:
    """A TLS ALPN protocol name ("h2", "http/1.1"), matched exactly, case included."""
    text = string(value)
    # The wire carries bytes; a TOML string is sent as its UTF-8 encoding.
    if not 1 <= len(text.encode()) <= ALPN_MAX:
        raise Invalid(f"not an ALPN protocol name (1 to {ALPN_MAX} bytes): {text!r}")
    return text


def format_address(host: str, port_: int) -> str:
    """The inverse of :func:`split_host_port`: IPv6 hosts are bracketed."""
    return f"[{host}]:{port_}" if ":" in host else f"{host}:{port_}"
