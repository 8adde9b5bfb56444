"""Scoring throughput by batch size on the in-process transformers backend -> eval/results/score_batching_<dataset>.

    python eval/score_batching.py [--dataset ml-100k] [--users 48] [--yesno-rows 160] [--batch-sizes 1,4,8,16]

The prompts are the ones the Recommender scores: the rank verbalizer's (history + 20 `--retriever` candidates,
letters A-T) for `--users` seeded test users, and the Yes/No prompts (`--yesno-template`) of `--yesno-rows` seeded
test rows. Each set is scored with `TransformersBackend.score_choices` at every batch size (prompts sorted by
length, left padding, one position of logits), `--repeats` times in alternating order; the table keeps the fastest
repeat. `max_abs_diff_vs_batch_1`: largest difference of a choice log-probability from the unbatched scores (padding
changes the arithmetic, not the model). What it answers: on a CPU, where one long prompt already fills the cores,
does batching still pay, or does the padded batch's attention cost more than it saves?
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from llmrec.bench_utils import command_line, md_table, positive_int, positive_ints, write_result
from llmrec.data import load_prepared
from llmrec.evaluation import yesno_subset
from llmrec.llm import load_backend
from llmrec.ranking import RankingConfig, Recommender
from llmrec.ranking.evaluate import eval_rank
from llmrec.ranking.factory import RETRIEVERS, build_retriever

log = logging.getLogger("score_batching")


def captured_prompts(rec: Recommender, run) -> tuple[list[str], list]:
    """The (prompts, choices) the Recommender hands to `score_choices` while `run()` executes."""
    be, got_p, got_c = rec.backend, [], []
    inner = be.score_choices

    def spy(prompts, choices):
        got_p.extend(prompts)
        got_c.extend(choices if isinstance(choices[0], list) else [choices] * len(prompts))
        return inner(prompts, choices)

    be.score_choices = spy
    try:
        run()
    finally:
        del be.score_choices  # the instance attribute: back to the class's method
    return got_p, got_c


def time_batches(be, prompts: list[str], choices: list, sizes: list[int], repeats: int) -> dict[int, dict]:
    out: dict[int, dict] = {}
    ref = None
    for rep in range(repeats):
        for bs in sizes if rep % 2 == 0 else sizes[::-1]:
            be.batch_size = bs
            t0 = time.perf_counter()
            s = be.score_choices(prompts, choices)
            dt = (time.perf_counter() - t0) / len(prompts)
            if bs == 1 and ref is None:
                ref = s
            row = out.setdefault(bs, {"s_per_prompt": dt, "scores": s})
            row["s_per_prompt"] = min(row["s_per_prompt"], dt)
            log.info("batch %d: %.4f s/prompt", bs, dt)
    for row in out.values():
        row["max_abs_diff_vs_batch_1"] = float(np.max(np.abs(row.pop("scores") - ref))) if ref is not None else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--users", type=positive_int, default=48)
    ap.add_argument("--yesno-rows", type=positive_int, default=160)
    ap.add_argument("--yesno-template", default="yesno_estimate")
    ap.add_argument("--retriever", default="hybrid", choices=RETRIEVERS)
    ap.add_argument("--batch-sizes", type=positive_ints, default="1,4,8,16")
    ap.add_argument("--repeats", type=positive_int, default=2)
    ap.add_argument("--dtype", default="fast")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = sorted(set(args.batch_sizes) | {1})

    ds = load_prepared(args.dataset, prepare_if_missing=True)
    be = load_backend("transformers", dtype=args.dtype)
    rec = Recommender(ds, be, build_retriever(ds, args.retriever),
                      RankingConfig(templates={"yesno": args.yesno_template}, batch_size=max(sizes)))
    sets = {
        "rank (verbalizer, 20 candidates)": captured_prompts(
            rec, lambda: eval_rank(rec, ds, args.users, args.seed, mode="verbalizer")),
        f"yesno ({args.yesno_template})": captured_prompts(
            rec, lambda: rec.yesno_examples_probs(yesno_subset(ds, "test", args.yesno_rows, args.seed))),
    }
    tok = be.tokenizer
    rows = []
    for task, (prompts, choices) in sets.items():
        n_tok = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        timed = time_batches(be, prompts, choices, sizes, args.repeats)
        base = timed[8]["s_per_prompt"] if 8 in timed else None
        for bs, r in timed.items():
            rows.append({"task": task, "batch_size": bs, "prompts": len(prompts), "mean_tokens": float(np.mean(n_tok)),
                         "min_tokens": min(n_tok), "max_tokens": max(n_tok), "s_per_prompt": r["s_per_prompt"],
                         "x_faster_than_batch_8": base / r["s_per_prompt"] if base else None,
                         "max_abs_diff_vs_batch_1": r["max_abs_diff_vs_batch_1"]})
    be.close()
    cols = ["task", "batch_size", "prompts", "mean_tokens", "min_tokens", "max_tokens", "s_per_prompt",
            "x_faster_than_batch_8", "max_abs_diff_vs_batch_1"]
    md = md_table(rows, cols) + (
        f"\nBackend {be.name}, dtype {args.dtype}; prompts sorted by length, left padding, `logits_to_keep=1`; "
        f"fastest of {args.repeats} repeats (alternating order). The backend's default batch is 8.\n")
    write_result(f"score_batching_{args.dataset}", {"dataset": args.dataset, "rows": rows, "args": vars(args),
                                                     "backend": be.name}, md,
                 command=command_line())


if __name__ == "__main__":
    main()
