"""Verbalizer vs generate on the same users, one process -> eval/results/ranking_modes_<dataset>[_<backend>].{json,md}.

    python eval/ranking_modes.py [--dataset ml-100k] [--users 20] [--backend transformers|vllm] [--adapter PATH]
        [--model DIR --model-note TEXT --label _NAME]    # another local model (e.g. on a GPU: finetune/gpu_check.sh)

Every mode ranks the same retrieved candidates (20 by default) of the same seeded test users; metrics are
full-ranking (items outside the candidates keep their retrieval score below them). Rows:
- retrieval alone (the candidates' own order; no LLM),
- verbalizer: one forward pass, candidate letters scored (the default mode),
- title likelihood: one prompt without candidates, each candidate's title scored by its mean log-prob per token
  (the prompt's KV cache shared by the titles on transformers; prompt log-probs on vLLM),
- generate, constrained: the model writes `--titles` candidate titles, decoding restricted to the candidates'
  tokens (every line maps),
- generate, free text: the model writes titles freely, lines mapped back by exact then embedding match.
Time per user is wall time of the ranking call over all users divided by the user count (batched as configured),
each mode timed after an untimed warm-up call of its own on one validation user.
"""

from __future__ import annotations

import argparse
import logging
import time

from llmrec.bench_utils import command_line, md_table, positive_int, write_result
from llmrec.data import load_prepared
from llmrec.llm import load_backend
from llmrec.ranking import RankingConfig, Recommender
from llmrec.ranking.evaluate import eval_rank
from llmrec.ranking.factory import RETRIEVERS, build_retriever, with_adapter_templates

log = logging.getLogger("ranking_modes")
KEYS = ("ndcg@10", "recall@10", "mrr@10")


def timed_rank(rec: Recommender, ds, users: int, seed: int, mode: str | None) -> tuple[dict, float]:
    """eval_rank of `mode` (None: retrieval alone) on the seeded test users, and its seconds per user, timed after an
    untimed warm-up call of the same mode on one validation user: every mode is timed warm (the first mode run
    used to pay the model's one-off first-call costs alone)."""
    eval_rank(rec, ds, 1, seed, mode=mode, retrieval_only=mode is None, split="valid")
    rec.generate_totals.clear()
    t0 = time.perf_counter()
    r = eval_rank(rec, ds, users, seed, mode=mode, retrieval_only=mode is None)
    return r, (time.perf_counter() - t0) / max(1, r["n_users"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--users", type=positive_int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retriever", default="hybrid:sasrec", choices=RETRIEVERS)
    ap.add_argument("--candidates", type=positive_int, default=20)
    ap.add_argument("--titles", type=positive_int, default=10, help="constrained generate: titles written per user")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--model", default=None, help="a local HF model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--model-note", default="", help="what the model is (printed under the table)")
    ap.add_argument("--label", default="", help="suffix of the result name, e.g. _gpu")
    ap.add_argument("--dtype", default="fast")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--skip-free", action="store_true", help="leave out free-text generate")
    ap.add_argument("--skip-likelihood", action="store_true",
                    help="leave out title likelihood (e.g. vLLM with a LoRA adapter, where it is refused)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    ds = load_prepared(args.dataset, prepare_if_missing=True)
    retriever = build_retriever(ds, args.retriever)
    backend = load_backend(args.backend, model=args.model, adapter=args.adapter, dtype=args.dtype)
    cfg = with_adapter_templates(RankingConfig(n_candidates=args.candidates, batch_size=args.batch_size,
                                               generate_titles=args.titles), args.adapter)
    rec = Recommender(ds, backend, retriever, cfg)
    rows = []

    def run(label: str, mode: str | None, **over) -> dict:
        for k, v in over.items():
            setattr(rec.cfg, k, v)
        r, s_per_user = timed_rank(rec, ds, args.users, args.seed, mode)
        row = {"mode": label, **{k: r[k] for k in KEYS}, "users": r["n_users"], "s_per_user": s_per_user}
        if mode == "generate":
            st = rec.generate_totals
            row.update(lines=st["lines"], mapped=st["mapped"], unmapped=st["unmapped"])
        log.info("%s", row)
        rows.append(row)
        return row

    run("retrieval alone", None)
    verb = run("verbalizer (one forward pass)", "verbalizer")
    if not args.skip_likelihood:
        run(f"title likelihood (one prompt, {args.candidates} titles scored)", "likelihood")
    gen = run(f"generate, constrained ({args.titles} titles)", "generate", generate_constrained=True)
    free = None if args.skip_free else run("generate, free text", "generate", generate_constrained=False)
    for r in rows[1:]:
        r["x_verbalizer_time"] = r["s_per_user"] / verb["s_per_user"]
    backend.close()

    cols = ["mode", *KEYS, "s_per_user", "x_verbalizer_time", "lines", "mapped", "unmapped", "users"]
    md = md_table(rows, cols)
    # the users scored (every mode the same ones): fewer than --users on a dataset with fewer test users
    scored = rows[0]["users"]
    md += (
        f"\n{scored} test users (seed {args.seed}"
        + (f"; all of them, --users was {args.users}" if scored < args.users else "")
        + f"), {args.candidates} candidates from `{args.retriever}`, "
        f"backend {backend.name}, batch {args.batch_size}; x_verbalizer_time = s_per_user / the verbalizer's."
        + (f" Model: {args.model_note}." if args.model_note else "")
        + (" vLLM in-process with prefix caching on (constrained generation re-sends each prompt at every point "
           "where titles part; the verbalizer's prompts are all distinct)." if args.backend == "vllm" else "")
        + "\n"
        f"\nVerbalizer vs generate: {gen['x_verbalizer_time']:.1f}x faster than constrained generate"
        + (f", {free['x_verbalizer_time']:.1f}x than free-text generate" if free else "")
        + " (issue goal: 20x).\n"
    )
    name = (f"ranking_modes_{args.dataset}" + ("" if args.backend == "transformers" else f"_{args.backend}")
            + args.label)
    write_result(name, {"dataset": args.dataset, "rows": rows, "args": vars(args), "backend": backend.name}, md,
                 command=command_line())


if __name__ == "__main__":
    main()
