"""Training-step time with the answer window handed to transformers as an index tensor (what
`llmrec.finetune.data.answer_only_loss` does) against an int (`logits_to_keep=keep`: transformers slices the hidden
states). Same logits either way (tests/test_finetune_core.py); on the CPU the LM head's matmul over the slice is the
slow part of a training step. The Yes/No recipe's model and settings (QLoRA, and bf16 LoRA with `--set
quant.load_in_4bit=false`), one process, the two ways alternating step by step on the same batches, AdamW steps
included; the first round is a warm-up.

    .venv/bin/python eval/loss_positions.py                      # -> eval/results/loss_positions.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmrec.bench_utils import md_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "finetune" / "recipes" / "yesno_smollm2_qlora.yaml"
WAYS = ("int", "index")


def time_steps(overrides: list[str], rounds: int) -> dict[str, Any]:
    import torch

    from llmrec.data import load_prepared
    from llmrec.finetune import load_recipe
    from llmrec.finetune.data import AnswerOnlyCollator, answer_only_loss, build_examples, encode_example
    from llmrec.finetune.trainer import use_bf16_autocast
    from llmrec.llm.loading import apply_lora, load_causal_lm, load_tokenizer

    cfg = load_recipe(RECIPE, [f"data.n_train={4 * rounds}", "data.n_valid=0", "data.n_test=0", *overrides])
    tc = cfg.train
    torch.manual_seed(tc.seed)
    tok = load_tokenizer(cfg.model)
    examples = build_examples(load_prepared(cfg.dataset), cfg.task, cfg.data, tok)["train"]
    feats = [encode_example(e, tok, cfg.data.max_len, cfg.data.append_eos) for e in examples]
    model, tok = load_causal_lm(cfg.model, dtype=cfg.dtype, quant=cfg.quant, tokenizer=tok)
    model = apply_lora(model, cfg.lora, gradient_checkpointing=tc.gradient_checkpointing, quant=cfg.quant)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr)
    collate = AnswerOnlyCollator(tok.pad_token_id)
    autocast = use_bf16_autocast(cfg)
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    bs = tc.batch_size
    for r in range(rounds):
        batch = collate(feats[(r * bs) % len(feats):(r * bs) % len(feats) + bs])
        for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = answer_only_loss(model, batch, positions_as=way)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if r:  # round 0: warm-up
                times[way].append(time.perf_counter() - t0)
    out: dict[str, Any] = {"overrides": " ".join(overrides) or "(the recipe)", "batch_size": bs,
                           "load_in_4bit": cfg.quant.load_in_4bit, "steps_per_way": rounds - 1,
                           "tokens_mean": round(statistics.mean(len(f["input_ids"]) for f in feats), 1)}
    for way in WAYS:
        out[f"s_per_step_{way}"] = round(statistics.mean(times[way]), 3)
        out[f"sd_{way}"] = round(statistics.stdev(times[way]), 3)
    out["x_faster_index"] = round(out["s_per_step_int"] / out["s_per_step_index"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9, help="batches; each is stepped once per way (first: warm-up)")
    p.add_argument("--configs", nargs="+", default=["", "quant.load_in_4bit=false"],
                   help="recipe overrides per configuration, space-separated within one ('' = the recipe)")
    a = p.parse_args()
    rows = [time_steps(c.split(), a.rounds) for c in a.configs]
    for r in rows:
        print(r)
    cols = ["overrides", "load_in_4bit", "batch_size", "tokens_mean", "steps_per_way", "s_per_step_int", "sd_int",
            "s_per_step_index", "sd_index", "x_faster_index"]
    table = (f"`{RECIPE.relative_to(ROOT)}` settings (+ the overrides), the configurations one after the other in "
             "one process, training steps (forward, backward, AdamW) with `answer_only_loss(positions_as=...)` "
             "alternating on the same batches; s_per_step = mean over the steps after a warm-up round, sd its "
             "standard deviation.\n\n"
             + md_table(rows, cols) + "\n")
    print(write_result("loss_positions", {"dataset": "ml-100k", "rows": rows}, table))
    print(table)


if __name__ == "__main__":
    main()
