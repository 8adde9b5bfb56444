"""Explanation quality with and without the quoted-title constraint, same users and recommendations
-> eval/results/explanations_<dataset>[_<backend>].{json,md}.

    python eval/explanations.py [--dataset ml-100k] [--users 40] [--adapter PATH] [--backend transformers|vllm]
        [--frequency-penalty 0 ...]

For seeded test users (history up to their test event), the Recommender recommends k=5 (verbalizer, the given
retriever) and explains the top 3 three ways: generated freely (`explain_quoted_titles: false`), with quoted titles
constrained to titles the user liked in the prompt's history (`explain_relevant_titles: false`), and constrained to
those of them that share an attribute with a recommended item (the default); each with the configured
`explain_frequency_penalty`, and `--frequency-penalty` adds rows of the default mode with other penalties. The
post-check and fallback are the same in all (llmrec.ranking.explain.check_explanation). Metrics:
llmrec.ranking.evaluate.explanation_metrics, `relevant_citations`: of the history items the shown explanations name
(fallbacks included), the share that shares an attribute value (genre, tag, ...) with one of the three recommended
items, `top1_citations`: of those the generated texts name, the share that shares one with the top item, and
`subject_citations`: with the recommended item the text is about (its evidence).
"""

from __future__ import annotations

import argparse
import logging
import time

from llmrec.bench_utils import command_line, count_or_all, md_table, positive_int, write_result
from llmrec.cli.args import float_at_least
from llmrec.data import load_prepared
from llmrec.llm import load_backend
from llmrec.ranking import RankingConfig, Recommender
from llmrec.ranking.evaluate import explanation_metrics, fallback_reason_counts
from llmrec.ranking.explain import evidence_note
from llmrec.ranking.factory import RETRIEVERS, build_retriever, with_adapter_templates

log = logging.getLogger("explanations")


def relevant_citations(rec: Recommender, hs: list, recs: list, top: int = 3,
                       generated_only: bool = False) -> float | None:
    """Of the history items the explanations name (`generated_only`: in generated texts, fallbacks left out), the
    share with an attribute value of one of the `top` recommended items."""
    named = shared = 0
    for h, r in zip(hs, recs):
        if generated_only and r.explanation_fallback:
            continue
        hist = {e.item_id for e in h}
        cited = [i for i in rec.matcher.find(r.explanation or "", strict=True) if i in hist]  # as the check reads it
        named += len(cited)
        shared += len(rec.sharing_attributes(cited, [i.item_id for i in r.items[:top]]))
    return shared / named if named else None


def subject_citations(recs: list) -> float | None:
    """Of the history items the generated texts cite (fallbacks left out), the share that shares an attribute value
    with the recommended item the text is about (its evidence, `Recommendation.evidence`)."""
    cited = [e for r in recs if not r.explanation_fallback for e in r.evidence]
    return sum(bool(e["shared"]) for e in cited) / len(cited) if cited else None


