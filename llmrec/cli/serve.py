"""`llmrec serve`: vLLM (launched, or an existing URL) or in-process transformers + the recommendation service."""

from __future__ import annotations

import argparse
import sys

from llmrec.cli.args import int_at_least


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start vLLM (if installed) and the recommendation service (FastAPI)")
    p.add_argument("--config", help="YAML file with ServiceConfig keys (e.g. serve/config.yaml)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. port=8001 llm.backend=transformers (env: LLMREC_SERVE_*)")
    p.add_argument("--dataset", help="prepared dataset (shortcut for --set dataset=...)")
    p.add_argument("--port", type=int_at_least(0), help="service port (shortcut for --set port=...)")
    p.add_argument("--vllm-url", help="use an existing OpenAI-compatible vLLM endpoint")
    p.add_argument("--no-llm", action="store_true", help="no LLM: collaborative fallback only (degraded: true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from llmrec.config import to_dict
    from llmrec.service.config import load_service_config

    overrides = list(args.set or [])
    if args.dataset:
        overrides.append(f"dataset={args.dataset}")
    if args.port is not None:
        overrides.append(f"port={args.port}")
    if args.vllm_url:
        overrides.append(f"llm.vllm_url={args.vllm_url}")
    if args.no_llm:
        overrides.append("llm.backend=none")
    cfg = load_service_config(args.config, overrides)
    if args.print_config:
        import yaml

        from llmrec.service.app import _redact

        d = to_dict(cfg)
        for secret in ("api_key", "user_hash_key"):  # the HMAC key would let a log reader undo the user-id hashes
            if d.get(secret):
                d[secret] = "***"
        if d.get("store_url"):
            d["store_url"] = _redact(d["store_url"])  # a database password
        print(yaml.safe_dump(d, sort_keys=False))
        return 0
    from llmrec.service.launch import serve

    try:
        serve(cfg)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down and the vLLM server is stopped; no traceback
        print("llmrec serve: interrupted, stopped", file=sys.stderr)
        return 130
    return 0
