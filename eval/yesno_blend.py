"""How far do the Yes/No signals go, alone and combined? -> eval/results/yesno_blend_<dataset>.{json,md}

    python eval/yesno_blend.py [--run artifacts/finetune/bench_yesno_ml-100k] [--valid-examples 2000]

A diagnostic for the Yes/No goal (the tuned LLM's AUC above BERT+LSTM's). On the test rows a fine-tuning run scored
(`<run>/scores/test_after.csv`, the recipe's seeded subset) it puts side by side: the tuned LLM's P(Yes), the
BERT+LSTM and MF baselines (their checkpoints, fitted on every training row), the counts figure the `yesno_estimate`
prompt shows (llmrec.data.stats.counts_only_p_yes), and logistic-regression blends of their logits. A blend is
fitted on validation rows only: blends without the LLM on `--valid-examples` seeded validation rows, blends with it
on the validation rows the run scored (`scores/valid_after.csv`, 200 with the recipe); the test rows never fit
anything. Each row's AUC comes with a paired bootstrap of its ratio to BERT+LSTM's on the same rows.

What it tells: if even a fitted blend of every signal stays near BERT+LSTM, no reading of those signals can clear
the goal by much, and the LLM would have to get something else out of the prompt (the titles) to do so.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.bench_utils import command_line, md_table, positive_int, write_result
from llmrec.data import load_prepared
from llmrec.data.stats import counts_only_p_yes
from llmrec.evaluation import yesno_subset
from llmrec.metrics import auc, logit, paired_auc_ratio

log = logging.getLogger("yesno_blend")

KEYS = ["user_id", "item_id"]
N_BOOT = 2000  # bootstrap resamples drawn per ratio; those where the ratio is undefined (one class) are dropped



def signals(ds, ex: pd.DataFrame, models: dict) -> pd.DataFrame:
    """The rows' keys, labels and each non-LLM signal's logit."""
    out = ex[KEYS + ["label"]].astype({"user_id": str, "item_id": str}).reset_index(drop=True)
    out["counts"] = logit(counts_only_p_yes(ds, ex))
    for name, m in models.items():
        out[name] = logit(m.predict_proba(ex))
    return out


def with_llm(rows: pd.DataFrame, scores: Path) -> pd.DataFrame:
    """`rows` joined with the run's P(Yes) per row (as column `llm`); every scored row must be among them."""
    llm = pd.read_csv(scores, dtype={"user_id": str, "item_id": str})
    j = llm.merge(rows, on=KEYS, suffixes=("", "_rows"), validate="one_to_one")
    if len(j) != len(llm) or not (j["label"] == j["label_rows"]).all():
        raise ValueError(f"{scores}: its rows are not the split's seeded subset ({len(j)} of {len(llm)} matched)")
    return j.assign(llm=logit(j["p_yes"])).drop(columns=["label_rows", "p_yes"])


