"""``python -m tools.services crm|erp [--host H] [--port P]``: serve one sample business system
until SIGTERM or SIGINT. Prints one ``<name> listening on http://host:port`` line when ready."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from agentfabric.errors import PortInUseError

from . import crm, erp
from .common import serve

APPS: dict[str, tuple[Callable[[], web.Application], int]] = {
    "crm": (crm.create_app, 18081),
    "erp": (erp.create_app, 18082),
}


async def _run(name: str, host: str, port: int) -> None:
    handle = await serve(name, APPS[name][0](), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{name} listening on {handle.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await handle.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.services",
                                     description="Serve a sample business system over HTTP.")
    parser.add_argument("name", choices=sorted(APPS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None,
                        help="default: 18081 for crm, 18082 for erp; 0 picks a free port")
    args = parser.parse_args(argv)
    port = APPS[args.name][1] if args.port is None else args.port
    try:
        asyncio.run(_run(args.name, args.host, port))
    except PortInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
