"""Authorization objects: who may connect (QEMU's authz/).

A TLS server that verifies its peers asks an authz object, by id (the
``tls-authz`` parameter), whether the client certificate's distinguished
name (in GnuTLS's form, see :mod:`.dn`) may connect:

==================  ==========================================================
``authz-simple``    ``identity``: exactly this one name
``authz-list``      ``rules`` checked in order, the first match decides with
                    its ``policy``; none matching: the list's ``policy``
                    (``deny`` by default). A rule's ``format`` is ``exact``
                    (default) or ``glob`` (``*`` and ``?``, as GLib's
                    ``g_pattern_match_simple``).
``authz-listfile``  an ``authz-list`` read from a JSON file (``filename``),
                    re-read when it changes if ``refresh`` (default on)
==================  ==========================================================

QEMU 7.2 cannot create ``authz-listfile``: its QAPI name and its type name
(``authz-list-file``) differ, so ``object-add`` answers "invalid object
type: authz-listfile". qmigx creates it as the schema intends.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, Optional

from qmigx.crypto.objects import (POLICIES, ObjectRoot, Prop, UserCreatable, register,
                                  visit_rules)
from qmigx.errors import ObjectError

__all__ = ["AuthZ", "AuthZSimple", "AuthZList", "AuthZListFile", "is_allowed_by_id",
           "glob_match"]


class AuthZ(UserCreatable):
    """An authorization check (QEMU's abstract ``authz`` type)."""

    parent = "authz"

    def is_allowed(self, identity: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


def glob_match(pattern: str, text: str) -> bool:
    """GLib's simple patterns: ``*`` any run, ``?`` any one character, nothing else special."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, text, re.DOTALL) is not None


@register
class AuthZSimple(AuthZ):
    """``authz-simple``: one allowed identity."""

    qom_type = "authz-simple"
    props = (Prop("identity", "str", required=True),)

    def is_allowed(self, identity: str) -> bool:
        return identity == self.get("identity")


def _check_rules(rules: list[dict], identity: str, default: str) -> bool:
    for rule in rules:
        pattern = rule["match"]
        if rule.get("format", "exact") == "glob":
            hit = glob_match(pattern, identity)
        else:
            hit = pattern == identity
        if hit:
            return rule["policy"] == "allow"
    return default == "allow"


@register
class AuthZList(AuthZ):
    """``authz-list``: ordered rules, then a default policy."""

    qom_type = "authz-list"
    props = (Prop("policy", "enum", "deny", values=POLICIES),
             Prop("rules", "rules", None))

    def is_allowed(self, identity: str) -> bool:
        return _check_rules(self.get("rules") or [], identity, self.get("policy"))


@register
class AuthZListFile(AuthZ):
    """``authz-listfile``: an authz-list kept in a JSON file (``{"policy": ..., "rules": [...]}``)."""

    qom_type = "authz-listfile"
    props = (Prop("filename", "str", required=True), Prop("refresh", "bool", True))

    def __init__(self, obj_id: str, values) -> None:
        super().__init__(obj_id, values)
        self._lock = threading.Lock()
        self._stamp: Optional[tuple] = None
        self._policy = "deny"
        self._rules: list[dict] = []

    def complete(self) -> None:
        self._load(force=True)

    def _load(self, *, force: bool) -> None:
        path = self.get("filename")
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if not force and stamp == self._stamp:
                return
            with open(path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise ObjectError(f"Unable to read '{path}': {exc.strerror}", field="filename") from None
        try:
            data: Any = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise ObjectError(f"Unable to parse '{path}': {exc}", field="filename") from None
        if not isinstance(data, dict):
            raise ObjectError(f"'{path}' must hold a JSON object", field="filename")
        for key in data:
            if key not in ("policy", "rules"):
                raise ObjectError(f"Parameter '{key}' is unexpected", field=key)
        policy = data.get("policy", "deny")
        if policy not in POLICIES:
            raise ObjectError(f"Parameter 'policy' does not accept value '{policy}'", field="policy")
        rules = visit_rules(data.get("rules", []))
        self._policy, self._rules, self._stamp = policy, rules, stamp

    def is_allowed(self, identity: str) -> bool:
        with self._lock:
            if self.get("refresh"):
                self._load(force=False)  # a bad new file refuses, it never allows
            return _check_rules(self._rules, identity, self._policy)


def is_allowed_by_id(objects: ObjectRoot, authz_id: str, identity: str) -> bool:
    """Ask the authz object ``authz_id`` about ``identity`` (QEMU's qauthz_is_allowed_by_id).

    Raises:
        ObjectError: no such object, or not an authz object (QEMU's texts);
            the caller refuses the peer.
    """
    obj = objects.get(authz_id)
    if obj is None:
        raise ObjectError(f"Cannot find QAuthZ object ID {authz_id}", field="tls-authz")
    if not isinstance(obj, AuthZ):
        raise ObjectError(f"Object '{authz_id}' is not a QAuthZ subclass", field="tls-authz")
    return obj.is_allowed(identity)


