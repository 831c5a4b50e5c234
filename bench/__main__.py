"""``python -m bench [--short] [name ...]``: run the benchmarks and print their figures."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--short", action="store_true", help="smaller sizes, for CI")
    parser.add_argument("names", nargs="*", help="bench modules to run (default: all)")
    args = parser.parse_args(argv)
    names = args.names or sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")
    )
    failed = 0
    for name in names:
        print(f"== {name}", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            for figure in module.run(short=args.short):
                print(f"  {figure}", flush=True)
        except Exception:
            failed += 1
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
