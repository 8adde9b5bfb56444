"""`llmrec retrieve` (top-K candidates for a user) and `llmrec prompt` (a rendered prompt and its token count)."""

from __future__ import annotations

import argparse

from llmrec.cli.args import UsageError, int_at_least, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="top-K unseen items for a user from the text / hybrid retriever")
    p.add_argument("--dataset", required=True, help="prepared dataset name or folder (llmrec data prepare)")
    who = p.add_mutually_exclusive_group()  # one of them is required: cmd_retrieve says so (a parse alone passes)
    who.add_argument("--user", "--user-id", dest="user", help="user id (history from the prepared dataset)")
    who.add_argument("--profile", help="free-text profile instead of a user history (--mode text)")
    p.add_argument("--k", type=positive_int, default=20, help="candidates to list (default %(default)s)")
    p.add_argument("--mode", choices=["text", "hybrid", "cf"], default=None,
                   help="text, hybrid (text + item-CF: what `llmrec recommend` and the service put in the prompt) "
                        "or cf (item-CF alone); default: hybrid for --user, text for --profile")
    p.add_argument("--split", choices=["all", "test", "valid"], default="all",
                   help="history allowed: all events, or those before the user's test/valid target")
    p.add_argument("--model", help="sentence-transformers folder (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--index", choices=["flat", "ivf"], default="flat",
                   help="faiss index of the item texts: flat (exact, the default) or ivf (approximate)")
    p.set_defaults(func=cmd_retrieve)

    q = sub.add_parser("prompt", help="render a prompt template for a user and print it with its token count")
    q.add_argument("--template", required=True, help="template name (prompts/<name>.yaml) or a YAML path")
    q.add_argument("--dataset", required=True, help="prepared dataset name or folder (llmrec data prepare)")
    q.add_argument("--user", "--user-id", dest="user", required=True, help="user id whose history is rendered")
    q.add_argument("--split", choices=["all", "test", "valid"], default="test",
                   help="history before the user's test/valid target (which is the yes/no target; candidates leave "
                        "out the seen ids, as evaluation does), or all events (candidates as `llmrec recommend` gives "
                        "them: no seen item, nor one listed under a seen item's title)")
    q.add_argument("--item", help="target item id for yesno (default: the user's target of --split)")
    q.add_argument("--k", type=positive_int, default=20, help="number of candidates (rank/next_title)")
    q.add_argument("--no-candidates", action="store_true", help="next_title without a candidate list")
    q.add_argument("--history", type=int_at_least(0), default=20,
                   help="most recent history items offered to the template")
    q.add_argument("--max-tokens", type=positive_int, default=None, help="token budget (oldest history dropped first)")
    q.add_argument("--chat", action="store_true", help="chat-template form")
    q.add_argument("--tokenizer", default="default",
                   help="'default' (the embedded SmolLM2 tokenizer), 'whitespace', or a tokenizer folder")
    q.set_defaults(func=cmd_prompt)


def _history_rows(ds, user: str, split: str):
    return ds.history(user, before=split)


def cmd_retrieve(args: argparse.Namespace) -> int:
    from llmrec.data import load_prepared
    from llmrec.retrieval import HybridRetriever, ItemCF, TextRetriever

    if args.user is None and args.profile is None:
        raise UsageError("give --user (a user's history) or --profile (a free-text profile)")
    args.mode = args.mode or ("text" if args.profile is not None else "hybrid")
    if args.profile is not None and args.mode != "text":  # before the dataset is read and the text index built
        raise UsageError(f"--profile works with --mode text only (got --mode {args.mode}): item-CF needs a history")
    ds = load_prepared(args.dataset)
    if args.user and not ds.has_user(args.user):
        raise KeyError(f"unknown user {args.user!r} in dataset {ds.name}")
    text = None
    if args.mode != "cf":
        text = TextRetriever(args.model, index=args.index).build(ds, progress=False)
    if args.profile is not None:
        res = text.query_text(args.profile, k=args.k)
        print(f"== {ds.name}: top {args.k} for the profile {args.profile!r}")
    else:
        h = _history_rows(ds, args.user, args.split)
        hist = [(str(i), bool(lab), int(t)) for i, lab, t in zip(h["item_id"], h["label"], h["timestamp"])]
        if args.mode == "text":
            ret = text
        elif args.mode == "cf":
            ret = ItemCF().fit(ds)
        else:
            ret = HybridRetriever.default(ds, text)
        from llmrec.data import title_twins, with_title_twins

        # as Recommender.candidates: the seen items and their title twins (the same title under another id) left out
        seen = with_title_twins([i for i, _, _ in hist], title_twins(list(ds.item_ids), list(ds.titles)))
        res = ret.query(hist, k=args.k, exclude=seen)
        print(f"== {ds.name}: top {args.k} unseen {ds.domain} items for user {args.user} "
              f"({args.mode}, {len(hist)} history events, split={args.split})")
    w = max([len(str(i)) for i, _ in res] + [4])
    for n, (iid, score) in enumerate(res, 1):
        print(f"{n:>3}  {str(iid).ljust(w)}  {score:8.4f}  {ds.titles[ds.item_index[iid]]}")
    return 0


