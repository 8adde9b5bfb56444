"""How many training candidates are items the user rates later? -> eval/results/later_items_<dataset>.{json,md}

    python eval/later_items.py [--dataset ml-100k]

A training example of the rank task lists the target among other candidates; a next_title example with
`data.negatives` scores the true title against others. An "other" item the user rates *later* in the training split
is a true next item of a later position (ML-100K users rate in bursts), labelled wrong. For the rank recipe's
training examples (popularity-sampled, and retrieved by BERT+LSTM) and the listwise next-title recipe's, this counts
them with `data.exclude_later=false` (as the rank runs recorded before 2026-12-07 were built) and with the default
`true` (`llmrec.finetune.data.later_item_share`). No model is loaded; the retriever is the fitted BERT+LSTM checkpoint.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llmrec.bench_utils import command_line, md_table, write_result
from llmrec.data import load_prepared
from llmrec.finetune import load_recipe
from llmrec.finetune.data import build_examples, later_item_share
from llmrec.llm.loading import load_tokenizer

RECIPES = Path(__file__).resolve().parent.parent / "finetune" / "recipes"
SETUPS = {  # name -> (recipe, overrides)
    "rank recipe, popularity-sampled": ("rank_smollm2_qlora.yaml", []),
    "rank recipe, retrieved (BERT+LSTM top 20)": ("rank_smollm2_qlora.yaml",
                                                  ["data.candidates=retrieval", "data.retriever=bert_lstm"]),
    "next_title listwise recipe, negatives (4 of BERT+LSTM's top 20)": ("next_title_listwise_smollm2_qlora.yaml", []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ds = load_prepared(args.dataset, prepare_if_missing=True)
    tok = load_tokenizer(None)
    rows = []
    for name, (recipe, over) in SETUPS.items():
        for exclude in (False, True):
            cfg = load_recipe(RECIPES / recipe, [f"dataset={args.dataset}", *over, "data.n_valid=0", "data.n_test=0",
                                                 f"data.exclude_later={str(exclude).lower()}"])
            ex = build_examples(ds, cfg.task, cfg.data, tok)["train"]
            r = later_item_share(ds, ex)
            rows.append({"training candidates": name, "exclude_later": exclude, "examples": len(ex),
                         "other candidates": r["candidates"], "later items": round(r["share"], 4),
                         "examples with any": round(r["examples_with_any"], 4)})
            logging.info("%s", rows[-1])
    cols = ["training candidates", "exclude_later", "examples", "other candidates", "later items", "examples with any"]
    md = md_table(rows, cols) + (
        "\nlater items: the share of the examples' other candidates that the user rates later in the training split "
        "(true next items of later positions); examples with any: the share of examples holding at least one. "
        "exclude_later=false is how the rank runs recorded before 2026-12-07 were built.\n")
    write_result(f"later_items_{args.dataset}", {"dataset": args.dataset, "rows": rows}, md,
                 command=command_line())


if __name__ == "__main__":
    main()
