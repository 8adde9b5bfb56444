"""`llmrec data prepare|show`."""

from __future__ import annotations

import argparse

from llmrec.cli.args import count


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare datasets and inspect them")
    p.set_defaults(func=lambda _args: _usage(p))  # `llmrec data` alone: this group's help, not the top level's
    s = p.add_subparsers(dest="data_command", metavar="ACTION")
    pp = s.add_parser(
        "prepare", help="load, clean, split and save a dataset; print its statistics",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="PrepareConfig keys (--set KEY=VALUE, or in the --config file) and their defaults:\n" + PREPARE_KEYS)
    pp.add_argument("--dataset", required=True,
                    help="ml-100k | ml-1m | lastfm | amazon-gift-cards | a RecBole atomic folder | an interaction "
                         "file (.csv, .tsv, .txt, .parquet: user_id,item_id,timestamp[,rating])")
    pp.add_argument("--items", help="item metadata file (item_id,title[,attributes...]) for a CSV/TSV/Parquet "
                                    "interaction file")
    pp.add_argument("--config", help="YAML file with PrepareConfig keys (below)")
    pp.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="override PrepareConfig keys (below), e.g. --set name=books domain=book like_threshold=3")
    pp.set_defaults(func=cmd_prepare)
    ps = s.add_parser("show", help="print a user's history with titles")
    ps.add_argument("--dataset", required=True)
    ps.add_argument("--user", "--user-id", dest="user", required=True)
    ps.add_argument("--limit", type=count, default=50, help="most recent events shown (0 = all)")
    ps.set_defaults(func=cmd_show)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# PrepareConfig's keys and defaults as `--help` lists them: written out, since importing llmrec.data (pandas) here
# would slow every `llmrec` command; tests/test_data_audit3.py holds this list to the dataclass
PREPARE_KEYS = """\
  kcore=0                 keep users and items with >= kcore events (0 = off)
  min_user_events=3       drop users with fewer events (they have no leave-one-out target)
  label_rule=auto         auto | rating_threshold | implicit | weight_above_user_median
  like_threshold=3.0      rating_threshold: like = rating > like_threshold
  history_len=10          Yes/No examples: the preceding <= history_len events
  min_history=1           Yes/No examples need at least this many earlier events
  valid_frac=0.1          share of events (by time) after the validation cut-off
  test_frac=0.1           ... and after the test cut-off
  neg_per_pos=1           implicit: sampled No examples per observed event
  n_sampled_negatives=99  fixed negatives per user, for *sampled* metrics only
  seed=42
  items_file=             item file (same as --items)
  name=                   the prepared folder $LLMREC_HOME/data/<name> (default: the dataset's name)
  domain=                 the noun prompts use for an item (book, song; default: the loader's, or item)"""

DESCRIPTION = """\
Load, clean, split (by time) and save a dataset under $LLMREC_HOME/data/<name>/, then
print its statistics. A bad row is refused with its file, line and field, and nothing
is written: a previously prepared folder of that name stays as it was."""


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
    from llmrec.data.prepare import format_day

    ds = load_prepared(args.dataset)
    h = ds.history(args.user, before="all")
    from llmrec.prompts.text import plural

    print(f"user {args.user}: {len(h)} events in {ds.name} ({plural(ds.domain)}); split = leave-one-out role")
    fields = [f for f in ds.items.columns if f not in ("item_id", "title")]  # what prompts show after a title
    for _, r in (h.tail(args.limit) if args.limit else h).iterrows():
        when = format_day(int(r["timestamp"]))
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
