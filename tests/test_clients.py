"""Tests for serving.clients: who a request comes from (tokens, addresses, trusted proxies)."""
from __future__ import annotations

import json

import pytest

from serving.clients import ClientIdentity, read_tokens


def scope(peer: str = "10.0.0.9", **headers: str) -> dict:
    return {"client": (peer, 5000), "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


def test_per_client_tokens_name_the_client():
    identity = ClientIdentity(tokens={"alice": "alice-secret", "bob": "bob-secret-"})
    assert identity.identify(scope(authorization="Bearer alice-secret")) == "token:alice"
    assert identity.identify(scope(authorization="bearer bob-secret-")) == "token:bob"
    assert identity.identify(scope(authorization="Bearer mallory-guess")) is None
    assert identity.identify(scope()) is None


def test_without_tokens_the_client_is_the_peer_and_forwarded_headers_are_ignored():
    identity = ClientIdentity()
    assert identity.identify(scope("10.0.0.9", x_forwarded_for="1.2.3.4")) == "ip:10.0.0.9"


def test_a_shared_token_authenticates_but_names_nobody():
    identity = ClientIdentity(token="one-shared-token")
    assert identity.identify(scope("10.0.0.9", authorization="Bearer one-shared-token")) == "ip:10.0.0.9"
    assert identity.identify(scope("10.0.0.9", authorization="Bearer wrong")) is None


def test_behind_a_trusted_proxy_the_first_untrusted_hop_is_the_client():
    identity = ClientIdentity(trusted_proxies=["10.0.0.0/24"])
    # the client wrote "6.6.6.6" itself; the proxy appended the address it saw
    assert identity.identify(scope("10.0.0.9", x_forwarded_for="6.6.6.6, 203.0.113.7")) == "ip:203.0.113.7"
    assert identity.identify(scope("10.0.0.9", x_forwarded_for="203.0.113.7, 10.0.0.3")) == "ip:203.0.113.7"
    # a peer that is not a trusted proxy is the client, whatever it forwards
    assert identity.identify(scope("198.51.100.1", x_forwarded_for="203.0.113.7")) == "ip:198.51.100.1"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"token": "a", "tokens": {"x": "long-enough"}}, "not both"),
    ({"tokens": {"x": "short"}}, "tokens strings of >= 8"),
    ({"tokens": {"x": "same-token", "y": "same-token"}}, "shares its token with client 'x'"),
    ({"trusted_proxies": ["not-an-address"]}, "trusted proxies must be IP addresses"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClientIdentity(**kwargs)


def test_read_tokens(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"alice": "alice-secret"}))
    assert read_tokens(path) == {"alice": "alice-secret"}
    path.write_text("[]")
    with pytest.raises(ValueError, match="must hold a non-empty JSON object"):
        read_tokens(path)
    with pytest.raises(ValueError, match="cannot read the tokens file"):
        read_tokens(tmp_path / "missing.json")
