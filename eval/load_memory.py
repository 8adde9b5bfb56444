"""Resident memory of a model loaded for inference: bf16, 4-bit nf4 (the checkpoint read with pread, the default),
4-bit read through a mapping of the file (`4bit_mmap_read`), and that with the mapping kept (`4bit_keep_mapping`:
what transformers leaves behind without `llmrec.llm.loading.release_checkpoint_mmap`). Each configuration runs in
its own process: load, score one short Yes/No prompt (a forward touches every weight page the model reads), hand
freed heap back, then read Linux /proc/self/status: VmRSS = RssAnon (heap, tensors) + RssFile (mapped files: the
checkpoint if still mapped, shared libraries), and VmHWM (the peak, loading included).

    .venv/bin/python eval/load_memory.py                       # the embedded SmolLM2-135M-Instruct
    .venv/bin/python eval/load_memory.py --model artifacts/models/llama-1.1b-shaped --label _1.1b

`--adapters N` adds two configurations in the service's default dtype (`fast`): the base plus N LoRA adapters
(random, r=8 on every linear layer, made once in a temporary folder) loaded as one model per adapter
(`adapters_separate`, what the transformers service did before) and into one shared model (`adapters_shared`,
`TransformersBackend.add_adapter`), each view scoring once. `4bit_prequantized` loads a copy saved already
quantized (`llmrec export --quantize-4bit`, made first in a temporary folder; its export time is not counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmrec.bench_utils import md_table, memory_status_mb, write_result  # noqa: E402
from llmrec.llm.loading import resolve_dtype  # noqa: E402

log = logging.getLogger("eval.load_memory")
KINDS = {  # name -> (load_in_4bit, release the checkpoint mapping, read the checkpoint with pread)
    "bf16": (False, True, True),
    "4bit": (True, True, True),
    "4bit_mmap_read": (True, True, False),
    "4bit_keep_mapping": (True, False, False),
    "4bit_prequantized": (True, True, True),  # from `llmrec export --quantize-4bit` (made first, in a temp folder)
}
ADAPTER_KINDS = ("adapters_separate", "adapters_shared")
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
PROMPT = "Does the user like the movie? Answer:"


def make_adapters(model: str | None, out: Path, n: int) -> None:
    """n random LoRA adapters (r=8, every linear layer, non-zero B) under out/a0, out/a1, ..."""
    from llmrec.bench_utils import random_lora_adapter

    for i in range(n):
        random_lora_adapter(model, out / f"a{i}", seed=i)


def child_adapters(kind: str, model: str | None, adapter_dir: Path) -> dict[str, Any]:
    from llmrec.bench_utils import trim_heap
    from llmrec.llm import load_backend

    paths = sorted(p for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
    t0 = time.perf_counter()
    base = load_backend("transformers", model=model, dtype="fast")
    if kind == "adapters_shared":
        views = [base] + [base.add_adapter(p.name, p) for p in paths]
    else:
        views = [base] + [load_backend("transformers", model=model, adapter=p, dtype="fast") for p in paths]
    load_s = time.perf_counter() - t0
    ok = all(math.isfinite(float(v.score_choices([PROMPT], [" Yes", " No"])[0][0])) for v in views)
    trim_heap()
    return {"kind": kind, "load_s": round(load_s, 1), "score_finite": ok, "adapters": len(paths),
            **memory_status_mb(FIELDS)}


def child(kind: str, model: str | None) -> dict[str, Any]:
    """Runs in its own process: load `kind`, one forward, trim, measure."""
    from llmrec.bench_utils import trim_heap
    from llmrec.llm.loading import QuantSettings, load_causal_lm
    from llmrec.llm.transformers_backend import TransformersBackend

    q4, release, pread = KINDS[kind]
    t0 = time.perf_counter()
    m, tok = load_causal_lm(model, dtype="bfloat16", release_mmap=release, pread_4bit=pread,
                            quant=QuantSettings(load_in_4bit=q4, compute_dtype="bfloat16"))
    load_s = time.perf_counter() - t0
    guard = getattr(m, "_llmrec_guard", None)
    if guard is not None:
        guard.remove()
    be = TransformersBackend.from_model(m, tok)
    ok = math.isfinite(float(be.score_choices([PROMPT], [" Yes", " No"])[0][0]))
    trim_heap()
    return {"kind": kind, "load_s": round(load_s, 1), "score_finite": ok, **memory_status_mb(FIELDS)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model-note", default="")
    p.add_argument("--label", default="", help="suffix of the result name, e.g. _1.1b")
    p.add_argument("--only", nargs="+", choices=list(KINDS), default=None)
    p.add_argument("--adapters", type=int, default=0, help="also measure N adapters: one model each vs shared")
    p.add_argument("--child", choices=[*KINDS, *ADAPTER_KINDS, "make_adapters"], help=argparse.SUPPRESS)
    p.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child == "make_adapters":
        make_adapters(a.model, Path(a.adapter_dir), a.adapters)
        return
    if a.child in ADAPTER_KINDS:
        print(json.dumps(child_adapters(a.child, a.model, Path(a.adapter_dir))))
        return
    if a.child:
        print(json.dumps(child(a.child, a.model)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path("/proc/self/status").is_file():
        raise SystemExit("eval/load_memory.py reads Linux /proc/self/status; not available here")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmrec-adapters-") as adapter_dir:
        jobs = [(k, []) for k in (a.only or list(KINDS))]
        if a.adapters > 0:
            jobs = [("make_adapters", ["--adapters", str(a.adapters)])] + jobs
            jobs += [(k, []) for k in ADAPTER_KINDS]
        for kind, extra in jobs:
            cmd = [sys.executable, __file__, "--child", kind, "--adapter-dir", adapter_dir, *extra]
            if kind == "4bit_prequantized":
                q4 = Path(adapter_dir) / "q4"
                export = [sys.executable, "-m", "llmrec.cli", "export", "--quantize-4bit", "--out", str(q4)]
                export += ["--model", a.model] if a.model else []
                log.info("export: %s", " ".join(export))
                r = subprocess.run(export, capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"export failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
                cmd += ["--model", str(q4)]
            else:
                cmd += ["--model", a.model] if a.model else []
            log.info("%s: %s", kind, " ".join(cmd))
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{kind} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
            if kind != "make_adapters":
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                log.info("%s", rows[-1])
    by = {r["kind"]: r for r in rows}
    ratios = {}
    if "bf16" in by:
        for k in ("4bit", "4bit_mmap_read", "4bit_keep_mapping", "4bit_prequantized"):
            if k in by:
                ratios[f"rss_{k}_over_bf16"] = round(by[k]["VmRSS"] / by["bf16"]["VmRSS"], 3)
                ratios[f"peak_{k}_over_bf16"] = round(by[k]["VmHWM"] / by["bf16"]["VmHWM"], 3)
    if "4bit_mmap_read" in by and "4bit_keep_mapping" in by:
        ratios["rss_saved_by_release_mb"] = round(by["4bit_keep_mapping"]["VmRSS"] - by["4bit_mmap_read"]["VmRSS"],
                                                  1)
    if "4bit" in by and "4bit_mmap_read" in by:
        ratios["peak_saved_by_pread_mb"] = round(by["4bit_mmap_read"]["VmHWM"] - by["4bit"]["VmHWM"], 1)
    if all(k in by for k in ADAPTER_KINDS):
        ratios["rss_adapters_shared_over_separate"] = round(
            by["adapters_shared"]["VmRSS"] / by["adapters_separate"]["VmRSS"], 3)
    model = a.model or "the embedded SmolLM2-135M-Instruct"
    table = (f"Model: {model}{' (' + a.model_note + ')' if a.model_note else ''}; loaded in bf16 (4-bit: nf4, "
             f"double quantization, bf16 compute), one process each, after one scoring forward and a heap trim. "
             f"MB = MiB. VmRSS = RssAnon + RssFile (+ shared memory); VmHWM = the peak, loading included. "
             f"4bit reads the checkpoint tensor by tensor with pread (`load_causal_lm(pread_4bit=True)`, the "
             f"default); 4bit_mmap_read = the same through transformers' mapping of the file; "
             f"4bit_keep_mapping = the mapped read without `release_checkpoint_mmap` (transformers leaves the "
             f".safetensors file mapped through the views of the weights it did not quantize); 4bit_prequantized = "
             f"loaded from a copy saved 4-bit (`llmrec export --quantize-4bit`)."
             + (f" adapters_separate / adapters_shared: the base + {a.adapters} LoRA adapters in dtype `fast` "
                f"({resolve_dtype('fast')} here), one model per adapter / all in one model."
                if a.adapters > 0 else "") + "\n\n"
             + md_table(rows, ["kind", "load_s", *FIELDS])
             + "\n\n" + ", ".join(f"{k} {v}" for k, v in ratios.items()) + "\n")
    out = write_result(f"load_memory{a.label}", {"model": model, "model_note": a.model_note, "runs": rows,
                                                 **ratios}, table)
    print(out)
    print(table)


if __name__ == "__main__":
    main()
