"""Cross-domain (zero-shot) table and the contamination probe -> eval/results/zeroshot.{json,md}.

    python eval/zeroshot.py --ml-adapter PATH --lastfm-adapter PATH [--ml-title-adapter PATH]
        [--lastfm-title-adapter PATH]
        [--yesno-examples 300] [--rank-users 100] [--retriever hybrid] [--retrieval-weight 4] [--likelihood-weight 1]
        [--label _NAME]   # -> eval/results/zeroshot_NAME.{json,md} (default: zeroshot.{json,md})
    python eval/zeroshot.py --refresh-baselines [--label _NAME]   # only the in-domain baseline rows recomputed
    python eval/zeroshot.py --refresh-contamination [--label _NAME]   # only the contamination probe recomputed

Rows: for each target domain (Last.fm artists, MovieLens-100K, Amazon Gift Cards as a ranking smoke test), the base
model zero-shot, an adapter tuned on the *other* domain (the transfer), the domain's own adapter (the in-domain
reference, where one is given), and that domain's in-domain MF and BERT+LSTM (Yes/No and ranking) / BPR (ranking),
with paired-bootstrap AUC ratios of every tuned LLM row to MF, BERT+LSTM and the counts figure.
All Yes/No rows of one domain score the same fixed example subset; all ranking rows the same user subset (full
ranking over the candidates of `--retriever`, by default the product's: text + item-CF, LLM letter log-prob fused
with weight 4 x log(1 / retrieval rank), as `llmrec recommend` and the service do; a "retrieval alone" row shows what
the LLM adds). Gift Cards gets no AUC claim: 93% of its labels are positive.
With `--ml-title-adapter` / `--lastfm-title-adapter` (`next_title` adapters), each domain also gets title-likelihood
ranking rows (the Recommender's `likelihood` mode: each candidate's quoted title scored by its mean log-prob as the
answer to a `next_title` prompt without a candidate list): base, the other domain's adapter and the domain's own,
fused with the retrieval rank at `--likelihood-weight` (1 by default: the weight `llmrec bench` chose on
MovieLens-100K's validation split, so the other domains are not tuned on).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from llmrec.bench_utils import command_line, md_table, positive_int, write_result
from llmrec.cli.args import nonneg_float
from llmrec.data import load_prepared
from llmrec.data.stats import counts_only_p_yes
from llmrec.evaluation import evaluate_ranking, evaluate_yesno, yesno_subset
from llmrec.llm import load_backend
from llmrec.metrics import paired_auc_ratio, spearman
from llmrec.ranking import RankingConfig, Recommender
from llmrec.ranking.evaluate import contamination_probe, eval_rank
from llmrec.ranking.factory import (
    DEFAULT_RETRIEVAL_WEIGHT,
    DEFAULT_RETRIEVER,
    RETRIEVERS,
    build_retriever,
    with_adapter_templates,
)

log = logging.getLogger("zeroshot")


def yesno_cols(p, yn) -> dict:
    """The Yes/No columns of a row from its P(Yes) on the domain's test rows `yn` = (examples, counts figure)."""
    ex, counts = yn
    p = np.asarray(p, dtype=float)
    m = evaluate_yesno(p, ex)
    return {"auc": m["auc"], "accuracy": m["accuracy"], "f1": m["f1"], "yesno_n": m["n"],
            "rho_counts": spearman(p, counts), "p_yes": p.tolist()}


def llm_rows(ds, retriever, adapter, label, args, yn) -> dict:
    backend = load_backend("transformers", adapter=adapter, dtype=args.dtype)
    rec = Recommender(ds, backend, retriever,
                      with_adapter_templates(RankingConfig(retrieval_weight=args.retrieval_weight), adapter))
    row = {"domain": ds.name, "method": label}
    if yn:
        row.update(yesno_cols(rec.yesno_examples_probs(yn[0]), yn))
    r = eval_rank(rec, ds, args.rank_users, args.seed)
    row.update({"ndcg@10": r["ndcg@10"], "hr@10": r["hr@10"], "rank_users": r["n_users"]})
    backend.close()
    return row