def fit_blend(fit_rows: pd.DataFrame, cols: list[str]):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0).fit(fit_rows[cols].to_numpy(), fit_rows["label"].to_numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="artifacts/finetune/bench_yesno_ml-100k",
                    help="a finished yesno fine-tuning run (with scores/test_after.csv and scores/valid_after.csv)")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--valid-examples", type=positive_int, default=2000,
                    help="validation rows the non-LLM blends fit on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run = Path(args.run)
    if not run.is_dir():
        raise SystemExit(f"{run}: no such fine-tuning run; make it with `python finetune/bench.py run --task yesno "
                         f"--dataset {args.dataset}` (writes artifacts/finetune/bench_yesno_{args.dataset}, its "
                         "scores included), or pass --run with an existing yesno run folder")
    for f in (run / "scores" / "test_after.csv", run / "scores" / "valid_after.csv"):
        if not f.is_file():
            raise SystemExit(f"{f}: missing (score the run: python finetune/bench.py rescore --task yesno ...)")
    from llmrec.baselines import load_or_fit

    ds = load_prepared(args.dataset)
    models = {name: load_or_fit(name, ds)[0] for name in ("bert_lstm", "mf")}
    test_csv, valid_csv = run / "scores" / "test_after.csv", run / "scores" / "valid_after.csv"
    n_test, n_valid = len(pd.read_csv(test_csv)), len(pd.read_csv(valid_csv))
    test = with_llm(signals(ds, yesno_subset(ds, "test", n_test, args.seed), models), test_csv)
    valid_big = signals(ds, yesno_subset(ds, "valid", args.valid_examples, args.seed), models)
    valid_llm = with_llm(signals(ds, yesno_subset(ds, "valid", n_valid, args.seed), models), valid_csv)
    y = test["label"].to_numpy()
    scored: dict[str, tuple[np.ndarray, str]] = {
        "tuned LLM P(Yes)": (test["llm"].to_numpy(), "the run's test scores"),
        "BERT+LSTM": (test["bert_lstm"].to_numpy(), "checkpoint, every training row"),
        "MF": (test["mf"].to_numpy(), "checkpoint, every training row"),
        "counts figure (no model)": (test["counts"].to_numpy(), "no fitting"),
    }
    blends = [(["counts", "bert_lstm"], valid_big), (["counts", "bert_lstm", "mf"], valid_big),
              (["llm", "bert_lstm"], valid_llm), (["llm", "counts", "bert_lstm", "mf"], valid_llm)]
    names = {"llm": "LLM", "counts": "counts", "bert_lstm": "BERT+LSTM", "mf": "MF"}
    coefs = {}
    for cols, fit_rows in blends:
        m = fit_blend(fit_rows, cols)
        label = "blend: " + " + ".join(names[c] for c in cols)
        coefs[label] = dict(zip(cols, np.round(m.coef_[0], 4).tolist()))
        scored[label] = (m.decision_function(test[cols].to_numpy()),
                         f"logistic regression on {len(fit_rows)} validation rows; coef " +
                         ", ".join(f"{names[c]} {w:.2f}" for c, w in coefs[label].items()))
    rows = []
    for label, (s, how) in scored.items():
        row = {"signal": label, "auc": auc(y, s), "how": how}
        if label != "BERT+LSTM":
            ci = paired_auc_ratio(y, s, scored["BERT+LSTM"][0], n_boot=N_BOOT, seed=args.seed)
            row.update({"vs_bert_lstm": ci["ratio"], "low": ci["lo"], "high": ci["hi"], "p_ge_1": ci["p_ge_1"],
                        "n_boot": ci["n_boot"]})
        rows.append(row)
        log.info("%s: AUC %.4f", label, row["auc"])
    md = md_table(rows, ["signal", "auc", "vs_bert_lstm", "low", "high", "p_ge_1", "how"])
    used = sorted({r["n_boot"] for r in rows if "n_boot" in r})  # the resamples kept, per ratio
    n_used = f"{used[0]}" if used[0] == used[-1] else f"{used[0]}-{used[-1]}"
    dropped = (f"; of {N_BOOT} drawn, those where the ratio is undefined (e.g. a one-class resample) are dropped"
               if used[0] < N_BOOT else "")
    md += (f"\n{len(test)} Yes/No test rows of {args.dataset} (the run {run.name}'s seeded subset, positive rate "
           f"{y.mean():.3f}); vs_bert_lstm: AUC / BERT+LSTM's on the same rows with a 95% paired-bootstrap interval "
           f"(low-high; p_ge_1: share of the {n_used} resamples used where the row is at least as good{dropped}). "
           "Blends: logistic regression over the signals' logits (C = 1), fitted on validation rows only, scored by "
           "their decision function on the test rows.\n")
    write_result(f"yesno_blend_{args.dataset}", {"dataset": args.dataset, "run": str(run), "rows": rows,
                                                 "coefficients": coefs, "args": vars(args)}, md,
                 command=command_line())


if __name__ == "__main__":
    main()
