"""Per-route HTTP Basic authentication (RFC 7617) against bcrypt hashes.

A route with ``basic_auth`` answers 401 with ``WWW-Authenticate: Basic realm="...", charset="UTF-8"``
until the request carries ``Authorization: Basic base64(user:password)`` for one of its users. The
check runs on the pool worker that serves the request (bcrypt is slow on purpose, and must never run
in the accept loop).

Timing: ``bcrypt.checkpw`` compares in constant time, and an unknown user still costs one bcrypt
check, against a dummy hash of the users' usual cost, so the answer time does not tell which user
names exist.

bcrypt reads only the first 72 bytes of a password; longer ones are cut there, as htpasswd -B does
when it makes the hash (``pyproxy hash-password`` refuses them instead).
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import hmac
import logging
import os
import threading

import bcrypt

from proxy.config.edge import BasicAuthConfig, bcrypt_cost
from proxy.http.errors import Unauthorized

log = logging.getLogger("pyproxy.basic_auth")

BCRYPT_MAX_PASSWORD_BYTES = 72
DEFAULT_COST = 12  # bcrypt.gensalt's default: about 0.2 s of one core per hash on a current CPU
# Recent successful checks, remembered so that a signed-in browser, which sends its credentials with
# every request (a page and its 30 assets), does not cost a bcrypt check (~0.2 s of CPU) each time.
# Bounded: the oldest entry goes first. Keys are HMACs under a per-process random key, so no
# password, nor anything an offline guesser could test passwords against, is kept in memory.
RECENT_LIMIT = 1024


class BasicAuth:
    """One route's users and the answer to give anyone else (an immutable snapshot with its own cache:
    a reload builds a new one, so a changed password or a removed user takes effect at once)."""

    def __init__(self, config: BasicAuthConfig):
        self.realm = config.realm
        self.users = {name: password_hash.encode("ascii") for name, password_hash in config.users}
        self.challenge = (("WWW-Authenticate", f'Basic realm="{config.realm}", charset="UTF-8"'),)
        # The client's credentials stop here unless the route says the upstream checks them too.
        self.dropped_headers = frozenset() if config.forward_auth_header else frozenset({"authorization"})
        costs = collections.Counter(bcrypt_cost(password_hash) for _, password_hash in config.users)
        self.usual_cost = costs.most_common(1)[0][0] if costs else DEFAULT_COST
        self._recent: dict[bytes, bytes] = {}  # HMAC(user, password) -> the hash it was checked against
        self._recent_key = os.urandom(32)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: BasicAuthConfig | None) -> "BasicAuth | None":
        return cls(config) if config is not None else None

    def check(self, authorization: list[str], client: str = "-") -> str:
        """The signed-in user's name, or Unauthorized (401 with the challenge). ``authorization`` is
        every Authorization field the request carried (more than one is refused)."""
        credentials = parse_credentials(authorization[0]) if len(authorization) == 1 else None
        if credentials is None:
            # No credentials is how every browser starts: the challenge, without a log line.
            detail = "" if not authorization else f"malformed Basic credentials from {client}"
            raise Unauthorized(log_detail=detail, headers=self.challenge)
        user, password = credentials
        stored = self.users.get(user)
        key = hmac.digest(self._recent_key, user.encode("utf-8", "surrogateescape") + b"\0" + password, "sha256")
        if stored is not None and self._recent.get(key) == stored:
            return user
        if stored is None:
            bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD_BYTES], dummy_hash(self.usual_cost))  # same cost, same time
            raise Unauthorized(log_detail=f"unknown user {user!r} from {client}", headers=self.challenge)
        if not _password_matches(password, stored):
            raise Unauthorized(log_detail=f"wrong password for user {user!r} from {client}", headers=self.challenge)
        self._remember(key, stored)
        return user

    def _remember(self, key: bytes, stored: bytes) -> None:
        with self._lock:
            self._recent.pop(key, None)
            self._recent[key] = stored
            while len(self._recent) > RECENT_LIMIT:
                del self._recent[next(iter(self._recent))]  # dicts keep insertion order: the oldest


def parse_credentials(value: str) -> tuple[str, bytes] | None:
    """(user, password bytes) from "Basic dXNlcjpwYXNz", or None when it is not Basic credentials.

    The header was read as latin-1; the base64 inside is ASCII. The user name is UTF-8 (the charset
    the challenge announces, RFC 7617 §2.1); bytes that are not UTF-8 are kept as surrogates, so they
    name no user. The password stays bytes: bcrypt compares bytes."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user.decode("utf-8", "surrogateescape"), password


def _password_matches(password: bytes, stored: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD_BYTES], stored)
    except ValueError:  # a hash bcrypt cannot read after all (the config check is a pattern match)
        log.error("basic_auth: a stored hash is not usable by bcrypt; that user cannot sign in")
        return False


@functools.lru_cache(maxsize=None)
def dummy_hash(cost: int) -> bytes:
    """A hash of a random password at this cost, made on first use (on a pool worker, once per cost)."""
    return bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(cost))


def hash_password(password: bytes, cost: int = DEFAULT_COST) -> str:
    """A bcrypt hash for ``basic_auth`` users; ValueError for a password bcrypt would cut or that is empty."""
    if not password:
        raise ValueError("the password is empty")
    if len(password) > BCRYPT_MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is {len(password)} bytes long; bcrypt reads only the first "
                         f"{BCRYPT_MAX_PASSWORD_BYTES}, so the rest would not count")
    return bcrypt.hashpw(password, bcrypt.gensalt(cost)).decode("ascii")
