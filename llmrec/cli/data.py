"""`llmrec data prepare|show`."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from llmrec.cli.args import count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare datasets and inspect them")
    s = p.add_subparsers(dest="data_command", metavar="ACTION")
    pp = s.add_parser("prepare", help="load, clean, split and save a dataset; print its statistics")
    pp.add_argument("--dataset", required=True, help="ml-100k | ml-1m | lastfm | amazon-gift-cards | folder | file")
    pp.add_argument("--items", help="item metadata file for a CSV/TSV/Parquet interaction file")
    pp.add_argument("--config", help="YAML file with PrepareConfig keys")
    pp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override PrepareConfig keys")
    pp.set_defaults(func=cmd_prepare)
    ps = s.add_parser("show", help="print a user's history with titles")
    ps.add_argument("--dataset", required=True)
    ps.add_argument("--user", "--user-id", dest="user", required=True)
    ps.add_argument("--limit", type=count, default=50, help="most recent events shown (0 = all)")
    ps.set_defaults(func=cmd_show)


def format_stats(name: str, st: dict, seconds: float | None = None) -> str:
    rows = [
        ("users", f"{st['users']:,}"),
        ("items", f"{st['items']:,}"),
        ("interactions", f"{st['interactions']:,}"),
        ("density", f"{st['density']:.4%}"),
        ("time span", f"{st['time_start']} .. {st['time_end']}"),
        ("like rate", f"{st['like_rate']:.1%}"),
        ("dropped", ", ".join(f"{k}={v:,}" for k, v in st["dropped"].items()) or "none"),
        ("next-item split", ", ".join(f"{k}={v:,}" for k, v in sorted(st["loo_split"].items()))),
        ("yes/no split", ", ".join(f"{k}={v:,}" for k, v in sorted(st["yesno_split"].items()))),
    ]
    if seconds is not None:
        rows.append(("prepare time", f"{seconds:.1f} s"))
    w = max(len(r[0]) for r in rows)
    return "\n".join([f"== {name}"] + [f"{k.ljust(w)}  {v}" for k, v in rows])


def cmd_prepare(args: argparse.Namespace) -> int:
    from llmrec.config import apply_overrides, from_dict, load_yaml
    from llmrec.data import PrepareConfig, prepare

    data = apply_overrides(PrepareConfig, load_yaml(args.config) if args.config else {}, args.set, "--set")
    if args.items:
        if data.get("items_file") not in (None, args.items):  # two item files: neither silently wins
            raise ValueError(f"--items {args.items} and items_file={data['items_file']} (from "
                             f"{args.config or '--set'}) name different item files; give one")
        data["items_file"] = args.items
    cfg = from_dict(PrepareConfig, data, where=args.config or "--set")
    rep = prepare(args.dataset, cfg)
    print(format_stats(rep.name, rep.stats, rep.seconds))
    print(f"written to {rep.path}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from llmrec.data import load_prepared

    ds = load_prepared(args.dataset)
    h = ds.history(args.user, before="all")
    from llmrec.prompts.text import plural

    print(f"user {args.user}: {len(h)} events in {ds.name} ({plural(ds.domain)}); split = leave-one-out role")
    fields = [f for f in ds.items.columns if f not in ("item_id", "title")]  # what prompts show after a title
    for _, r in (h.tail(args.limit) if args.limit else h).iterrows():
        when = datetime.fromtimestamp(int(r["timestamp"]), UTC).strftime("%Y-%m-%d")
        rating = "" if r["rating"] != r["rating"] else f"{r['rating']:g}"
        liked = "like" if r["label"] else "dislike"
        item = ds.items.iloc[ds.item_index[r["item_id"]]]
        title = str(item["title"])
        details = "; ".join(f"{f}: {_short(item[f])}" for f in fields
                            if isinstance(item[f], str) and item[f].strip() and item[f].strip() not in title)
        print(f"{when}  {rating:>6}  {liked:<7}  {r['split']:<5}  {title}" + (f"  ({details})" if details else ""))
    return 0


def _short(v: str, n: int = 40) -> str:
    v = " ".join(v.split())
    return v if len(v) <= n else v[: n - 3] + "..."
