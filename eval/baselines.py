"""Train and evaluate every classic baseline on one dataset; write `eval/results/baselines_<dataset>.{json,md}`.

    python eval/baselines.py --dataset ml-100k
    nice -n 10 python eval/baselines.py --dataset ml-1m
    python eval/baselines.py --dataset ml-1m --models sasrec --merge   # re-run one model, keep the other rows

Next item: full ranking of every catalogue item minus the user's train+valid history, leave-one-out test target,
all users (`llmrec.evaluation.evaluate_ranking`). Yes/No (MF, BERT+LSTM): every test row of the global time split
(`llmrec.evaluation.evaluate_yesno`). Checkpoints go to `$LLMREC_HOME/models/baselines/<dataset>/<model>/`;
`--reuse` loads a checkpoint instead of training when its saved config equals the requested one (its training
time is the one recorded when it was trained).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmrec.bench_utils import md_table, peak_rss_mb, write_result  # noqa: E402

log = logging.getLogger("eval.baselines")

MODELS = ["pop", "mf", "bpr", "bert_lstm", "sasrec"]
# per-dataset settings for the 2-core budget (overridable with --set model.key=value)
DATASET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "ml-1m": {
        "bert_lstm": {"max_train_examples": 200_000, "time_budget_s": 480.0},
        "sasrec": {"time_budget_s": 1080.0, "eval_every": 2},
        "mf": {"time_budget_s": 100.0},
        "bpr": {"time_budget_s": 300.0},
    },
}
COLUMNS = ["method", "hr@10", "recall@10", "ndcg@10", "ndcg@20", "mrr@10", "auc", "accuracy", "f1", "train_s",
           "infer_s_per_1k_users"]


def run_model(name: str, ds: Any, cfg: dict[str, Any], reuse: bool) -> tuple[Any, bool]:
    from llmrec.baselines import checkpoint_dir, get_model, load_model
    from llmrec.config import to_dict

    model = get_model(name, **cfg)
    ck = checkpoint_dir(ds.name, name)
    if reuse and (ck / "meta.json").is_file():
        try:
            old = load_model(name, ds.name, ds=ds)
            if to_dict(old.cfg) == to_dict(model.cfg):
                log.info("%s: reusing checkpoint %s (trained in %.1f s)", name, ck, old.fit_info.get("train_s", -1))
                return old, True
            log.info("%s: checkpoint config differs from the requested one: retraining", name)
        except (ValueError, FileNotFoundError) as e:
            log.info("%s: checkpoint not reusable (%s): retraining", name, e)
    model.fit(ds, checkpoint_dir=ck)
    return model, False


def earlier_rows(path: Path, keep: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(methods, details) of the models `keep` from an earlier result file (`--merge`), each detail marked with the
    commit of that run. A file that is not such a result (not JSON, not an object, `methods` / `details` not objects
    of objects) exits with an error naming it, before any model trains, so it is never overwritten."""
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"--merge: {path} is not valid JSON ({e}); fix or move it, or write elsewhere with --name "
                         "or --results-dir (nothing was trained, the file is left as it is)") from None
    methods, details = (prev.get("methods", {}), prev.get("details", {})) if isinstance(prev, dict) else (None, None)
    bad = ("it is not a JSON object" if not isinstance(prev, dict)
           else "its 'methods' is not an object of per-model objects"
           if not isinstance(methods, dict) or not all(isinstance(m, dict) for m in methods.values())
           else "its 'details' is not an object of per-model objects"
           if not isinstance(details, dict) or not all(isinstance(d, dict) for d in details.values()) else None)
    if bad:
        raise SystemExit(f"--merge: {path} is not a baselines result file: {bad}; fix or move it, or write elsewhere "
                         "with --name or --results-dir (nothing was trained, the file is left as it is)")
    kept = [n for n in MODELS if n in methods and n not in keep]
    return ({n: methods[n] for n in kept},
            {n: {**details.get(n, {}), "from_earlier_run": prev.get("commit")} for n in kept})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--set", nargs="*", action="extend", default=[], metavar="MODEL.KEY=VALUE",
                    help="model config overrides (repeatable)")
    ap.add_argument("--reuse", action="store_true", help="load a checkpoint with the same config instead of training")
    ap.add_argument("--results-dir", help="default: eval/results")
    ap.add_argument("--name", help="result name (default: baselines_<dataset>)")
    ap.add_argument("--merge", action="store_true", help="keep the other models' rows of an existing result file")
    args = ap.parse_args()

    from llmrec.config import ConfigError, deep_merge, parse_overrides

    # usage errors (exit 2) before the dataset is loaded or prepared, and before any model trains
    names = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        ap.error(f"--models: {f'unknown {bad}' if bad else 'no model named'}; choose from {','.join(MODELS)}")
    try:
        given = parse_overrides(args.set)
    except ConfigError as e:
        ap.error(f"--set: {e}")
    from llmrec.baselines import get_model

    for k, v in given.items():
        if k not in MODELS or not isinstance(v, dict):
            ap.error(f"--set: {k!r} is not MODEL.KEY=VALUE with MODEL one of {','.join(MODELS)}")
        try:  # an unknown key or a bad value: now, not after the models before it have trained
            get_model(k, **v)
        except ConfigError as e:
            ap.error(f"--set: {e}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from llmrec.baselines.evaluate import evaluate_model
    from llmrec.data import load_prepared

    ds = load_prepared(args.dataset, prepare_if_missing=True)
    overrides = deep_merge(DATASET_DEFAULTS.get(ds.name, {}), given)
    methods: dict[str, Any] = {}
    details: dict[str, Any] = {}
    old = Path(args.results_dir or ROOT / "eval" / "results") / f"{args.name or f'baselines_{ds.name}'}.json"
    if args.merge and old.is_file():  # rows of models not re-run now stay, with their own recorded commit
        methods, details = earlier_rows(old, names)

    def write(final: bool) -> Path:
        notes = [
            "Next item: full ranking over all items minus the user's train+valid history, leave-one-out test target, "
            f"all {len(ds.targets('test'))} users; pessimistic ties.",
            "Yes/No (auc/accuracy/f1, threshold 0.5): all test rows of the global time split; only MF and BERT+LSTM "
            "predict Yes/No. MF's ranking row ranks by p_u.q_i + b_i of a second click model fitted the same way "
            "without the users' leave-one-out valid/test targets (the Yes/No train rows hold them, with labels).",
            "Timings: 2 shared CPU cores, 1 torch thread per model, other jobs running at the same time: noisy.",
        ]
        mf = details.get("mf", {}).get("extra_metrics", {})
        if "yesno_cold_user_share" in mf:
            notes.append(f"MF: {mf['yesno_cold_user_share']:.0%} of the Yes/No test rows are from users with no "
                         "training row (after the time cut-off): they get item + global bias only.")
        for name, d in details.items():
            fi = d.get("fit_info", {})
            if any(k.endswith("stopped_by_time_budget") for k in fi):
                budget = d.get("config", {}).get("time_budget_s")
                notes.append(f"{name}: training stopped by its time budget ({budget} s), "
                             f"best epoch kept: {fi}")
            if name == "bert_lstm" and d.get("config", {}).get("max_train_examples"):
                notes.append(f"bert_lstm: Yes/No training capped at {d['config']['max_train_examples']:,} seeded rows "
                             f"of {int((ds.yesno['split'] == 'train').sum()):,}.")
        payload = {
            "dataset": ds.name,
            "protocol": {"ranking": "full, leave-one-out test, history excluded", "yesno": "global time split, test"},
            "n_items": int(ds.n_items),
            "methods": methods,
            "details": details,
            "notes": notes,
            "peak_rss_mb": peak_rss_mb(),
            "complete": final,
        }
        rows = [{"method": n, **m} for n, m in methods.items()]
        table = md_table(rows, COLUMNS) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        path = write_result(args.name or f"baselines_{ds.name}", payload, table,
                            results_dir=Path(args.results_dir) if args.results_dir else None)
        print(table)
        return path

    for name in names:
        t0 = time.perf_counter()
        model, reused = run_model(name, ds, overrides.get(name, {}), args.reuse)
        row = evaluate_model(model, ds, "test")
        methods[name] = {k: row[k] for k in COLUMNS[1:] if k in row}
        details[name] = {
            "config": {k: v for k, v in vars(model.cfg).items()},
            "fit_info": model.fit_info,
            "reused_checkpoint": reused,
            "extra_metrics": {k: v for k, v in row.items() if k not in COLUMNS},
            "wall_s": time.perf_counter() - t0,
        }
        log.info("%s: %s", name, {k: round(v, 4) for k, v in methods[name].items() if isinstance(v, float)})
        path = write(final=name == names[-1])  # partial results survive an interrupted run
    print(f"written {path}")


if __name__ == "__main__":
    main()
