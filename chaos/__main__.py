"""``python -m chaos --configuration sqlite|nats --deliveries N ...``; ``--help`` lists all."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from chaos.poison import CATALOGUE
from chaos.report import failures, print_report
from chaos.run import ChaosConfig, run_chaos
from chaos.system import CONFIGURATIONS, nats_setup, sqlite_setup

if TYPE_CHECKING:
    from tests.support.nats_cluster import NatsCluster


def parse(argv: list[str]) -> tuple[ChaosConfig, Path]:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--configuration", choices=CONFIGURATIONS, default="sqlite",
                        help="sqlite: sqlite bus and stores; nats: a 3-node NATS cluster of its "
                        "own and PostgreSQL stores (127.0.0.1:5432, database test)")  # fmt: skip
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=25.0, help="deliveries submitted per second")
    parser.add_argument(
        "--kills",
        type=int,
        default=None,
        help="service processes killed (default: one per 200 deliveries, >= 2)",
    )
    parser.add_argument(
        "--node-kills",
        type=int,
        default=None,
        help="NATS nodes killed (default: one per 1,000 deliveries, >= 1)",
    )
    parser.add_argument("--poison-rounds", type=int, default=3)
    kinds = [p.kind for p in CATALOGUE]
    parser.add_argument(
        "--skip-poison",
        action="append",
        default=[],
        choices=kinds,
        metavar="KIND",
        help=f"leave a kind of poison out: {', '.join(kinds)}",
    )
    parser.add_argument("--timeout", type=float, default=0.0, help="overall bound in seconds")
    parser.add_argument("--stall-seconds", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=Path(".choreograph/chaos"))
    args = parser.parse_args(argv)
    if args.deliveries < 1 or args.rate <= 0:
        parser.error("--deliveries and --rate must be positive")
    kills = args.kills if args.kills is not None else max(2, args.deliveries // 200)
    node_kills = 0
    if args.configuration == "nats":
        default = max(1, args.deliveries // 1000)
        node_kills = args.node_kills if args.node_kills is not None else default
    config = ChaosConfig(
        configuration=args.configuration,
        deliveries=args.deliveries,
        rate=args.rate,
        kills=kills,
        node_kills=node_kills,
        poison_rounds=args.poison_rounds,
        skip_poison=tuple(args.skip_poison),
        stall_seconds=args.stall_seconds,
        timeout=args.timeout,
        seed=args.seed,
    )
    return config, args.data_dir / args.configuration


@contextlib.contextmanager
def setup(config: ChaosConfig, root: Path) -> Iterator[tuple[str, str, NatsCluster | None]]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, mode=0o700)
    chosen = nats_setup if config.configuration == "nats" else sqlite_setup
    with chosen(root.resolve()) as urls:
        yield urls


def main(argv: list[str] | None = None) -> int:
    config, root = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    console = Console()
    console.print(
        f"[bold]chaos[/]: {config.deliveries} deliveries at {config.rate:g}/s on "
        f"{config.configuration}, {config.kills} service kills, {config.node_kills} node kills, "
        f"{config.poison_rounds} rounds of poison; bounded to {config.bound:.0f} s; files in {root}"
    )
    with setup(config, root) as (transport_url, store_url, cluster):
        result = asyncio.run(run_chaos(config, root.resolve(), transport_url, store_url, cluster))
    print_report(result, console)
    return 1 if failures(result) else 0


if __name__ == "__main__":
    sys.exit(main())
