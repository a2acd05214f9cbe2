"""
Run every benchmark (``benchmarks/bench_*.py``, each in its own process) and print one JSON object with all ratios.

Each benchmark prints a JSON object as the last thing on its standard output. From it, every value under a key that
contains ``ratio`` is collected (numbers, and the numbers of a nested dict; lists of per-repeat ratios are left out),
named ``<benchmark>.<path>``, together with any ``meets_targets`` verdict. A benchmark that fails or prints no JSON
is reported with its exit code and the end of its stderr, and makes this script exit with 1.

Usage::

    python benchmarks/run_all.py [--only bench_train bench_attack] [--timeout 1800] [--full] [--out all.json]
    python benchmarks/run_all.py -- --repeats 3     # arguments after -- go to every benchmark

``--full`` also includes each benchmark's whole JSON output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def last_json_object(text: str) -> Any:
    """The last JSON object printed in ``text`` (pretty-printed over several lines or on one line)."""
    lines = text.splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].startswith("{"):
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object in the output")


def collect_ratios(value: Any, path: str = "", inside: bool = False) -> dict[str, float]:
    """``{dotted path: number}`` of every number under a key containing ``ratio`` (lists are skipped)."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            out.update(collect_ratios(item, sub, inside or "ratio" in str(key).lower()))
    elif inside and isinstance(value, (int, float)) and not isinstance(value, bool):
        out[path] = float(value)
    return out


def collect_verdicts(value: Any, path: str = "") -> dict[str, bool]:
    """``{dotted path: bool}`` of every ``meets_targets`` entry."""
    out: dict[str, bool] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if key == "meets_targets" and isinstance(item, bool):
                out[sub] = item
            else:
                out.update(collect_verdicts(item, sub))
    return out


def run_benchmark(script: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    """Run one benchmark script and parse its JSON."""
    start = time.perf_counter()
    env = {**os.environ, "MPLBACKEND": "Agg"}
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *extra], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"returncode": None, "seconds": time.perf_counter() - start, "error": f"timed out after {timeout} s"}
    entry: dict[str, Any] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        entry["error"] = proc.stderr.strip()[-2000:]
        return entry
    try:
        entry["result"] = last_json_object(proc.stdout)
    except ValueError as err:
        entry["error"] = str(err)
    return entry


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py and print one JSON of all ratios.")
    parser.add_argument("--only", nargs="+", default=None, help="benchmark names (e.g. bench_train)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark (default 1800)")
    parser.add_argument("--full", action="store_true", help="include each benchmark's whole JSON output")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--dir", default=str(HERE), help="folder of the bench_*.py scripts (default: this one)")
    args = parser.parse_args(argv)

    scripts = sorted(Path(args.dir).glob("bench_*.py"))
    if args.only:
        wanted = {name.removesuffix(".py") for name in args.only}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; available: {[s.stem for s in scripts]}")
        scripts = [s for s in scripts if s.stem in wanted]

    summary: dict[str, Any] = {"ratios": {}, "meets_targets": {}, "benchmarks": {}}
    failed = False
    for script in scripts:
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        entry = run_benchmark(script, extra, args.timeout)
        result = entry.pop("result", None)
        if result is not None:
            entry["ratios"] = collect_ratios(result)
            entry["meets_targets"] = collect_verdicts(result)
            summary["ratios"].update({f"{script.stem}.{k}": v for k, v in entry["ratios"].items()})
            summary["meets_targets"].update({f"{script.stem}.{k}": v for k, v in entry["meets_targets"].items()})
            if args.full:
                entry["result"] = result
        else:
            failed = True
        summary["benchmarks"][script.stem] = entry
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