def likelihood_row(ds, retriever, adapter, label, args) -> dict:
    """A ranking row of the title-likelihood mode (no Yes/No: the adapter is tuned on next_title)."""
    backend = load_backend("transformers", adapter=adapter, dtype=args.dtype)
    cfg = RankingConfig(mode="likelihood", retrieval_weight=args.likelihood_weight)
    rec = Recommender(ds, backend, retriever, with_adapter_templates(cfg, adapter))
    r = eval_rank(rec, ds, args.rank_users, args.seed, mode="likelihood")
    backend.close()
    return {"domain": ds.name, "method": label, "ndcg@10": r["ndcg@10"], "hr@10": r["hr@10"],
            "rank_users": r["n_users"]}


def paired_auc_rows(table: list[dict], yesno_rows: dict[str, list[dict]], seed: int) -> list[dict]:
    """Each tuned LLM row's AUC over MF's, BERT+LSTM's and the counts figure's on the same Yes/No rows of its
    domain: the ratio with a 95% paired-bootstrap interval (llmrec.metrics.paired_auc_ratio, 2000 resamples)."""
    out = []
    for dom, rows in yesno_rows.items():
        y = [r["label"] for r in rows]
        by = {r["method"]: r for r in table if r["domain"] == dom and "p_yes" in r}
        for name, r in by.items():
            if not name.startswith("LLM +"):
                continue
            for ref in ("MF (in-domain)", "BERT+LSTM (in-domain)", "counts figure alone (no model)"):
                if ref in by:
                    ci = paired_auc_ratio(y, r["p_yes"], by[ref]["p_yes"], seed=seed)
                    out.append({"domain": dom, "method": name, "vs": ref, "auc_ratio": ci["ratio"], "low": ci["lo"],
                                "high": ci["hi"], "p_ge_1": ci["p_ge_1"], "n": ci["n"]})
    return out


def counts_row(ds, yn) -> dict:
    """The figure the yesno_estimate prompt shows (two counts from before the row's time, no fitting) as a score."""
    return {"domain": ds.name, "method": "counts figure alone (no model)", **yesno_cols(yn[1], yn)}


def retrieval_row(ds, retriever, args) -> dict:
    r = eval_rank(Recommender(ds, None, retriever, RankingConfig()), ds, args.rank_users, args.seed,
                  retrieval_only=True)
    return {"domain": ds.name, "method": f"retrieval alone ({args.retriever})", "ndcg@10": r["ndcg@10"],
            "hr@10": r["hr@10"], "rank_users": r["n_users"]}


def in_domain_rows(ds, args, yn) -> list[dict]:
    from llmrec.baselines import get_model, load_or_fit

    rows = []
    if yn:
        mf = get_model("mf")
        mf.fit(ds)
        # BERT+LSTM from its checkpoint (`llmrec baselines train --dataset D --model bert_lstm`), else fitted and saved
        fitted = [("MF (in-domain)", mf), ("BERT+LSTM (in-domain)", load_or_fit("bert_lstm", ds)[0])]
        for label, m in fitted:
            r = evaluate_ranking(ds, lambda u, m=m: m.score_items(list(u), "test"), max_users=args.rank_users,
                                 seed=args.seed)
            rows.append({"domain": ds.name, "method": label, **yesno_cols(m.predict_proba(yn[0]), yn),
                         "ndcg@10": r["ndcg@10"], "hr@10": r["hr@10"], "rank_users": r["n_users"]})
    bpr = get_model("bpr")
    bpr.fit(ds)
    r = evaluate_ranking(ds, lambda u: bpr.score_items(list(u), "test"), max_users=args.rank_users, seed=args.seed)
    rows.append({"domain": ds.name, "method": "BPR (in-domain)", "ndcg@10": r["ndcg@10"], "hr@10": r["hr@10"],
                 "rank_users": r["n_users"]})
    return rows


