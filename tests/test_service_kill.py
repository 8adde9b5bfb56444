"""serve/kill_test.py on the tiny dataset: SIGKILL the service during a stream of events, restart, and check that
every acknowledged event is stored exactly once (the script exits 0 only then)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kill_during_event_stream(tiny_dataset, tiny_home):
    env = {**os.environ, "LLMREC_HOME": str(tiny_home)}
    r = subprocess.run([sys.executable, str(ROOT / "serve" / "kill_test.py"), "--dataset", "tiny", "--events", "3000",
                        "--workers", "4", "--kill-after", "1.5", "--no-write"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = ast.literal_eval(next(line for line in r.stdout.splitlines() if line.startswith("{'dataset'")))
    assert result["acknowledged_missing"] == 0 and result["duplicates"] == 0 and result["passed"] is True
    # the kill fell inside the stream: events were acknowledged before it, and not all 3000 were sent (a kill after
    # the last event, or before the first acknowledgement, would pass the checks above without testing anything)
    assert 0 < result["acknowledged_201"] <= result["sent"] < 3000, result
    assert result["after_retry_present"] == result["sent"], result
