"""Leases on step executions, renewed in the background while the steps run.

A record takes a lease on its dedupe key before it runs (``EmissionStore.claim``), so no
other worker runs the same step meanwhile (a rebalance faster than a step, a redelivery
after a crash). One keeper per process renews every lease it holds in one round trip each
``ttl/3``; a lease that was lost (it expired while Redis was away, or another worker took
it over) is reported, and the first output written still wins (``publish``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agentfabric.errors import UnavailableError

from .idempotency import EmissionStore
from .logcontext import detached_task

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: EmissionStore, ttl_ms: int) -> None:
        self.store = store
        self.ttl_ms = ttl_ms
        self.held: dict[str, str] = {}
        self.lost: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def hold(self, key: str, token: str) -> None:
        self.held[key] = token
        self.lost.discard(key)
        if self._task is None or self._task.done():
            self._task = detached_task(self._renew_loop(), name="lease-keeper")

    def drop(self, key: str) -> None:
        self.held.pop(key, None)
        self.lost.discard(key)

    async def _renew_loop(self) -> None:
        while self.held:
            await asyncio.sleep(self.ttl_ms / 3000)
            if not self.held:
                break
            snapshot = dict(self.held)
            try:
                lost = await self.store.renew(snapshot, self.ttl_ms)
            except UnavailableError as exc:
                log.warning("leases of %d running steps could not be renewed: %s",
                            len(snapshot), exc.reason)
                continue
            for key in lost:
                if self.held.get(key) == snapshot[key]:
                    self.lost.add(key)
                    log.warning("the lease on %s was lost while its step ran; the first "
                                "output written wins", key)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
