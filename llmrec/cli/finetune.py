"""`llmrec finetune --config RECIPE [key=value ...]`, `llmrec export --adapter DIR --merge --out DIR` and
`llmrec export --quantize-4bit [--model DIR] --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="LoRA / QLoRA fine-tuning from a recipe (finetune/recipes/*.yaml)")
    add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)
    e = sub.add_parser("export", help="merge a LoRA adapter into its base model for serving without LoRA, or "
                                      "save a model quantized to 4-bit once")
    e.add_argument("--adapter", help="adapter folder (a finetune output's adapter/); with --merge")
    e.add_argument("--model", default=None, help="base model folder (default: the adapter's base_model_name_or_path; "
                                                 "--quantize-4bit: the embedded SmolLM2-135M-Instruct)")
    e.add_argument("--merge", action="store_true", help="write the adapter merged into a full model")
    e.add_argument("--quantize-4bit", action="store_true",
                   help="write the model with its linear layers stored 4-bit (bitsandbytes); recipes and "
                        "--load-in-4bit then load it without reading and quantizing the full-precision weights")
    e.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"], help="with --quantize-4bit")
    e.add_argument("--no-double-quant", action="store_true", help="with --quantize-4bit: no double quantization")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the written weights (with --quantize-4bit: of those left unquantized; default "
                        "%(default)s)")
    e.set_defaults(func=cmd_export)


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe YAML (FinetuneConfig keys)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override keys, e.g. train.lr=1e-4 (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides (same as --set)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: score the finished run in the recipe's output_dir again with the current "
                        "evaluation (e.g. --config <run>/recipe.yaml) and update its metrics.json")


def cmd_finetune(args: argparse.Namespace) -> int:
    import yaml

    from llmrec.config import to_dict
    from llmrec.finetune import load_recipe, run_finetune
    from llmrec.finetune.trainer import is_main_process, rescore_run

    cfg = load_recipe(args.config, list(args.set or []) + list(args.overrides or []))
    if args.dry_run:
        from llmrec.data.prepare import check_dataset
        from llmrec.finetune.trainer import output_dir_for

        check_dataset(cfg.dataset)  # a run would refuse it: so does the dry run
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False) + f"# output: {output_dir_for(cfg)}")
        return 0
    m = rescore_run(cfg) if args.eval_only else run_finetune(cfg)
    if not is_main_process():  # under torchrun / accelerate launch only rank 0 reports
        return 0
    rows = [("task", m["task"]), ("output", m.get("output_dir")), ("steps", m["train"]["steps"]),
            ("train loss", f"{m['train']['train_loss']:.4f}"), ("examples/s", m["train"]["examples_per_s"]),
            ("peak RSS MB", m["train"]["peak_rss_mb"]), ("wall s", m["wall_s"])]
    for key in ("test_before", "test_after", "valid_after"):
        if key in m:
            rows.append((key, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m[key].items()})))
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{k.ljust(w)}  {v}" for k, v in rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmrec.cli.args import UsageError

    if args.merge == args.quantize_4bit:
        raise UsageError("give exactly one of --merge (with --adapter) or --quantize-4bit (the adapter folder itself "
                         "is already loadable by PEFT and by vLLM's LoRA loader)")
    if args.merge and not args.adapter:
        raise UsageError("--merge needs --adapter")
    from llmrec.llm.loading import QuantSettings, merge_and_save, save_quantized

    if args.quantize_4bit:
        if args.adapter:
            raise UsageError("--quantize-4bit quantizes a base model (--model); --adapter goes with --merge")
        q = QuantSettings(load_in_4bit=True, quant_type=args.quant_type, double_quant=not args.no_double_quant,
                          compute_dtype=args.dtype)
        out = save_quantized(args.model, args.out, quant=q, dtype=args.dtype)
        print(f"4-bit model written to {out} (load it with quant.load_in_4bit=true / --load-in-4bit)")
        return 0
    model = args.model
    if model is None:
        cfg_path = Path(args.adapter) / "adapter_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--adapter {args.adapter}: no adapter_config.json (not a PEFT adapter folder)")
        model = json.loads(cfg_path.read_text()).get("base_model_name_or_path") or None
    out = merge_and_save(model, args.adapter, args.out, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0


def main_finetune(argv: list[str] | None = None) -> int:
    """Entry point of finetune/train.py: `llmrec finetune` itself (same arguments, same one-line errors)."""
    import sys

    from llmrec.cli import main

    return main(["finetune", *(sys.argv[1:] if argv is None else argv)])
