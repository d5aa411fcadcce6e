"""Who sent a request: the client that query-attack detection (`serving.stateful`) keeps state for.

Never a header any client can set. With per-client tokens (a JSON file {"client name": "token"}) the
client is the name of the bearer token presented, and a request without a known token is refused.
Otherwise the client is the peer's IP address; behind a reverse proxy listed in `trusted_proxies`
(addresses or CIDR networks) it is the right-most X-Forwarded-For address that is not itself a
trusted proxy, since only the proxies' own entries can be trusted (a client can put anything before them).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def read_tokens(path: str | os.PathLike) -> dict[str, str]:
    """Per-client tokens from a JSON file {"client name": "token", ...}."""
    try:
        with open(path, encoding="utf-8") as file:
            tokens = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the tokens file {path}: {error}") from None
    if not isinstance(tokens, dict) or not tokens:
        raise ValueError(f"the tokens file {path} must hold a non-empty JSON object {{\"client name\": \"token\"}}")
    return tokens


class ClientIdentity:
    """Authenticates a request and names its client (see the module docstring). `token`: one token
    shared by every client (authenticates, but names nobody: the client is then the address)."""

    def __init__(self, *, token: str | None = None, tokens: Mapping[str, str] | None = None,
                 trusted_proxies: Iterable[str] = ()) -> None:
        if token is not None and tokens:
            raise ValueError("give either one shared token or per-client tokens, not both")
        if token is not None and not token:
            raise ValueError("token must be a non-empty string (or None for no authentication)")
        self.shared = None if token is None else token.encode()
        self.clients: dict[bytes, str] = {}
        for name, value in (tokens or {}).items():
            if not isinstance(name, str) or not name or not isinstance(value, str) or len(value) < 8:
                raise ValueError(f"client {name!r}: names must be non-empty and tokens strings of >= 8 characters")
            if _digest(value.encode()) in self.clients:
                raise ValueError(f"client {name!r} shares its token with client {self.clients[_digest(value.encode())]!r}")
            self.clients[_digest(value.encode())] = name
        try:
            self.proxies: list[Network] = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        except ValueError as error:
            raise ValueError(f"trusted proxies must be IP addresses or networks: {error}") from None

    @property
    def requires_token(self) -> bool:
        return self.shared is not None or bool(self.clients)

    def authenticate(self, headers: Mapping[bytes, bytes]) -> str | None:
        """The client named by the bearer token; "" when tokens name nobody (no token needed, or the
        shared one is right); None when the token is missing or wrong."""
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        value = value.strip() if scheme.lower() == b"bearer" else b""
        if self.clients:
            return self.clients.get(_digest(value)) if value else None
        if self.shared is not None:
            return "" if hmac.compare_digest(value, self.shared) else None
        return ""

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    def address(self, peer: str | None, headers: Mapping[bytes, bytes]) -> str:
        """The client's address: the peer's, or behind trusted proxies the first untrusted hop."""
        address = peer or "unknown"
        if self.proxies and self._trusted(address):
            hops = headers.get(b"x-forwarded-for", b"").decode("latin-1").split(",")
            for hop in reversed([h.strip() for h in hops if h.strip()]):
                if not self._trusted(hop):
                    return hop
        return address

    def identify(self, scope: dict) -> str | None:
        """The client of an ASGI request ("token:<name>" or "ip:<address>"); None when unauthenticated."""
        headers = dict(scope["headers"])
        if len(scope["headers"]) != len(headers):  # repeated headers: keep every X-Forwarded-For line
            headers = {}
            for key, value in scope["headers"]:
                headers[key] = headers[key] + b"," + value if key in headers else value
        name = self.authenticate(headers)
        if name is None:
            return None
        if name:
            return f"token:{name}"
        return f"ip:{self.address((scope.get('client') or (None,))[0], headers)}"
