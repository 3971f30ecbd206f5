"""Per-route rate limits: a token bucket per client (or per value of a header), answered with 429.

A route's ``rate_limit = { requests, per, burst, key }`` gives each key a bucket of ``burst`` tokens,
refilled at ``requests`` per ``per``; a request takes one token, and one that finds none is answered
``429`` with ``Retry-After`` (seconds until a token is back). Every answer on the route, allowed or
not, carries the IETF draft's ``RateLimit-Limit`` (the burst), ``RateLimit-Remaining`` and
``RateLimit-Reset`` (seconds until the bucket is full again).

The key is the trusted client address (after ``server.trusted_proxies``, as allow / deny use it),
never a header the client chose. An IPv6 address counts in its canonical spelling, and an
IPv4-mapped one (``::ffff:10.1.2.3``, how a dual-stack listener or balancer reports an IPv4 client)
as its IPv4 address, as allow / deny check it: one client has one bucket however it is written.

With ``key = "header:X-Api-Key"`` a request without that header (or with it empty) is keyed on its
client address instead: leaving the header out does not escape the limit, and clients without a key
do not all share one bucket (where one of them could lock out the rest). A request with the header
twice is refused (400): most servers read one of the two (the first, or the last), so any other key
for the pair would let a client add a second field, random or empty, for a fresh bucket each time.

The buckets live in the process's ``BucketTable`` (shared memory, shared by every worker). A bucket
is found by a hash of the route (its host, path and limit) and the key, so a reload keeps the buckets
of a route whose limit did not change, and a route whose limit changed starts with full buckets.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math

from proxy.config.edge import RateLimitPolicy
from proxy.http.bucket_table import BucketTable
from proxy.http.errors import Refused, TooManyRequests


class RateLimiter:
    """One route's limit over the shared table (rebuilt by a reload; the table carries on)."""

    def __init__(self, policy: RateLimitPolicy, route_name: str, table: BucketTable, clock):
        self.policy = policy
        self.table = table
        self.clock = clock
        self._capacity = policy.burst
        self._rate = policy.rate
        identity = f"{route_name}\0{policy.requests}\0{policy.per!r}\0{policy.burst}\0{policy.key}"
        self._route_hash = hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=8)

    def check(self, client: str, headers) -> str:
        """Take a token for this request: the RateLimit-* header lines for the response, or
        TooManyRequests (429) carrying them and Retry-After."""
        allowed, tokens = self.table.take(self.bucket_key(client, headers), self._capacity, self._rate, self.clock())
        reset = math.ceil((self._capacity - tokens) / self._rate)
        if allowed:
            return (f"RateLimit-Limit: {self._capacity}\r\nRateLimit-Remaining: {int(tokens)}\r\n"
                    f"RateLimit-Reset: {reset}\r\n")
        retry_after = max(1, math.ceil((1.0 - tokens) / self._rate))
        raise TooManyRequests(headers=(("Retry-After", str(retry_after)), ("RateLimit-Limit", str(self._capacity)),
                                       ("RateLimit-Remaining", str(int(tokens))), ("RateLimit-Reset", str(reset))))

    def bucket_key(self, client: str, headers) -> int:
        """The 64-bit bucket id of this request on this route (never 0: that marks an unused slot);
        Refused (400) for a request with the key's header twice."""
        key = "ip:" + (client if ":" not in client else canonical_ipv6(client))  # IPv4 as it is: the usual case
        if self.policy.header is not None:
            values = headers.get_all(self.policy.header)
            if len(values) > 1:
                raise Refused(f"more than one {self.policy.header} field", 400,
                              log_detail=f"{len(values)} {self.policy.header} fields from {client}")
            if values and values[0]:
                key = "h:" + values[0]
        digest = self._route_hash.copy()
        digest.update(key.encode("utf-8", "surrogateescape"))
        return int.from_bytes(digest.digest(), "little") or 1


@functools.lru_cache(maxsize=4096)  # a parse costs microseconds; the same clients come back
def canonical_ipv6(client: str) -> str:
    """One spelling per client: an IPv4-mapped address as its IPv4 address, any other IPv6 address
    compressed and lowercase; a string that is not an address stays as it is."""
    try:
        address = ipaddress.IPv6Address(client)
    except ValueError:
        return client
    mapped = address.ipv4_mapped
    return str(mapped if mapped is not None else address)