def render(table: list[dict], paired: list[dict], probe: dict, args: argparse.Namespace) -> str:
    """The markdown of the result: the table, how its columns are computed, the paired AUC ratios, the probe."""
    cols = ["domain", "method", "auc", "accuracy", "f1", "rho_counts", "ndcg@10", "hr@10", "yesno_n", "rank_users"]
    return md_table(table, cols) + (
        f"\nRanking columns: full ranking over all items minus the user's history; LLM rows rank the top 20 of "
        f"`{args.retriever}` by letter log-prob + {args.retrieval_weight:g} x log(1 / retrieval rank), the rest "
        "follow in retrieval order. Ranking rows of the LLM use the named adapter as it is (tuned on Yes/No). "
        f"`title likelihood` rows: each candidate's quoted title scored by its mean log-prob per token as the answer "
        f"to a `next_title` prompt without candidates, + {args.likelihood_weight:g} x log(1 / retrieval rank) (the "
        "weight llmrec bench chose on MovieLens-100K validation; the target domain is not tuned on).\n"
        "\nrho_counts: Spearman's rho between a row's P(Yes) and the counts figure (the user's like rate and other "
        "users' like rate of the target, from before the row's time, combined with no fitting: "
        "llmrec.data.stats.counts_only_p_yes, the figure the `yesno_estimate` prompt shows) on the same rows; "
        "every row's per-example P(Yes) is in the JSON (`p_yes`, rows in `yesno_rows`).\n"
        "\nGift Cards: 93% of labels are positive, so it is a ranking smoke test only (no AUC row).\n"
        "\n## Paired AUC ratios (tuned LLM rows vs MF, BERT+LSTM and the counts figure, same rows)\n"
        + md_table(paired, ["domain", "method", "vs", "auc_ratio", "low", "high", "p_ge_1", "n"]) +
        "\nauc_ratio: the row's AUC / the reference's; low-high: 95% paired-bootstrap interval (2000 resamples); "
        "p_ge_1: share of resamples where the LLM row is at least as good.\n"
        "\n## Contamination probe (ML-100K, base model)\n" + md_table([probe], list(probe)) +
        "\nA title-completion rate well above the shuffled control means the base model has seen these titles; "
        "MovieLens figures then measure memory of popular titles as well as preference modelling.\n"
    )


BASELINE_METHODS = ("MF (in-domain)", "BERT+LSTM (in-domain)", "BPR (in-domain)")


def _refreshed_result(label: str) -> tuple[Path, dict, argparse.Namespace]:
    from llmrec.bench_utils import RESULTS_DIR

    path = RESULTS_DIR / f"zeroshot{label}.json"
    old = json.loads(path.read_text())
    return path, old, argparse.Namespace(**old["args"])


def _write_refreshed(label: str, old: dict, changed: dict, key: str) -> None:
    """Write `old` with `changed` (table / paired_auc / contamination) and the refresh recorded under `key`; the
    markdown says, under the tables, what each refresh recomputed and where every other figure comes from."""
    from datetime import UTC, datetime

    from llmrec.bench_utils import git_commit, machine_info

    when = datetime.now(UTC).isoformat(timespec="seconds")
    payload = {k: v for k, v in old.items() if k not in ("commit", "machine", "created", "command")}
    payload.update(changed)
    payload[key] = {"at": when, "commit": git_commit(), "machine": machine_info(), **REFRESHES[key][1]}
    payload["llm_rows_from"] = old.get("llm_rows_from") or {k: old[k] for k in ("commit", "machine", "created")}
    src = payload["llm_rows_from"]
    notes = "".join(f"\n{REFRESHES[k][0]} recomputed {payload[k]['at'][:16]} at {payload[k]['commit']} "
                    f"(`python eval/zeroshot.py --refresh-{k.split('_')[0]}`, {REFRESHES[k][2]}).\n"
                    for k in REFRESHES if k in payload)
    notes += (f"\nEvery other figure is from the run of {src['created'][:16]} at {src['commit']} on "
              f"{src['machine']}.\n")
    write_result(f"zeroshot{label}", payload,
                 render(payload["table"], payload["paired_auc"], payload["contamination"],
                        argparse.Namespace(**old["args"])) + notes,
                 command=f"{old['command']}; then {command_line()}")


# what each refresh recomputes: (what the note calls it, fields recorded with it, why it was run)
REFRESHES = {
    "baselines_refreshed": (f"In-domain baseline rows ({', '.join(BASELINE_METHODS)})",
                            {"methods": list(BASELINE_METHODS)},
                            "after MF's ranking stopped training on leave-one-out targets"),
    "contamination_refreshed": ("The contamination probe", {},
                                "after its titles were put in their natural form: 'Usual Suspects, The (1995)' "
                                "is prompted as 'The Usual Suspects'"),
}


