"""Case (d) with its hop latencies per 2-second window, to see how they change during a run.

    .venv/bin/python -m bench.latency_series [--latency-seconds 20]

Runs ``bench.suite --cases d`` (writing its report to a scratch folder, not docs/) and
prints, for the raw relays and for the fabric, the p50/p99 of the first hop in each window.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from bench import cases, suite
from bench.cases import Latency

__all__ = ["main"]


def windows(lat: Latency, rate: float, seconds: float = 2.0) -> list[str]:
    """p50/p99 (ms) of the first hop per ``seconds`` window of messages sent at ``rate``."""
    hop, size = lat.hops[0], max(1, int(rate * seconds))
    out = []
    for at in range(0, len(hop), size):
        chunk = sorted(hop[at:at + size])
        if len(chunk) >= 10:
            out.append(f"{chunk[len(chunk) // 2]:.0f}/{chunk[int(len(chunk) * 0.99) - 1]:.0f}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--segments", type=int, default=1,
                   help="segments on fresh topics (1: one long run, to see the growth)")
    args = p.parse_args(argv)
    raw_latency, fabric_latency = cases.raw_latency, cases.fabric_latency

    async def raw(*a: Any, **k: Any) -> Latency:
        lat = await raw_latency(*a, **k)
        print("raw    p50/p99 per 2 s:", " ".join(windows(lat, args.rate)), flush=True)
        return lat

    async def fabric(*a: Any, **k: Any) -> tuple[Latency, str]:
        lat, stopped = await fabric_latency(*a, **k)
        print("fabric p50/p99 per 2 s:", " ".join(windows(lat, args.rate)), flush=True)
        return lat, stopped

    cases.raw_latency, cases.fabric_latency = raw, fabric
    with tempfile.TemporaryDirectory() as scratch:
        suite.main(["--cases", "d", "--latency-seconds", str(args.latency_seconds),
                    "--rate", str(args.rate), "--latency-segments", str(args.segments),
                    "--docs-dir", scratch])


if __name__ == "__main__":
    main()
