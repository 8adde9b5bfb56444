"""Benchmark: time and peak memory to prepare each dataset (one fresh process per dataset).

python eval/data_prepare.py [--datasets ml-100k ml-1m lastfm amazon-gift-cards]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from llmrec.bench_utils import md_table, write_result

CHILD = """
import json, time
from llmrec.bench_utils import peak_rss_mb
from llmrec.data import prepare
t = time.perf_counter()
r = prepare({name!r})
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "stats": r.stats}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m", "lastfm", "amazon-gift-cards"])
    args = ap.parse_args()
    rows, results = [], {}
    for name in args.datasets:
        out = subprocess.run(
            [sys.executable, "-c", CHILD.format(name=name)], capture_output=True, text=True, check=True
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results[name] = res
        st = res["stats"]
        rows.append(
            {
                "dataset": name,
                "users": st["users"],
                "items": st["items"],
                "interactions": st["interactions"],
                "seconds": round(res["seconds"], 2),
                "peak_rss_mb": round(res["peak_rss_mb"], 1),
            }
        )
        print(rows[-1], flush=True)
    table = md_table(rows, ["dataset", "users", "items", "interactions", "seconds", "peak_rss_mb"])
    write_result(
        "data_prepare",
        {"dataset": ",".join(args.datasets), "goal": "ml-1m under 60 s on 2 cores", "results": results},
        table,
    )  # the command recorded is this one, arguments included (`command_line()`)


if __name__ == "__main__":
    main()
