"""Secrets kept out of everything the gateway shows: ``/config``, log lines, error messages.

Every layer that may print a configuration value or a URL calls these
functions (the admin endpoint's ``/config``, :class:`gateway.config.ConfigError`,
the log handler's filter that ``l4gw run`` installs, plugins through
``gateway.redact_url``), so there is one definition of what is secret.

Rules kept here:

* **Credentials are found by parsing the URL, never by guessing at the
  secret.** A URL is ``scheme://[userinfo@]host[:port][/path]``; as in
  :func:`urllib.parse.urlsplit`, the userinfo ends at the *last* ``@`` of the
  authority, so a password holding ``@`` or ``:`` is masked whole, whatever
  it contains (``%``-escapes included: the raw text is replaced, nothing is
  decoded).
* **Over-mask rather than leak.** ``urlsplit`` itself is not used: it raises
  on a ``[`` or ``]`` in a password, and an unescaped ``/``, ``?`` or ``#``
  in a password ends its authority early, leaving the rest of the password
  in what it calls the path. Here the userinfo runs to the last ``@`` after
  ``scheme://``, wherever it is, so such a password is masked too; the price
  is that a URL with an ``@`` in its path (``http://host/a@b``) loses its
  host as well.
* **A lone user name is a secret.** ``scheme://TOKEN@host`` carries a token
  as the user name (GitHub-style, or Redis ``AUTH`` with a password only):
  it is masked. In ``user:password`` only the password is.
* **Keys named like secrets are masked whole** (``token``, ``password``,
  ``api_key``, ``client_secret``, ...), whatever their value looks like.
  A key ending in ``_file`` (``token_file``, ``redis_url_file``) names the
  file a secret is read from: its value is a path and is shown; the secret
  read from it (:class:`gateway.schema.SecretFile`) is shown as that path.
* Nothing here raises: any text goes in, text comes out.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from gateway.schema import SecretFile

REDACTED = "<redacted>"
"""What a secret is replaced with."""

_SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?|token|secret|api[_-]?key|private[_-]?key|credential", re.I
)
# RFC 3986 section 3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# In free text a URL runs to the next white space (a value with white space in its
# password is masked by redact_url where it is a whole value, before it is quoted).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def redact_url(url: str) -> str:
    """``url`` with the credentials of its userinfo masked (see the module rules).

    Text that does not start with ``scheme://`` is returned unchanged.

    >>> redact_url("redis://user:p@ss@10.0.0.5:6379/0")
    'redis://user:<redacted>@10.0.0.5:6379/0'
    >>> redact_url("redis://:secret@host/0"), redact_url("https://TOKEN@host/x")
    ('redis://:<redacted>@host/0', 'https://<redacted>@host/x')
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return url
    start = scheme.end()
    at = url.rfind("@", start)
    if at < 0:
        return url
    user, colon, password = url[start:at].partition(":")
    if colon:
        masked = f"{user}:{REDACTED}" if password else f"{user}:"
    else:
        masked = REDACTED if user else ""
    return f"{url[:start]}{masked}{url[at:]}"


def redact_text(text: str) -> str:
    """Free text (a log line, an error message) with every URL in it redacted.

    A URL here ends at the next white space; one value that is a whole URL is
    better given to :func:`redact_url`, which needs no such boundary.
    """
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_value(value: str) -> str:
    """One configuration string: a whole URL, or text that may hold some."""
    return redact_url(value) if _SCHEME.match(value) else redact_text(value)


def is_secret_key(key: str) -> bool:
    """True for a key named like a secret (``token``, ``redis_password``, ``api_key``...),
    but not for the path of the file that holds one (``token_file``)."""
    return bool(_SECRET_KEY.search(key)) and not key.endswith("_file")


def redact_config(value: Any, key: str = "") -> Any:
    """A copy of a parsed config (or any part of it) with every secret masked.

    Args:
        value: tables, arrays and scalars as :mod:`tomllib` returns them.
        key: the key ``value`` was found under (decides whether it is a secret).
    """
    if isinstance(value, SecretFile):
        return redact_value(value.path)
    if isinstance(value, Mapping):
        return {str(k): redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_config(v, key) for v in value]
    if key and is_secret_key(key) and value not in ("", None):
        return REDACTED
    if isinstance(value, str):
        return redact_value(value)
    return value


class RedactingFilter(logging.Filter):
    """A log filter that redacts the URLs of every record's message.

    Installed on the handler of ``l4gw run``: whatever a plugin logs, a URL's
    password does not reach the log. The message is formatted here, once: the
    formatter then takes it as it is (no second %-formatting per line).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = (redact_text(message) if "://" in message else message), None
        return True
