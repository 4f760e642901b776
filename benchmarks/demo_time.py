"""Wall time of the full demo from a clean folder (what the README states), in a subprocess.

Usage:
    python benchmarks/demo_time.py [--quick] [--out /tmp/emomerge-demo-bench] [--docs docs]

Runs ``python -m emomerge.cli_run demo`` (the same code as ``emomerge demo``) into an empty
folder, prints the measured wall time and the machine's CPU count, and with ``--docs`` copies
the demo's plot and the table it printed to ``docs/demo_plot.png`` and
``docs/demo_leaderboard.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/tmp/emomerge-demo-bench"))
    ap.add_argument("--docs", type=Path, default=None, help="copy plot + table here")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cmd = [sys.executable, "-m", "emomerge.cli_run", "demo", "--out", str(args.out)]
    cmd += ["--quick"] if args.quick else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"demo failed with exit code {proc.returncode}")
    print(
        f"\ndemo{' --quick' if args.quick else ''}: {seconds:.1f} s wall on "
        f"{os.cpu_count()} CPU cores ({sys.platform}, python {sys.version.split()[0]})"
    )
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.out / "plot.png", args.docs / "demo_plot.png")
        table = (args.out / "leaderboard.md").read_text(encoding="utf-8")
        (args.docs / "demo_leaderboard.md").write_text(
            table.rstrip() + f"\n\nMeasured by `python benchmarks/demo_time.py`: {seconds:.0f} s "
            f"wall on {os.cpu_count()} CPU cores.\n",
            encoding="utf-8",
        )
        print(f"copied plot and table to {args.docs}")


if __name__ == "__main__":
    main()
