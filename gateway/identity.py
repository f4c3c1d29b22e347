"""Who a serving process runs as: ``[gateway] user`` and ``group`` looked up.

Pure lookups (the passwd and group databases), so that ``l4gw check`` can
refuse an unknown user before anything starts, and gateway/process.py can
become it.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """The user and group a serving process runs as (``[gateway] user``/``group``)."""

    uid: int
    gid: int
    user: str
    group: str


class IdentityError(LookupError):
    """A user or group that does not exist; ``key`` is "user" or "group"."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def resolve_identity(user: str, group: str) -> Identity:
    """Look up ``user`` and ``group`` (default: the user's own), names or numbers.

    A number that the databases do not know is taken as it is (a container image
    often runs as a bare uid).

    Raises:
        IdentityError: no such user or group name.
    """
    if user.isdigit():
        try:
            pw: pwd.struct_passwd | None = pwd.getpwuid(int(user))
        except KeyError:
            pw = None
    else:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise IdentityError("user", f'no such user "{user}"') from None
    uid = pw.pw_uid if pw is not None else int(user)
    name = pw.pw_name if pw is not None else user
    if not group:
        gid = pw.pw_gid if pw is not None else uid
        return Identity(uid, gid, name, _group_name(gid))
    if group.isdigit():
        return Identity(uid, int(group), name, _group_name(int(group)))
    try:
        return Identity(uid, grp.getgrnam(group).gr_gid, name, group)
    except KeyError:
        raise IdentityError("group", f'no such group "{group}"') from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
