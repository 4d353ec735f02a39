"""``python -m bench [ingest|notify|fanout|footprint|capacity ...]``: run benchmarks, write results.

With no name every benchmark runs, in the order above. ``--quick`` shrinks the
counts and durations for a smoke run (its numbers are not the published ones);
``--charts`` only redraws the PNGs from the JSON results already written, and
``--report`` prints the results table of the README's Performance section from them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import Any

from bench.common import Scale, read_result, wait_for_quiet

BENCHMARKS = ("ingest", "notify", "fanout", "footprint", "capacity")
QUICK = 0.1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="small smoke run (--scale 0.1)")
    parser.add_argument("--scale", type=float, default=None, help="fraction of the full counts")
    parser.add_argument("--charts", action="store_true", help="redraw charts from results")
    parser.add_argument("--report", action="store_true", help="print the results table")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=1.0,
        help="before each benchmark, wait up to 5 min for the load average to drop below this"
        " (0: do not wait)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    if args.report:
        from bench.report import summary

        sys.stdout.write(summary() + "\n")
        return 0
    scale = Scale(args.scale if args.scale else QUICK if args.quick else 1.0)
    failed: list[str] = []
    for name in names:
        module: Any = importlib.import_module(f"bench.{name}")
        if args.charts:
            data = read_result(name)
            if data is not None and hasattr(module, "chart"):
                module.chart(data)
            continue
        load = wait_for_quiet(args.quiet_below) if args.quiet_below else None
        began = time.monotonic()
        logging.getLogger("bench").info("== %s == (load average %s)", name, load)
        data = module.run(scale)
        missed = [target for target, met in data["targets"].items() if not met]
        sys.stdout.write(
            f"{name}: {time.monotonic() - began:.0f} s; targets "
            + ("all met" if not missed else "MISSED: " + "; ".join(missed))
            + "\n"
        )
        if missed:
            failed.append(name)
    if not args.charts:
        from bench.report import summary

        sys.stdout.write(summary() + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
