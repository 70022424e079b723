"""scripts/attack.py keeps working: its cheapest attack runs end to end against the real service.

The script is what a maintainer runs before a release (the README's reliability section); this
test runs ``--only forwarded`` (one gunicorn service, a handful of requests) and checks that the
script reports the attack as a table row whose verdict agrees with its exit status, and that
the figures it prints are the statuses the service really gave.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import requests

from tests.service import ROOT, Service

pytestmark = pytest.mark.e2e


def run_script(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "attack.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_list_names_every_attack() -> None:
    result = run_script("--list", timeout=30)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == [
        "leaving-reader",
        "chunked-body",
        "big-publish",
        "redis-oom",
        "jobs",
        "slow-body",
        "forwarded",
        "resume-ahead",
        "client",
        "publish-latency",
    ]


def test_forwarded_attack_reports_what_the_service_answers(service: Service) -> None:
    result = run_script("--only", "forwarded", "--scale", "small")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 7 forwarded |")]
    assert len(rows) == 1, result.stdout + result.stderr
    cells = [cell.strip() for cell in rows[0].strip("|").split(" | ")]
    attack, tried, measured, expected, verdict = cells
    # The attack holds (issue 10's fix), and the exit status says so.
    assert verdict == "held", result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    # The figure is what the service answers: ask it the same question here.
    status = requests.post(
        service.url + "/channels/attack-check",
        json={"n": 1},
        headers={"X-Forwarded-For": "8.8.8.8"},
        timeout=10,
    ).status_code
    assert re.search(rf"X-Forwarded-For {status}\b", measured), measured
    assert status == 403 and "/jobs 403" in measured
    assert expected.startswith("403")
