"""`llmrec demo --fast` end to end on the embedded defaults (make test-slow): the README's main job with tiny budgets,
in a fresh LLMREC_HOME (only the converted SmolLM2 folder is shared, when there is one, to skip re-converting it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_fast_demo_runs_every_stage(tmp_path):
    from llmrec.config import llmrec_home

    home = tmp_path / "home"
    home.mkdir()
    models = llmrec_home().resolve() / "models"
    if models.is_dir():
        (home / "models").symlink_to(models)
    env = {**os.environ, "LLMREC_HOME": str(home)}
    p = subprocess.run([sys.executable, "-m", "llmrec.cli", "demo", "--fast"], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=1800)
    out = p.stdout
    assert p.returncode == 0, (out[-3000:], p.stderr[-3000:])
    for n in range(1, 5):
        assert f"=== [{n}/4]" in out
    for task in ("yesno", "rank", "next_title"):  # the three default recipes ran with the fast step budget
        adapter = home / "finetune" / f"demo_{task}_ml-100k_2steps" / "adapter"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "llmrec_prompt.json").is_file()
    bench = json.loads((home / "demo" / "bench_ml-100k.json").read_text())
    assert {"pop", "mf", "bpr", "llm zero-shot", "llm tuned", "llm zero-shot, title likelihood",
            "llm tuned, title likelihood"} <= set(bench["methods"])
    assert all(0.0 <= r["ndcg@10"] <= 1.0 for r in bench["methods"].values() if "ndcg@10" in r)
    # the service answered, took the feedback event and answered again without the item the user disliked
    assert "GET /v1/users/1/recommendations?k=5&explain=true" in out
    assert re.search(r"POST /v1/events \(user 1 rates '.+' 1/5\) -> 20[01]", out)
    assert re.search(r"now absent", out) and "service stopped" in out and "demo finished in" in out
