"""Shared fixtures: a tiny synthetic dataset with a planted pattern, prepared into a temporary LLMREC_HOME."""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pandas as pd
import pytest

GENRES = ["Action", "Comedy", "Drama", "Horror"]


def make_tiny_csv(root, n_users: int = 40, n_items: int = 48, events: int = 14, seed: int = 0):
    """Users prefer one genre (planted): 80% of their events are items of that genre, in a per-genre item order, and
    they like (rating 5) items of their genre and dislike (rating 1-2) the others."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": [f"i{j}" for j in range(n_items)],
            "title": [f"{GENRES[j % 4]} Story {j}" for j in range(n_items)],
            "genres": [GENRES[j % 4] for j in range(n_items)],
        }
    )
    rows = []
    for u in range(n_users):
        g = u % 4
        own = [j for j in range(n_items) if j % 4 == g]
        start = int(rng.integers(0, len(own)))
        seq, t = [], 1_000_000 + u * 7
        k = 0
        while len(seq) < events:
            if rng.random() < 0.8:
                j = own[(start + k) % len(own)]
                k += 1
            else:
                j = int(rng.integers(0, n_items))
            if j in seq:
                continue
            seq.append(j)
            rating = 5 if j % 4 == g else int(rng.integers(1, 3))
            t += int(rng.integers(60, 3600))
            rows.append((f"u{u}", f"i{j}", t, rating))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    ipath, tpath = root / "tiny_items.csv", root / "tiny.csv"
    items.to_csv(ipath, index=False)
    inter.to_csv(tpath, index=False)
    return tpath, ipath


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmrec_home")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tiny_home):
    """A prepared tiny dataset named `tiny` (40 users, 48 items, 14 events each, planted genre preference)."""
    from llmrec.data import PrepareConfig, load_prepared, prepare

    tpath, ipath = make_tiny_csv(tiny_home)
    prepare(str(tpath), PrepareConfig(items_file=str(ipath), name="tiny", n_sampled_negatives=20), home=tiny_home)
    return load_prepared("tiny", home=tiny_home)


@pytest.fixture(scope="session")
def load_script():
    """Import a repository script that is not a package module (eval/report.py, serve/bench_serving.py, ...) by its
    path relative to the repository root: `load_script("eval/report.py")`."""
    root = Path(__file__).resolve().parent.parent

    def load(rel: str):
        spec = importlib.util.spec_from_file_location(Path(rel).stem, root / rel)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@contextlib.contextmanager
def fake_service(respond):
    """A local HTTP server (shared by the serving tests) answering GET /v1/users/<user>/recommendations?... with
    respond(user, query) -> (status code, body bytes); yields its base URL."""

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            u = urlparse(self.path)
            code, body = respond(u.path.split("/")[3], parse_qs(u.query))
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def files_under(root) -> dict[str, bytes]:
    """Every file below `root` with its bytes: compare before / after to show that a refusal changed nothing."""
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli_refused(capsys, argv: list[str]) -> str:
    """Run the llmrec CLI, expect a refusal: exit 1 and exactly one `llmrec: error:` line, no traceback; returns
    that line."""
    from llmrec.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    lines = [ln for ln in err if ln.startswith("llmrec: error: ")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty LLMREC_HOME under tmp_path, with tmp_path as the working folder (a module may define its own)."""
    h = tmp_path / "home"
    monkeypatch.setenv("LLMREC_HOME", str(h))
    monkeypatch.chdir(tmp_path)
    return h