def refresh_baselines(label: str) -> None:
    """Recompute only the in-domain baseline rows of an existing result (e.g. after a baseline's fix), with the
    settings it records; every LLM row, the paired ratios' LLM side and the probe are kept as they are. The Yes/No
    rows are checked to be the recorded ones, and the refresh is stated in the command and under the tables."""
    path, old, args = _refreshed_result(label)
    table = [r for r in old["table"] if r["method"] not in BASELINE_METHODS]
    for name in dict.fromkeys(r["domain"] for r in old["table"]):
        ds = load_prepared(name, prepare_if_missing=True)
        yn = None
        if name in old["yesno_rows"]:
            ex = yesno_subset(ds, "test", args.yesno_examples, args.seed)
            rows = ex[["user_id", "item_id", "label"]].astype({"user_id": str, "item_id": str}).to_dict("records")
            if rows != old["yesno_rows"][name]:
                raise SystemExit(f"{path}: {name}'s Yes/No test rows are not the recorded ones (data changed?)")
            yn = (ex, counts_only_p_yes(ds, ex))
        fresh = in_domain_rows(ds, args, yn)
        at = max(i for i, r in enumerate(table) if r["domain"] == name and not r["method"].startswith("counts"))
        table[at + 1:at + 1] = fresh
    paired = paired_auc_rows(table, old["yesno_rows"], args.seed)
    _write_refreshed(label, old, {"table": table, "paired_auc": paired}, "baselines_refreshed")


def refresh_contamination(label: str) -> None:
    """Recompute only the contamination probe of an existing result (the base model, its recorded n, seed and
    dtype); every table row is kept, and the refresh is stated in the command and under the tables."""
    _, old, args = _refreshed_result(label)
    base = load_backend("transformers", dtype=args.dtype)
    probe = contamination_probe(base, load_prepared("ml-100k"), n=args.contamination_n, seed=args.seed)
    _write_refreshed(label, old, {"contamination": probe}, "contamination_refreshed")


