"""Agent identities: short-lived signed tokens, scoped to the tools a workflow step declares.

Each workflow step acts as its own agent, ``<workflow>.<step>``. When the step starts, the
engine mints a token for it (:meth:`Identity.mint`) naming the tools the step declares; the
gateway verifies it on every call (:meth:`Identity.verify`) and refuses a tool the token
does not name. Tokens are JWTs (HS256, PyJWT) with the claims::

    sub      the agent, "<workflow>.<step>"
    tenant   the tenant the run belongs to
    tools    the tools the step declares
    scopes   the union of those tools' ``scopes``, plus "tool:<name>" for each tool
    iat exp  issued at, expires at (seconds since the epoch)
    jti      a random token id (audit correlation)

The signing secret is the ``gateway_secret`` setting. Left unset, each process draws a
random secret at start: enough while tokens are minted and verified in the same process
(the step worker mints and calls), and it means a token never outlives its worker.
Set it (at least 32 bytes) when tokens must cross processes.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from agentfabric.errors import ConfigError, ScopeError

from .catalog import Catalog

if TYPE_CHECKING:
    from agentfabric.settings import Settings

__all__ = ["ALGORITHM", "DEFAULT_TTL_S", "MIN_SECRET_BYTES", "Claims", "Identity",
           "tool_scope"]

ALGORITHM = "HS256"
DEFAULT_TTL_S = 900.0
MIN_SECRET_BYTES = 32
_REQUIRED = ["sub", "tenant", "tools", "scopes", "exp", "iat", "jti"]


def tool_scope(name: str) -> str:
    """The scope every token carries for each tool it names."""
    return f"tool:{name}"


@dataclass(frozen=True)
class Claims:
    """A verified token's claims."""

    agent: str
    tenant: str
    tools: frozenset[str]
    scopes: frozenset[str]
    issued_at: float
    expires_at: float
    token_id: str

    def allows(self, tool: str) -> bool:
        return tool in self.tools and tool_scope(tool) in self.scopes


class Identity:
    """Mints and verifies agent tokens against one secret and one catalog (whose tools'
    ``scopes`` go into each token)."""

    def __init__(self, catalog: Catalog, secret: str | bytes | None = None, *,
                 leeway_s: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        if secret is None:
            key = secrets.token_bytes(MIN_SECRET_BYTES)
        else:
            key = secret.encode() if isinstance(secret, str) else secret
            if len(key) < MIN_SECRET_BYTES:
                raise ConfigError(f"gateway_secret is {len(key)} bytes; it must be at least "
                                  f"{MIN_SECRET_BYTES} (e.g. `python -c 'import secrets; "
                                  f"print(secrets.token_urlsafe(48))'`), or unset it for a "
                                  f"random per-process secret")
        self._key = key
        self._catalog = catalog
        self._leeway_s = leeway_s
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, catalog: Catalog) -> Identity:
        secret = settings.gateway_secret
        return cls(catalog, None if secret is None else secret.get_secret_value())

    def scopes_for(self, tools: Iterable[str]) -> set[str]:
        """The scopes a token for ``tools`` carries (unknown tools: ConfigError)."""
        scopes: set[str] = set()
        for name in tools:
            scopes.update(self._catalog.spec(name).scopes)
            scopes.add(tool_scope(name))
        return scopes

    def mint(self, agent: str, tenant: str, tools: Sequence[str],
             ttl_s: float = DEFAULT_TTL_S) -> str:
        """A token for ``agent`` (``workflow.step``) acting for ``tenant``, allowing ``tools``
        for ``ttl_s`` seconds."""
        if not agent:
            raise ConfigError("an agent token needs an agent name (<workflow>.<step>)")
        if ttl_s <= 0:
            raise ConfigError(f"a token's ttl_s must be positive, not {ttl_s:g}")
        now = self._clock()
        claims: dict[str, Any] = {
            "sub": agent, "tenant": tenant, "tools": sorted(set(tools)),
            "scopes": sorted(self.scopes_for(tools)), "iat": int(now),
            "exp": math.ceil(now + ttl_s),
            "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str) -> Claims:
        """The claims of a valid, unexpired token signed with this secret; ScopeError
        otherwise."""
        try:
            # expiry is checked here against our clock (testable), not by PyJWT's
            data = jwt.decode(token, self._key, algorithms=[ALGORITHM],
                              options={"require": _REQUIRED, "verify_exp": False,
                                       "verify_iat": False})
        except jwt.InvalidSignatureError as exc:
            raise ScopeError("the agent token's signature is not valid (signed with another "
                             "secret?); tokens are minted by the step worker, check the "
                             "gateway_secret setting of every worker") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise ScopeError(f"the agent token lacks the '{exc.claim}' claim; mint tokens "
                             f"with Identity.mint") from exc
        except jwt.InvalidTokenError as exc:
            raise ScopeError(f"the agent token is not valid ({type(exc).__name__}); mint "
                             f"tokens with Identity.mint") from exc
        try:
            claims = Claims(agent=_text(data, "sub"), tenant=_text(data, "tenant"),
                            tools=frozenset(_texts(data, "tools")),
                            scopes=frozenset(_texts(data, "scopes")),
                            issued_at=float(data["iat"]), expires_at=float(data["exp"]),
                            token_id=_text(data, "jti"))
        except (TypeError, ValueError) as exc:
            raise ScopeError(f"the agent token's claims are malformed ({exc})") from exc
        now = self._clock()
        if now >= claims.expires_at + self._leeway_s:
            raise ScopeError(f"the token of agent '{claims.agent}' expired "
                             f"{now - claims.expires_at:.0f} s ago; the step must run again "
                             f"to get a fresh one")
        return claims


def _text(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' is not a string")
    return value


def _texts(data: dict[str, Any], key: str) -> list[str]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{key}' is not a list of strings")
    return value
