"""Run every benchmark module side by side and write benchmarks/results/<device>.{json,md}.

    python -m benchmarks.report                 # all benchmarks on the default device
    python -m benchmarks.report --only ogm      # modules whose name contains "ogm"
    python -m benchmarks.report --only ogm --update   # ... replacing only their rows

Ratios are computed only between cases measured in this one run, on this one device. On a
GPU the fastbml rows also report the fraction of the memory-bandwidth floor achieved, where the
floor is the case's minimum DRAM traffic over the device's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import re
import sys
import time
from pathlib import Path

import torch

from . import harness

RESULTS = Path(__file__).resolve().parent / "results"


def write_table(filename: str, table: str) -> None:
    """Prints a benchmark's markdown table and writes it to benchmarks/results/<filename>."""
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / filename).write_text(table)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"cpu {cpu} {os.cpu_count()} cores"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write), the practical peak."""
    n = 256 * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    case = harness.Case("copy", "", "", lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / harness.median(harness.time_case(case, device, repeats=10))


def discover(only: str | None) -> list[str]:
    names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])]
    return sorted(n for n in names if n.startswith("bench_") and (only is None or only in n))


def run(device: torch.device, only: str | None, repeats: int) -> dict:
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for module_name in discover(only):
        module = importlib.import_module(f"{__package__}.{module_name}")
        for case in module.cases(device):
            samples = harness.time_case(case, device, repeats=repeats)
            median = harness.median(samples)
            row = {"module": module_name, "op": case.op, "shape": case.shape, "impl": case.impl,
                   "median_s": median, "samples": len(samples),
                   "date": time.strftime("%Y-%m-%d", time.gmtime())}
            if case.bytes_moved is not None and bandwidth is not None:
                row["floor_fraction"] = case.bytes_moved / bandwidth / median
            rows.append(row)
            print(f"{case.op:24s} {case.shape[:44]:44s} {case.impl:18s} {median * 1e3:10.3f} ms",
                  file=sys.stderr)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_bandwidth_GBps": None if bandwidth is None else bandwidth / 1e9,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "rows": rows,
    }


def _speedup(times: dict[str, float], reference: str, seconds: float) -> str:
    return f"{times[reference] / seconds:.1f}" if reference in times else "—"


def markdown(result: dict) -> str:
    lines = [f"# Benchmarks on {result['device']}", "",
             f"torch {result['torch']}, {result['threads']} threads; latest run {result['date']}."
             " Ratios are speed-ups between the rows of one section, measured in one run (higher is"
             " faster).", ""]
    if result["copy_bandwidth_GBps"]:
        lines += [f"Measured copy bandwidth: {result['copy_bandwidth_GBps']:.0f} GB/s.", ""]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["op"], row["shape"]), []).append(row)
    for (op, shape), rows in groups.items():
        times = {r["impl"]: r["median_s"] for r in rows}
        measured = f"measured {rows[0]['date']}, in one run" if "date" in rows[0] else ""
        lines += [f"## {op} — {shape}", "", *([measured, ""] if measured else []),
                  "| implementation | median ms | × vs original | × vs torch | % of bandwidth floor |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            floor = f"{100 * r['floor_fraction']:.0f}%" if "floor_fraction" in r else "—"
            lines.append(f"| {r['impl']} | {r['median_s'] * 1e3:.3f} "
                         f"| {_speedup(times, harness.ORIGINAL, r['median_s'])} "
                         f"| {_speedup(times, harness.PLAIN_TORCH, r['median_s'])} | {floor} |")
        lines.append("")
    return "\n".join(lines)


def _merged(path: Path, result: dict) -> dict:
    """`result` with the rows of the modules it did not run taken from the table at `path`
    (each section keeps the date it was measured on)."""
    if not path.is_file():
        return result
    previous = json.loads(path.read_text())
    ran = {row["module"] for row in result["rows"]}
    kept = [{"date": previous["date"][:10], **row} for row in previous["rows"]
            if row["module"] not in ran]
    return {**result, "rows": kept + result["rows"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", help="run the bench_* modules whose name contains this")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows of the modules run in the existing table")
    args = parser.parse_args(argv)
    result = run(torch.device(args.device), args.only, args.repeats)
    if args.update:
        result = _merged(args.out / f"{result['device']}.json", result)
    table = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / result["device"]
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
