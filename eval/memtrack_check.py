"""How close `llmrec.memtrack.TensorMemory` (live tensor bytes, the CPU's counterpart of
torch.cuda.max_memory_allocated) comes to what the process really holds. Each case runs in its own process with
every allocation of 64 KiB or more mapped on its own (`MALLOC_MMAP_THRESHOLD_=65536`: freed blocks leave RSS at once,
so RSS follows what is live), runs once to warm up (the first call also pays one-time initialisation), then measures
one call: the tensors' peak above the start against the rise of the process's peak RSS (Linux VmHWM, reset first).

    .venv/bin/python eval/memtrack_check.py     # -> eval/results/memtrack_check.{json,md}

Cases: a training forward (bf16 LoRA as the Yes/No recipe sets it, bf16 autocast, batch 4 x 260 tokens) of the embedded
SmolLM2-135M's decoder with and without gradient checkpointing; the same through the LM head for the last 3 positions,
given as an int (transformers slices the hidden states) and as an index tensor (it gathers a contiguous copy: what
`llmrec.finetune.data.answer_only_loss` passes); and the LM head's matmul alone (49,152 x 576, bf16, 12 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmrec.bench_utils import md_table, write_result  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "finetune" / "recipes" / "yesno_smollm2_qlora.yaml"  # its LoRA
CASES = {  # name -> (gradient checkpointing, what runs)
    "decoder forward": (False, "decoder"),
    "decoder forward, gradient checkpointing": (True, "decoder"),
    "forward with LM head, gradient checkpointing, logits_to_keep=3": (True, "full"),
    "the same, logits_to_keep=arange(seq-3, seq) (as answer_only_loss)": (True, "full_index"),
    "LM head matmul alone (12 rows)": (False, "head"),
}


def child(case: str) -> dict[str, Any]:
    import torch

    from llmrec.bench_utils import memory_status_mb, reset_peak_rss, trim_heap
    from llmrec.finetune import load_recipe
    from llmrec.llm.loading import QuantSettings, apply_lora, load_causal_lm
    from llmrec.memtrack import TensorMemory, tensor_storages

    gc_on, what = CASES[case]
    torch.manual_seed(0)
    quant = QuantSettings(load_in_4bit=False)
    model, _ = load_causal_lm(None, dtype="bfloat16", quant=quant)
    for p in model.parameters():  # off the checkpoint's mapping: weight pages touched later are not counted
        p.data = p.data.clone()
    if what == "head":
        w, h = model.get_output_embeddings().weight.detach(), torch.randn(12, model.config.hidden_size,
                                                                          dtype=torch.bfloat16)

        def call() -> Any:
            return torch.nn.functional.linear(h, w)

        held = tensor_storages(model, h)
    else:
        model = apply_lora(model, load_recipe(RECIPE).lora, gradient_checkpointing=gc_on, quant=quant)
        model.train()
        x = torch.randint(0, 1000, (4, 260))
        decoder = model.get_base_model().model

        def call() -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if what == "decoder":
                    return decoder(input_ids=x).last_hidden_state
                if what == "full":
                    return model(input_ids=x, logits_to_keep=3).logits
                return model(input_ids=x, logits_to_keep=torch.arange(x.shape[1] - 3, x.shape[1])).logits

        held = tensor_storages(model, x)
    call()  # warm-up
    trim_heap()
    reset_peak_rss()
    s0 = memory_status_mb()
    with TensorMemory(held) as tm:
        out = call()
    s1 = memory_status_mb()
    del out
    return {"case": case, "tensors_peak_above_start_mb": round((tm.peak_bytes - tm.base_bytes) / 2**20, 1),
            "rss_peak_above_start_mb": round(s1["VmHWM"] - s0["VmRSS"], 1),
            "rss_file_change_mb": round(s1["RssFile"] - s0["RssFile"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", case], env=env, check=True, capture_output=True,
                             text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    for r in rows:
        r["not_seen_mb"] = round(r["rss_peak_above_start_mb"] - r["tensors_peak_above_start_mb"], 1)
    cols = ["case", "tensors_peak_above_start_mb", "rss_peak_above_start_mb", "not_seen_mb", "rss_file_change_mb"]
    table = ("Embedded SmolLM2-135M-Instruct, bf16; one process per case, `MALLOC_MMAP_THRESHOLD_=65536`, one warm-up "
             "call, then the measured call: tensors = `llmrec.memtrack.TensorMemory` peak above the start, RSS = rise "
             "of the peak RSS (VmHWM reset before the call) above the RSS at its start; not_seen = the difference "
             "(memory allocated inside ops).\n\n" + md_table(rows, cols) + "\n")
    print(write_result("memtrack_check", {"dataset": None, "rows": rows}, table))
    print(table)


if __name__ == "__main__":
    main()
