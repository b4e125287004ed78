"""What every CLI module shares: the consoles, settings loading, running a coroutine."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from rich.console import Console

from .settings import Settings, load_settings

__all__ = ["err", "out", "run", "settings"]

T = TypeVar("T")
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


def settings(**overrides: Any) -> Settings:
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