def frequency_penalty(text: str) -> float:
    """argparse type of a frequency penalty: a finite number in [-2, 2] (OpenAI's and vLLM's range; `nan` or `inf`
    would reach the logits, after the model had loaded)."""
    v = float_at_least(-2.0)(text)
    if v > 2.0:
        raise argparse.ArgumentTypeError(f"must be in [-2, 2] (OpenAI's range), got {text}")
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--users", type=positive_int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retriever", default="hybrid:sasrec", choices=RETRIEVERS)
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--dtype", default="fast")
    ap.add_argument("--examples", type=count_or_all, default=5, help="example texts kept per mode (0: none)")
    ap.add_argument("--frequency-penalty", type=frequency_penalty, default=[], nargs="*",
                    help="extra rows: the default mode (quoted, sharing an attribute) with these penalties")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    ds = load_prepared(args.dataset, prepare_if_missing=True)
    backend = load_backend(args.backend, adapter=args.adapter, dtype=args.dtype)
    rec = Recommender(ds, backend, build_retriever(ds, args.retriever),
                      with_adapter_templates(RankingConfig(), args.adapter))
    targets = ds.targets("test")["user_id"]
    users = targets.sample(n=min(args.users, len(targets)), random_state=args.seed).tolist()
    hs = [rec.dataset_history(u, "test") for u in users]
    recs = rec.recommend_batch(users, hs, k=5, explain=False)  # one ranking, explained twice
    top = [[i.item_id for i in r.items] for r in recs]
    rows, examples = [], {}
    fp0 = rec.cfg.explain_frequency_penalty
    variants = [("free text", False, False, fp0), ("quoted titles constrained (any liked)", True, False, fp0),
                ("quoted titles constrained (liked, sharing an attribute)", True, True, fp0)]
    variants += [(f"quoted titles constrained (liked, sharing an attribute), frequency_penalty {fp:g}", True, True, fp)
                 for fp in args.frequency_penalty]
    for label, quoted, relevant, fp in variants:
        rec.cfg.explain_quoted_titles, rec.cfg.explain_relevant_titles = quoted, relevant
        rec.cfg.explain_frequency_penalty = fp
        t0 = time.perf_counter()
        out = rec.explain(hs, top)
        dt = (time.perf_counter() - t0) / max(1, len(users))
        for r, h, t, (text, fb, hall, grounded, why) in zip(recs, hs, top, out):
            r.explanation, r.explanation_fallback, r.hallucinated, r.explanation_grounded = text, fb, hall, grounded
            r.explanation_fallback_reasons = list(why)
            r.evidence = rec.explanation_evidence(h, text, t)
        m = explanation_metrics(recs)
        rows.append({"explanations": label, **m, "relevant_citations": relevant_citations(rec, hs, recs),
                     "top1_citations": relevant_citations(rec, hs, recs, top=1, generated_only=True),
                     "subject_citations": subject_citations(recs),
                     "frequency_penalty": fp, "s_per_user": dt, "fallback_reasons": fallback_reason_counts(recs)})
        examples[label] = [{"user_id": r.user_id, "recommended": [i.title for i in r.items[:3]],
                            "explanation": r.explanation, "fallback": r.explanation_fallback,
                            "fallback_reasons": r.explanation_fallback_reasons,
                            "evidence": r.evidence}
                           for r in recs[: args.examples]]
        log.info("%s", rows[-1])
    backend.close()

    cols = ["explanations", "n", "fallback_rate", "hallucination_rate", "grounding_rate", "relevant_citations",
            "top1_citations", "subject_citations", "names_recommended", "mean_words", "distinct_2",
            "frequency_penalty", "s_per_user"]
    md = md_table(rows, cols)
    md += (f"\n{len(users)} test users (seed {args.seed}), top 3 of k=5 explained, backend {backend.name}, "
           f"retriever `{args.retriever}`. fallback = the generated text failed the post-check and the template "
           "explanation was shown instead (the check: no invented or repeated title, no recommended item claimed as "
           "already liked, no disliked history item claimed as liked, no genre claim that no item the text is "
           "about has, grounded); grounding_rate: the "
           "generated texts (before fallback) that name a history item or a liked attribute they do not "
           "contradict; hallucination_rate: those naming an invented title. relevant_citations: of the history "
           "items the shown texts name (template fallbacks included), the share that shares an attribute value with "
           "one of the three recommended items; top1_citations: of those the generated texts name (fallbacks left "
           "out), the share that shares one with the top item; subject_citations: with the recommended item the "
           "text is about (explain v3: the top one, or the best-ranked of the top 3 that shares an attribute with a "
           "liked item the prompt lists when the top one does not). "
           "names_recommended: of the generated texts shown (fallbacks left out), "
           "the share that quotes one of the three recommended titles. frequency_penalty "
           "(RankingConfig.explain_frequency_penalty, OpenAI's meaning): each repeat of a token already generated "
           f"lowers its logit by that much. Prompt template: explain v{rec.templates['explain'].version}.\n")
    rules = list(dict.fromkeys(k for r in rows for k in r["fallback_reasons"]))
    if rules:
        md += ("\nWhy the generated texts fell back (users per rule the text broke; a text can break several):\n\n"
               + md_table([{"explanations": r["explanations"], **{k: r["fallback_reasons"].get(k, 0) for k in rules}}
                           for r in rows], ["explanations", *rules]))
    for label, ex in examples.items():
        md += f"\n## Examples: {label}\n" + "".join(
            f"- user {e['user_id']} -> {', '.join(e['recommended'])}: {e['explanation']}"
            + (" *(template fallback)*" if e["fallback"] else "")
            + evidence_note(e.get("evidence"))
            + "\n" for e in ex)
    name = f"explanations_{args.dataset}" + ("" if args.backend == "transformers" else f"_{args.backend}")
    write_result(name, {"dataset": args.dataset, "rows": rows, "examples": examples, "users": users,
                        "args": vars(args), "backend": backend.name}, md,
                 command=command_line())


if __name__ == "__main__":
    main()
