"""``python -m bench [--quick] [--only 1,2,3,4,5] [--reps N]``: run, print and save the tables.

A full run writes bench/RESULTS.md (and every run's figures to bench/RESULTS.json); a quick one
writes /tmp/stream-bench/RESULTS-quick.md unless ``--output`` says otherwise. The full run takes
about 8-10 minutes on a 2-core machine, ``--quick`` about 2-3.
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
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import scale, scenarios, servers
from bench.common import BENCH, ROOT
from bench.report import Goal, Section, goals_markdown

SCENARIOS: dict[str, Callable[[scenarios.Config], tuple[Section, list[Goal], dict[str, Any]]]] = {
    "1": scenarios.throughput,
    "2": scenarios.latency,
    "3": scenarios.concurrency,
    "4": scenarios.decoding,
    "5": scenarios.fanout,
    "6": scale.open_streams,
    "7": scale.fanout_scale,
}


NOISE_NOTE = (
    "Each table also lists every run: this 2-core VM's speed varies from run to run (up to "
    "about +-40% on the same code), so a goal whose median sits within that spread of its "
    "threshold is not settled by one suite run."
)


def _raise_nofile() -> None:
    """5,000 streams need more than the usual 1,024 descriptors (children inherit this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 20000) if hard != resource.RLIM_INFINITY else 20000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def machine_info() -> list[str]:
    def out(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    commit = out("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; commit {commit}",
        f"- nproc: {out('nproc')}; CPU: {cpu}; memory: {mem}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}); "
        f"{platform.system()} {platform.release()}; "
        f"ulimit -n {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}",
        "- " + "; ".join(_versions()),
    ]


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    names = [
        "gunicorn",
        "gevent",
        "flask",
        "orjson",
        "fastapi",
        "uvicorn",
        "uvloop",
        "httptools",
        "starlette",
        "requests",
        "httpx",
        "httpx-sse",
    ]
    found = []
    for n in names:
        try:
            found.append(f"{n} {version(n)}")
        except PackageNotFoundError:
            pass
    return found


#: where ``--quick`` writes by default: outside the repository's committed figures
QUICK_OUTPUT = Path(tempfile.gettempdir()) / "stream-bench" / "RESULTS-quick.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 2-3 minutes)")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help="scenario numbers, comma-separated"
    )
    parser.add_argument("--reps", type=int, default=3, help="runs per figure (>= 3 recommended)")
    parser.add_argument(
        "--output",
        default=None,
        help="where to write the report (default: bench/RESULTS.md for a full run of every "
        "scenario, /tmp/stream-bench/RESULTS-quick.md for --quick, which never replaces the "
        "committed figures)",
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = str(QUICK_OUTPUT if args.quick else BENCH / "RESULTS.md")
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    _raise_nofile()
    os.chdir(ROOT)
    cfg = scenarios.Config.make(args.quick, args.reps)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    started = time.monotonic()
    sections: list[Section] = []
    goals: list[Goal] = []
    raw: dict[str, Any] = {}
    for key in wanted:
        t0 = time.monotonic()
        print(f"scenario {key} ...", flush=True)
        try:
            section, g, r = SCENARIOS[key](cfg)
        except Exception as exc:  # one failed scenario must not lose the others' figures
            traceback.print_exc()
            section = Section(f"Scenario {key}", [], notes=[f"**Failed**: `{exc!r}`"])
            g, r = [], {"error": repr(exc)}
        sections.append(section)
        goals += g
        raw[key] = r
        print(f"scenario {key} took {time.monotonic() - t0:.0f} s\n", flush=True)
    elapsed = time.monotonic() - started
    mode = "quick (`--quick`)" if args.quick else "full"
    parts = [
        "# Benchmark results",
        "",
        f"Produced by `.venv/bin/python -m bench{' --quick' if args.quick else ''}` "
        f"({mode} run, {args.reps} runs per figure, {elapsed / 60:.1f} minutes). Figures are "
        "medians over the runs; ratios are medians of per-run ratios, both sides measured in "
        "the same run. Project server for `/events`: "
        + (
            "`gunicorn wsgi:app`."
            if servers.service_importable()
            else "bench/peers/project_bench.py (app.py did not import when this ran)."
        ),
        "",
        NOISE_NOTE,
        "",
        "Machine:",
        "",
        *machine_info(),
        "",
        goals_markdown(goals),
        *[s.markdown() for s in sections],
    ]
    text = "\n".join(parts)
    print(text)
    committed = args.output == str(BENCH / "RESULTS.md")
    if committed and args.quick:
        print(
            "(a quick run never replaces bench/RESULTS.md: pass another --output)",
            file=sys.stderr,
        )
    elif set(wanted) == set(SCENARIOS) or not committed:
        with open(args.output, "w") as f:
            f.write(text)
        with open(Path(args.output).with_suffix(".json"), "w") as f:
            json.dump({"quick": args.quick, "reps": args.reps, "scenarios": raw}, f, indent=1)
        print(f"written to {args.output}", file=sys.stderr)
    else:
        print("(a partial run: RESULTS.md left as it was; pass --output to save)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