def _tokenizer(spec: str):
    if spec == "whitespace":
        from llmrec.prompts import WhitespaceTokenizer

        return WhitespaceTokenizer()
    from pathlib import Path

    from transformers import AutoTokenizer

    from llmrec.llm import BackendError

    if spec == "default":
        from llmrec.llm import default_model_path

        spec = str(default_model_path())
    path = Path(spec).expanduser()
    if not path.is_dir():  # never a hub name: nothing is downloaded
        raise BackendError(f"--tokenizer {spec!r}: not 'default', 'whitespace' or an existing local tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise BackendError(f"--tokenizer {spec!r}: cannot load a tokenizer from that folder: {e}") from None


def cmd_prompt(args: argparse.Namespace) -> int:
    from llmrec.data import load_prepared
    from llmrec.prompts import history_from_dataset, items_from_dataset, load_template, render
    from llmrec.retrieval import candidates_for

    ds = load_prepared(args.dataset)
    if not ds.has_user(args.user):
        raise KeyError(f"unknown user {args.user!r} in dataset {ds.name}")
    t = load_template(args.template)
    h = _history_rows(ds, args.user, args.split).tail(args.history)
    hist = history_from_dataset(ds, h["item_id"].tolist(), h["label"].tolist(), h["rating"].tolist(),
                                h["timestamp"].tolist())
    tgt_rows = ds.targets(args.split).query("user_id == @args.user") if args.split != "all" else None
    kw: dict = {}
    if t.task == "yesno":
        item = args.item or (str(tgt_rows["item_id"].iloc[0]) if tgt_rows is not None and len(tgt_rows) else None)
        if item is None:
            raise UsageError("the yesno template needs --item (or --split test/valid for the user's target)")
        kw["target"] = items_from_dataset(ds, [item])[0]
    elif t.task in ("rank", "next_title", "explain"):
        from llmrec.ranking.factory import DEFAULT_RETRIEVER, build_retriever

        retriever = build_retriever(ds, DEFAULT_RETRIEVER)  # the candidates `llmrec recommend` and the service place
        split = args.split if args.split != "all" else None
        if split is None:  # as Recommender.candidates: the whole history queried, seen items and their title twins
            from llmrec.data import title_twins, with_title_twins

            full = ds.history(args.user, before="all")
            seen = with_title_twins(full["item_id"].astype(str), title_twins(list(ds.item_ids), list(ds.titles)))
            hq = [(str(i), bool(lab), int(t)) for i, lab, t in zip(full["item_id"], full["label"], full["timestamp"])]
            cands = [i for i, _ in retriever.query(hq, k=args.k, exclude=seen)]
        else:
            cands = [i for i, _ in candidates_for(ds, args.user, split, args.k, retriever)]
        if t.task == "explain":
            kw["recommended"] = items_from_dataset(ds, cands[:3])
        elif not (t.task == "next_title" and args.no_candidates):
            kw["candidates"] = items_from_dataset(ds, cands)
    tok = _tokenizer(args.tokenizer)
    r = render(t, history=hist, domain=ds.domain, tokenizer=tok, max_tokens=args.max_tokens, chat=args.chat, **kw)
    print(r.text)
    print(f"\n== template {t.name} v{t.version}: {r.n_tokens} tokens ({args.tokenizer} tokenizer), "
          f"{r.n_history} history items kept, {r.n_dropped} dropped, choices {r.choices}")
    return 0
