"""`llmrec baselines train|eval`: fit a classic baseline (checkpoint under
`$LLMREC_HOME/models/baselines/<dataset>/<model>/`) and evaluate checkpoints with the shared full-ranking path."""

from __future__ import annotations

import argparse

from llmrec.cli.args import positive_int

MODEL_CHOICES = ["pop", "mf", "bpr", "bert_lstm", "sasrec"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baselines", help="train and evaluate the classic baselines (pop, mf, bpr, bert_lstm, sasrec)")
    s = p.add_subparsers(dest="baselines_command", metavar="ACTION")
    pt = s.add_parser("train", help="fit one baseline and save its checkpoint")
    pt.add_argument("--dataset", required=True, help="prepared dataset name (llmrec data prepare)")
    pt.add_argument("--model", required=True, choices=MODEL_CHOICES, help="the baseline to fit")
    pt.add_argument("--config", help="YAML file with the model's config keys")
    pt.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override config keys")
    pt.add_argument("--out", help="checkpoint folder (default: $LLMREC_HOME/models/baselines/<dataset>/<model>)")
    pt.add_argument("--no-progress", action="store_true", help="no progress bars")
    pt.set_defaults(func=cmd_train)
    pe = s.add_parser("eval", help="evaluate saved checkpoints: full ranking (test) and Yes/No where it applies")
    pe.add_argument("--dataset", required=True, help="prepared dataset name (llmrec data prepare)")
    pe.add_argument("--model", nargs="*", action="extend", choices=MODEL_CHOICES,
                    help="default: every model with a checkpoint (repeatable)")
    pe.add_argument("--split", default="test", choices=["valid", "test"],
                    help="leave-one-out targets to rank (default %(default)s)")
    pe.add_argument("--max-users", type=positive_int, help="seeded subset of users (default: all)")
    pe.add_argument("--yesno-examples", type=positive_int, help="seeded subset of Yes/No examples (default: all)")
    pe.add_argument("--seed", type=int, default=0, help="seed of the subsets (default %(default)s)")
    pe.set_defaults(func=cmd_eval)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def cmd_train(args: argparse.Namespace) -> int:
    from llmrec.baselines import checkpoint_dir, get_model, model_class
    from llmrec.config import apply_overrides, from_dict, load_yaml
    from llmrec.data import load_prepared

    # checked before any data is read, an error naming the file or the --set override (the model's own check says
    # `baselines.<model>`, which is neither)
    config_cls = model_class(args.model).config_cls
    cfg = apply_overrides(config_cls, load_yaml(args.config) if args.config else {}, args.set, "--set")
    from_dict(config_cls, cfg, where=args.config or "--set")
    ds = load_prepared(args.dataset)
    model = get_model(args.model, **cfg)
    out = args.out or checkpoint_dir(ds.name, args.model)
    model.fit(ds, checkpoint_dir=out, progress=not args.no_progress)
    info = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in model.fit_info.items())
    print(f"{args.model} on {ds.name}: {info}")
    print(f"checkpoint: {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llmrec.baselines import checkpoint_dir, load_model
    from llmrec.baselines.evaluate import evaluate_model
    from llmrec.bench_utils import md_table
    from llmrec.data import load_prepared

    ds = load_prepared(args.dataset)
    names = list(dict.fromkeys(args.model or [])) or [m for m in MODEL_CHOICES
                                                      if (checkpoint_dir(ds.name, m) / "meta.json").is_file()]
    if not names:
        raise FileNotFoundError(
            f"no baseline checkpoint for {ds.name} under {checkpoint_dir(ds.name, 'x').parent}; "
            f"run `llmrec baselines train --dataset {ds.name} --model pop` first"
        )
    rows = []
    for name in names:
        model = load_model(name, ds.name, ds=ds)
        row = evaluate_model(model, ds, split=args.split, max_users=args.max_users,
                             yesno_examples=args.yesno_examples, seed=args.seed)
        rows.append({"method": name, **row})
    cols = ["method", "hr@10", "recall@10", "ndcg@10", "ndcg@20", "mrr@10", "auc", "accuracy", "f1", "train_s",
            "infer_s_per_1k_users"]
    print(f"{ds.name}: full ranking over {ds.n_items} items ({args.split}), history excluded")
    print(md_table(rows, cols), end="")
    return 0
