"""CLI commands for the run API's per-tenant API keys: create, list, revoke."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from .cli_common import out, run
from .cli_common import settings as settings_
from .errors import UnavailableError

if TYPE_CHECKING:
    from .ingress.keys import ApiKey, ApiKeyStore

__all__ = ["keys_app"]

T = TypeVar("T")
keys_app = typer.Typer(
    no_args_is_help=True,
    help="Create, list and revoke the API keys of the run API (POST /runs ...). A key belongs "
         "to one tenant; only its SHA-256 is stored, so it is shown once, when created.")


def _with_store(use: Callable[[ApiKeyStore], Awaitable[T]]) -> T:
    from redis.exceptions import RedisError

    from streams.redispool import open_redis

    from .ingress.keys import ApiKeyStore

    s = settings_()

    async def go() -> T:
        redis = open_redis(s)
        try:
            return await use(ApiKeyStore(redis, s.topic_prefix))
        except RedisError as exc:
            raise UnavailableError(f"cannot reach Redis at {s.secret_free_redis_url} "
                                   f"({type(exc).__name__}); start it with `agentfabric up` "
                                   f"or set AGENTFABRIC_REDIS_URL") from exc
        finally:
            await redis.aclose()

    return run(go())


def _row(info: ApiKey) -> dict[str, str | None]:
    return {"key_id": info.key_id, "prefix": info.prefix, "tenant": info.tenant,
            "name": info.name, "created_at": info.created_at.isoformat(),
            "revoked_at": info.revoked_at.isoformat() if info.revoked_at else None}


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant the key acts for.",
                                        show_default=False)],
    name: Annotated[str, typer.Option("--name", "-n", help="A label (who or what uses it).")]
    = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a key for a tenant and print it, once: it cannot be shown again."""
    key, info = _with_store(lambda store: store.create(tenant, name))
    if as_json:
        print(json.dumps({"key": key, **_row(info)}))
        return
    print(key)
    out.print(f"key id {info.key_id} for tenant {info.tenant}"
              f"{f' ({info.name})' if info.name else ''}. Store the key now: it is not "
              f"kept and cannot be shown again. Revoke it with `agentfabric keys revoke "
              f"{info.key_id}`.", highlight=False)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant's.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """List keys (ids and prefixes, never the keys), revoked ones marked."""
    from rich.table import Table

    found = _with_store(lambda store: store.list(tenant))
    if as_json:
        for info in found:
            print(json.dumps(_row(info)))
        return
    table = Table(title=f"API keys: {len(found)}")
    for column in ("key id", "prefix", "tenant", "name", "created", "revoked"):
        table.add_column(column)
    for info in found:
        table.add_row(info.key_id, f"{info.prefix}…", info.tenant, info.name,
                      info.created_at.isoformat(timespec="seconds"),
                      info.revoked_at.isoformat(timespec="seconds") if info.revoked_at else "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (or its prefix af_<id>_, or the "
                                               "key).", show_default=False)],
) -> None:
    """Revoke a key: requests with it are refused (401) from now on."""
    info = _with_store(lambda store: store.revoke(key_id))
    assert info.revoked_at is not None
    out.print(f"revoked key {info.key_id} of tenant {info.tenant} (at "
              f"{info.revoked_at.isoformat(timespec='seconds')})", highlight=False)
