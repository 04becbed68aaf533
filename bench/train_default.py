"""The default `python train.py` against its limits: wall time, peak memory, validation loss.

    python bench/train_default.py [--json out.json] [extra Hydra overrides ...]

Runs `python train.py logger=csv` (W&B is measured separately: offline it adds about a second) in a
subprocess under /usr/bin/time-like accounting (resource.getrusage of the child), reads summary.json and
prints each quantity next to its limit from issue 2: wall time <= 180 s on a 2-core CPU, peak resident
memory < 4 GiB, validation loss < 2.5 nats (uniform bytes: ln 256 = 5.55). Also says where the wall time
goes: process start and imports, data preparation, training steps, validation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"wall_seconds": 180.0, "peak_rss_gib": 4.0, "val_loss": 2.5}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for train.py")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "train.py"), "logger=csv", f"paths.output_dir={out}", *args.overrides]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
            return proc.returncode
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        summary = json.loads((out / "summary.json").read_text())

    measured = {
        "wall_seconds": wall,
        "peak_rss_gib": peak_kib / 2**20,
        "val_loss": summary["val_loss"],
    }
    train_s = summary["train_seconds"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {_torch_version()}",
        "load_average": os.getloadavg(),
        "measured": measured,
        "limits": LIMITS,
        "ratio_to_limit": {k: measured[k] / LIMITS[k] for k in LIMITS},
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "tokens_per_second": summary["tokens_per_second"],
        "time_split_seconds": {"training steps": train_s, "start, imports, data, validation, summary": wall - train_s},
    }
    print(f"{'quantity':<16}{'measured':>12}{'limit':>10}{'ratio':>8}")
    for k in LIMITS:
        print(f"{k:<16}{measured[k]:>12.3f}{LIMITS[k]:>10.2f}{result['ratio_to_limit'][k]:>8.2f}")
    print(
        f"steps {summary['steps']}, tokens {summary['tokens']:,}, tokens/s (training steps) {summary['tokens_per_second']:,.0f}"
    )
    for part, seconds in result["time_split_seconds"].items():
        print(f"  {part:<45}{seconds:8.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    raise SystemExit(main())
