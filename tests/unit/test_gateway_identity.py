"""Agent tokens: minted for a step's tools with their scopes, verified, refused when
expired, forged, malformed or signed with another secret."""

from __future__ import annotations

import jwt
import pytest

from agentfabric.errors import ConfigError, ScopeError
from tools.gateway.catalog import Catalog
from tools.gateway.identity import ALGORITHM, Identity, tool_scope
from tools.gateway.spec import ToolSpec

SECRET = "s" * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.of([
        ToolSpec(name="crm.get_account", scopes=["crm:read"]),
        ToolSpec(name="crm.update_lead_score", access="write", scopes=["crm:write"]),
        ToolSpec(name="erp.get_vendor", scopes=["erp:read"]),
    ])


def test_mint_and_verify(catalog: Catalog) -> None:
    clock = Clock()
    identity = Identity(catalog, SECRET, clock=clock)
    token = identity.mint("lead.score", "acme", ["crm.get_account", "crm.update_lead_score"],
                          ttl_s=60)
    claims = identity.verify(token)
    assert claims.agent == "lead.score"
    assert claims.tenant == "acme"
    assert claims.tools == {"crm.get_account", "crm.update_lead_score"}
    assert claims.scopes == {"crm:read", "crm:write", tool_scope("crm.get_account"),
                             tool_scope("crm.update_lead_score")}
    assert claims.expires_at == clock.now + 60
    assert claims.allows("crm.get_account")
    assert not claims.allows("erp.get_vendor")
    raw = jwt.decode(token, SECRET, algorithms=[ALGORITHM], options={"verify_exp": False})
    assert set(raw) == {"sub", "tenant", "tools", "scopes", "exp", "iat", "jti"}


def test_expired_token_is_refused(catalog: Catalog) -> None:
    clock = Clock()
    identity = Identity(catalog, SECRET, clock=clock)
    token = identity.mint("lead.score", "acme", ["crm.get_account"], ttl_s=30)
    clock.now += 29
    identity.verify(token)
    clock.now += 2
    with pytest.raises(ScopeError, match="expired"):
        identity.verify(token)


def test_token_of_another_secret_or_forged_is_refused(catalog: Catalog) -> None:
    mine = Identity(catalog, SECRET)
    other = Identity(catalog)  # a random per-process secret
    with pytest.raises(ScopeError, match="signature"):
        mine.verify(other.mint("a.b", "acme", ["crm.get_account"]))
    forged = jwt.encode({"sub": "a.b", "tenant": "acme", "tools": ["erp.get_vendor"],
                         "scopes": [], "exp": 9_999_999_999, "iat": 0, "jti": "x"},
                        "f" * 40, algorithm=ALGORITHM)
    with pytest.raises(ScopeError):
        mine.verify(forged)
    with pytest.raises(ScopeError, match="not valid"):
        mine.verify("not-a-token")
    unsigned = jwt.encode({"sub": "a.b"}, None, algorithm="none")
    with pytest.raises(ScopeError):
        mine.verify(unsigned)


def test_missing_or_malformed_claims_are_refused(catalog: Catalog) -> None:
    identity = Identity(catalog, SECRET)
    missing = jwt.encode({"sub": "a.b", "exp": 9_999_999_999}, SECRET, algorithm=ALGORITHM)
    with pytest.raises(ScopeError, match="lacks"):
        identity.verify(missing)
    malformed = jwt.encode({"sub": "a.b", "tenant": "t", "tools": "crm.get_account",
                            "scopes": [], "exp": 9_999_999_999, "iat": 0, "jti": "x"},
                           SECRET, algorithm=ALGORITHM)
    with pytest.raises(ScopeError, match="malformed"):
        identity.verify(malformed)


def test_configuration_errors(catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        Identity(catalog, "short")
    identity = Identity(catalog, SECRET)
    with pytest.raises(ConfigError, match="no tool named"):
        identity.mint("a.b", "acme", ["nope"])
    with pytest.raises(ConfigError):
        identity.mint("", "acme", ["crm.get_account"])
