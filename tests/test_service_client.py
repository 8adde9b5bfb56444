"""The HTTP client against a real uvicorn server on 127.0.0.1 (loopback only)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from llmrec.service.app import create_app
from llmrec.service.client import ServiceClientError, fetch_recommendations, format_recommendations
from llmrec.service.config import ServiceConfig
from llmrec.store import EventStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tiny_dataset, tmp_path):
    store = EventStore.from_dataset(tiny_dataset, url=f"sqlite:///{tmp_path / 'c.db'}")
    app = create_app(ServiceConfig(dataset="tiny"), recommender=None, store=store, catalogue=tiny_dataset)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(timeout=10)


def test_fetch_and_format(server):
    rec = fetch_recommendations(server, "u4", k=3, explain=True)
    assert rec["user_id"] == "u4" and len(rec["items"]) == 3
    text = format_recommendations(rec)
    assert "rank" in text and rec["items"][0]["title"] in text and "DEGRADED" in text
    with pytest.raises(ServiceClientError, match="404 not_found"):
        fetch_recommendations(server, "nobody")
    with pytest.raises(ServiceClientError, match="query.k"):
        fetch_recommendations(server, "u4", k=0)


def test_format_shows_the_explanation_and_its_evidence():
    rec = {"user_id": "7", "items": [{"rank": 1, "score": -0.5, "item_id": "i1", "title": "Babe (1995)"}],
           "explanation": '"Babe (1995)" suits this user because they liked "Toy Story (1995)".',
           "explanation_fallback": False, "backend": "transformers", "model": "m",
           "explanation_evidence": [{"item_id": "i9", "title": "Toy Story (1995)", "shared": ["Children's", "Comedy"]},
                                    {"item_id": "i8", "title": "Heat (1995)", "shared": []}]}
    lines = format_recommendations(rec).splitlines()
    assert lines[-3].startswith('explanation: "Babe (1995)"')
    assert lines[-2:] == ["  cites Toy Story (1995) (shares Children's, Comedy)", "  cites Heat (1995)"]


def test_format_says_why_a_template_fallback_replaced_the_generated_text():
    rec = {"user_id": "7", "items": [{"rank": 1, "score": -0.5, "item_id": "i1", "title": "Babe (1995)"}],
           "explanation": 'Recommended "Babe (1995)" because you liked "Toy Story (1995)".',
           "explanation_fallback": True, "backend": "transformers", "model": "m",
           "explanation_fallback_reasons": ['says the user liked an item they rated low: "Heat (1995)"',
                                            "names a title twice"]}
    lines = format_recommendations(rec).splitlines()
    assert lines[-2].startswith("explanation (template fallback): Recommended")
    assert lines[-1] == ('  (the generated text says the user liked an item they rated low: "Heat (1995)"; names a '
                         "title twice)")


def test_unreachable():
    with pytest.raises(ServiceClientError, match="cannot reach"):
        fetch_recommendations(f"http://127.0.0.1:{free_port()}", "u1", timeout=2)


def test_wait_until_up_returns_when_healthy_and_fails_fast_on_an_exited_process(server, tmp_path):
    """What the vLLM launcher, the demo and the serving scripts wait with: a live server returns at once; a process
    that died is reported with its exit code and log tail at once (not after the timeout); silence times out."""
    import subprocess
    import sys

    from llmrec.service.client import wait_until_up

    assert wait_until_up(f"{server}/health", timeout_s=10) < 5
    log = tmp_path / "dead.log"
    log.write_text("Traceback: the model folder is missing\n")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3 .*model folder is missing"):
        wait_until_up(f"http://127.0.0.1:{free_port()}/health", dead, timeout_s=60, log_path=log)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(TimeoutError, match="did not answer 200 within 1 s"):
        wait_until_up(f"http://127.0.0.1:{free_port()}/health", timeout_s=1, interval_s=0.2)
