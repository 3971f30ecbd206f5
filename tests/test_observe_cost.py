"""scripts/observe-cost runs against the real observers: a smoke test that it fits their API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_it_measures_every_observer_call():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "observe-cost"), "--count", "400"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    measured = re.findall(r"^\s*(\d+\.\d+) us  (.+)$", done.stdout, re.MULTILINE)
    assert [name for _, name in measured] == [
        "Metrics.observe", "Application.observe (metrics only)", "AccessLog.observe (no writer)",
        "format_combined", "format_json", "combined line, writer running", "json line, writer running"]
    assert all(float(micros) > 0 for micros, _ in measured)