def check_refresh(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A refresh recomputes part of an existing result with the settings *it* records: refused (argparse, exit 2)
    with the other refresh (only the first ran), with any other option (ignored without a word, yet written into
    the result's command), or without that result file (a traceback)."""
    from llmrec import bench_utils

    refresh = [f"--{k.replace('_', '-')}" for k in ("refresh_baselines", "refresh_contamination") if getattr(args, k)]
    if not refresh:
        return
    if len(refresh) > 1:
        ap.error(f"{' and '.join(refresh)}: one at a time (each rewrites the result; run them one after the other)")
    ignored = [a.option_strings[0] for a in ap._actions
               if a.dest not in ("help", "refresh_baselines", "refresh_contamination", "label")
               and getattr(args, a.dest) != a.default]
    if ignored:
        ap.error(f"{refresh[0]} recomputes with the settings the existing result records; {', '.join(ignored)} "
                 "would be ignored (only --label goes with it)")
    path = bench_utils.RESULTS_DIR / f"zeroshot{args.label}.json"
    if not path.is_file():
        ap.error(f"{refresh[0]}: no result to refresh at {path} (run eval/zeroshot.py without it first, or fix "
                 "--label)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refresh-baselines", action="store_true",
                    help="recompute only the in-domain baseline rows of the existing result (its recorded settings)")
    ap.add_argument("--refresh-contamination", action="store_true",
                    help="recompute only the contamination probe of the existing result (its recorded settings)")
    ap.add_argument("--ml-adapter", help="adapter tuned on MovieLens (yesno task)")
    ap.add_argument("--lastfm-adapter", help="adapter tuned on Last.fm (yesno task)")
    ap.add_argument("--ml-title-adapter",
                    help="adapter tuned on MovieLens (next_title task): title-likelihood rows (transfer to Last.fm "
                         "and Gift Cards, in-domain on MovieLens)")
    ap.add_argument("--lastfm-title-adapter",
                    help="adapter tuned on Last.fm (next_title task): title-likelihood rows (in-domain on Last.fm, "
                         "reverse transfer on MovieLens)")
    ap.add_argument("--yesno-examples", type=positive_int, default=300)
    ap.add_argument("--rank-users", type=positive_int, default=100)
    ap.add_argument("--contamination-n", type=positive_int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="fast")
    ap.add_argument("--retriever", default=DEFAULT_RETRIEVER, choices=RETRIEVERS,
                    help="candidates the LLM rows rank (default: the product's)")
    ap.add_argument("--retrieval-weight", type=nonneg_float, default=DEFAULT_RETRIEVAL_WEIGHT,
                    help="LLM letter log-prob + W x log(1 / retrieval rank); 0 = the LLM's order alone")
    ap.add_argument("--label", default="", help="suffix of the result name, e.g. _1206")
    ap.add_argument("--likelihood-weight", type=nonneg_float, default=1.0,
                    help="title-likelihood rows: mean title log-prob + W x log(1 / retrieval rank)")
    args = ap.parse_args()
    check_refresh(ap, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.refresh_baselines:
        return refresh_baselines(args.label)
    if args.refresh_contamination:
        return refresh_contamination(args.label)
    table = []
    yesno_rows: dict[str, list[dict]] = {}  # each domain's Yes/No test rows, in the order of every row's p_yes
    ml, lfm = "LLM + MovieLens", "LLM + Last.fm"
    tl = "next-title adapter ({}), title likelihood"
    plan = [  # domain, Yes/No rows?, [(Yes/No adapter, label)], [(next_title adapter, label)]: transfer, in-domain
        ("lastfm", True,
         [(args.ml_adapter, f"{ml} adapter (zero-shot transfer)"),
          (args.lastfm_adapter, f"{lfm} adapter (in-domain)")],
         [(args.ml_title_adapter, f"{ml} {tl.format('zero-shot transfer')}"),
          (args.lastfm_title_adapter, f"{lfm} {tl.format('in-domain')}")]),
        ("ml-100k", True,
         [(args.lastfm_adapter, f"{lfm} adapter (reverse transfer)"),
          (args.ml_adapter, f"{ml} adapter (in-domain)")],
         [(args.lastfm_title_adapter, f"{lfm} {tl.format('reverse transfer')}"),
          (args.ml_title_adapter, f"{ml} {tl.format('in-domain')}")]),
        ("amazon-gift-cards", False, [(args.ml_adapter, f"{ml} adapter (smoke test)")],
         [(args.ml_title_adapter, f"{ml} {tl.format('zero-shot transfer')}")]),
    ]
    any_title = bool(args.ml_title_adapter or args.lastfm_title_adapter)
    for name, yesno, adapters, title_adapters in plan:
        ds = load_prepared(name, prepare_if_missing=True)
        retriever = build_retriever(ds, args.retriever)
        yn = None  # the domain's Yes/No test rows and the counts figure on them, shared by every row
        if yesno:
            ex = yesno_subset(ds, "test", args.yesno_examples, args.seed)
            yn = (ex, counts_only_p_yes(ds, ex))
            yesno_rows[name] = ex[["user_id", "item_id", "label"]].astype({"user_id": str, "item_id": str}).to_dict(
                "records")
        table.append(retrieval_row(ds, retriever, args))
        table.append(llm_rows(ds, retriever, None, "LLM base (zero-shot)", args, yn))
        log.info("%s", table[-1])
        for adapter, label in adapters:
            if adapter:
                table.append(llm_rows(ds, retriever, adapter, label, args, yn))
                log.info("%s", table[-1])
        if any_title:
            table.append(likelihood_row(ds, retriever, None, "LLM base (zero-shot), title likelihood", args))
            log.info("%s", table[-1])
            for adapter, label in title_adapters:
                if adapter:
                    table.append(likelihood_row(ds, retriever, adapter, label, args))
                    log.info("%s", table[-1])
        table.extend(in_domain_rows(ds, args, yn))
        if yn:
            table.append(counts_row(ds, yn))
    base = load_backend("transformers", dtype=args.dtype)
    probe = contamination_probe(base, load_prepared("ml-100k"), n=args.contamination_n, seed=args.seed)
    paired = paired_auc_rows(table, yesno_rows, args.seed)
    write_result(f"zeroshot{args.label}", {"dataset": "lastfm, ml-100k, amazon-gift-cards", "table": table,
                              "yesno_rows": yesno_rows, "paired_auc": paired,
                              "contamination": probe, "args": vars(args)}, render(table, paired, probe, args),
                 command=command_line())


if __name__ == "__main__":
    main()
