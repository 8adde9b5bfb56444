"""HTTP client of the recommendation service (used by `llmrec recommend --url ...`), and `wait_until_up` for
whatever starts a server process (the vLLM launcher, the demo, the serving benchmarks)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote


class ServiceClientError(RuntimeError):
    """The service answered with an error (message taken from its error body) or could not be reached."""


def wait_until_up(url: str, proc: Any = None, timeout_s: float = 180.0, interval_s: float = 1.0,
                  name: str = "server", log_path: str | Path | None = None) -> float:
    """Poll GET `url` until it answers 200; returns the seconds waited. RuntimeError as soon as `proc` (a Popen)
    has exited (with the tail of `log_path` when given), TimeoutError after `timeout_s`."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path and Path(log_path).is_file() else ""
            raise RuntimeError(f"{name} exited with code {proc.returncode} before {url} answered"
                               + (f"; log {log_path}:\n{tail}" if log_path else ""))
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{name}: {url} did not answer 200 within {timeout_s:.0f} s"
                       + (f" (log {log_path})" if log_path else ""))


def _error_message(resp: Any) -> str:
    try:
        e = resp.json()["error"]
        field = f" (field {e['field']})" if e.get("field") else ""
        return f"HTTP {resp.status_code} {e.get('type', '')}: {e.get('message', '')}{field}"
    except Exception:  # noqa: BLE001
        return f"HTTP {resp.status_code}: {resp.text[:300]}"


def fetch_recommendations(
    url: str,
    user_id: str,
    k: int = 10,
    explain: bool = False,
    adapter: str | None = None,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """GET {url}/v1/users/{user_id}/recommendations; returns the JSON body. The API key defaults to
    $LLMREC_SERVE_API_KEY."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO line would print the URL, i.e. the user id
    params: dict[str, Any] = {"k": k, "explain": str(bool(explain)).lower()}
    if adapter:
        params["adapter"] = adapter
    key = api_key or os.environ.get("LLMREC_SERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    endpoint = f"{url.rstrip('/')}/v1/users/{quote(str(user_id), safe='')}/recommendations"
    try:
        resp = httpx.get(endpoint, params=params, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise ServiceClientError(f"cannot reach the service at {url}: {e}") from None
    if resp.status_code != 200:
        raise ServiceClientError(_error_message(resp))
    return resp.json()


def format_recommendations(rec: dict[str, Any]) -> str:
    """A plain-text table (rank, score, item id, title) plus the explanation and how it was produced."""
    items = rec.get("items", [])
    w_id = max([len("item"), *(len(str(it["item_id"])) for it in items)])
    lines = [f"{'rank':>4}  {'score':>8}  {'item':<{w_id}}  title", f"{'-' * 4}  {'-' * 8}  {'-' * w_id}  {'-' * 40}"]
    for it in items:
        lines.append(f"{it['rank']:>4}  {it['score']:>8.4f}  {str(it['item_id']):<{w_id}}  {it['title']}")
    how = f"backend {rec.get('backend')}, model {rec.get('model')}"
    if rec.get("adapter"):
        how += f", adapter {rec['adapter']}"
    if rec.get("degraded"):
        how += ", DEGRADED (LLM unavailable: collaborative fallback)"
    if rec.get("cached"):
        how += ", cached"
    if rec.get("latency_ms") is not None:
        how += f", {rec['latency_ms']:.0f} ms"
    lines.append("")
    lines.append(f"user {rec.get('user_id')}: {len(items)} items ({how})")
    if rec.get("explanation"):
        tag = " (template fallback)" if rec.get("explanation_fallback") else ""
        lines.append(f"explanation{tag}: {rec['explanation']}")
        if rec.get("explanation_fallback_reasons"):
            lines.append(f"  (the generated text {'; '.join(rec['explanation_fallback_reasons'])})")
        for ev in rec.get("explanation_evidence") or []:
            shared = f" (shares {', '.join(ev['shared'])})" if ev.get("shared") else ""
            lines.append(f"  cites {ev['title']}{shared}")
    return "\n".join(lines)
