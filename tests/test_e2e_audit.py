"""Findings of an end-to-end run of the documented commands (README, serve/README, prompts/README)."""

from __future__ import annotations

from llmrec.service import launch
from llmrec.service.config import LLMConfig, ServiceConfig


def test_forced_transformers_backend_note_does_not_claim_vllm_missing(monkeypatch):
    # `llmrec serve --set llm.backend=transformers` with vLLM installed: /health said "vLLM is not installed"
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: True)
    plan = launch.plan_backend(ServiceConfig(llm=LLMConfig(backend="transformers")))
    assert plan.kind == "transformers"
    assert "not installed" not in plan.note and "llm.backend: transformers" in plan.note
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: False)
    assert "vLLM is not installed" in launch.plan_backend(ServiceConfig(llm=LLMConfig(backend="auto"))).note


def test_metric_table_aligns_long_keys(capsys):
    # `llmrec eval contamination` printed "title_completion_rate 0.0500" one column right of "n   20"
    from llmrec.cli.recommend import _print_metrics

    _print_metrics("t", {"n": 20, "title_completion_rate": 0.05, "year_majority_baseline": 0.2},
                   ["n", "title_completion_rate", "year_majority_baseline"])
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len({len(r) - len(r.split()[-1]) for r in rows}) == 1, rows
