"""Fine-tuning benchmark -> eval/results/finetune_<task>_<dataset>.{json,md}.

    python finetune/bench.py run  --task yesno [key=value ...]   # the recipe run (zero-shot test, train, test again)
    python finetune/bench.py run  --task yesno --variant lora    # the same recipe on the full-precision base
    python finetune/bench.py rescore --task yesno [--variant X]  # a finished run scored again (current evaluation)
    python finetune/bench.py mem  --task yesno                   # QLoRA vs bf16 LoRA memory, same batch, 2 runs
    python finetune/bench.py mmap --task yesno --steps 8         # train.malloc_mmap_threshold_mb 0 vs 1: speed, RSS
                                                                 # -> eval/results/finetune_memory_<task>_<dataset>
    python finetune/bench.py speed --task yesno --steps 8        # the recipe vs its settings before 2026-12-06
    python finetune/bench.py report --task yesno [--baselines mf,bert_lstm]
    python finetune/bench.py shaped --out artifacts/models/llama-1.1b-shaped      # random-weight 1.1B (memory only)
    python finetune/bench.py mem --task yesno --model artifacts/models/llama-1.1b-shaped --label _1.1b \
        --gradient-checkpointing --batch-size 1 --steps 1 data.history_max=3
    python finetune/bench.py gpu --task yesno --model artifacts/models/llama-1.1b-shaped --label _1.1b --steps 20 \
        --batch-size 8                                                           # on a GPU: see finetune/gpu_check.sh
    python finetune/bench.py shaped --out artifacts/models/llama-3b-shaped --hidden 3072 --intermediate 8192 \
        --layers 28 --heads 24 --kv-heads 8                                      # Llama-3.2-3B's shape
    python finetune/bench.py mem --task yesno --model artifacts/models/llama-3b-shaped --label _3b \
        --gradient-checkpointing --batch-size 1 --steps 1 data.history_max=1 data.max_len=160 \
        --only bf16 qlora_bf16all qlora_bf16all_pre bf16_mmap qlora_bf16all_mmap qlora_bf16all_pre_mmap

Each training run is its own process (`llmrec finetune`), so peak RSS (ru_maxrss) is per configuration. The report
reads `<LLMREC_HOME>/finetune/bench_<task>_<dataset>/metrics.json` and the two memory runs, scores the baselines on
the SAME seeded test subset (Yes/No), and writes the result files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmrec.config import llmrec_home  # noqa: E402


def recipe(task: str) -> Path:
    return ROOT / "finetune" / "recipes" / f"{task}_smollm2_qlora.yaml"


def run_dir(task: str, dataset: str, kind: str = "") -> Path:
    return llmrec_home() / "finetune" / f"bench_{task}_{dataset}{kind}"


def finetune(task: str, out: Path, overrides: list[str], recipe_path: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmrec.cli", "finetune", "--config", str(recipe_path or recipe(task)), *overrides,
           f"output_dir={out}", "train.progress=false"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())


# `run --variant NAME`: the same recipe with these overrides, in its own folder (`<run>_NAME`), reported beside the
# main QLoRA run. The yesno recipe changed on 2026-12-06 (no LoRA dropout, bf16 autocast where the model computes in
# bf16: faster training, `speed` measures it, since dropout draws a mask over every LoRA layer's input and without
# autocast PEFT casts each one to fp32 and back); the variants measured before name the old settings (OLD), so each
# still reruns what it ran. "recipe_1205": that recipe as it was (768 examples). "stats": the `yesno_stats` prompt, the
# recipe's default before 2026-12-05 (the two counts without the combined estimate line of `yesno_estimate`); "lora",
# "qlora_upcast" and "n1536" were measured with that prompt too, so they name it. "lora": LoRA on the full-precision
# base (on a CPU 4-bit saves memory, not time, and the nf4 copy of a 135M model starts from a higher loss); the
# zero-shot pass is skipped (it scores the same full-precision base). "qlora_upcast": QLoRA with PEFT's fp32 upcast of
# the frozen embeddings and norms (the recipes' default before 2026-12-05; where `dtype: fast` is bf16, fp32 norms
# make the residual stream and every saved activation fp32). "retrieval" (rank): training, validation and test
# candidates from the hybrid retriever (the Recommender's default) instead of popularity samples: other test sets, so
# the run keeps its own zero-shot pass. "n1536" (yesno): twice the recipe's 768 training examples, then the most that
# fit the 45-min CPU budget, on yesno_stats; "n1536_estimate": the same on the recipe's own prompt. "fast_n1536",
# "fast_n3072": the current recipe on 2 and 4 times the examples.
STATS = "data.template=yesno_stats"
OLD = ["lora.dropout=0.05", "train.bf16_autocast=false"]
VARIANTS = {"recipe_1205": [*OLD],
            "stats": [*OLD, STATS],
            "lora": [*OLD, "quant.load_in_4bit=false", "eval_before=false", STATS],
            "qlora_upcast": [*OLD, "quant.upcast_frozen_embeddings=true", "quant.upcast_norms=true",
                             "eval_before=false", STATS],
            "retrieval": ["data.candidates=retrieval"],
            "n1536": [*OLD, "data.n_train=1536", "eval_before=false", STATS],
            "n1536_estimate": [*OLD, "data.n_train=1536", "eval_before=false"],
            "lr1e3": [*OLD, "train.lr=0.001", "eval_before=false"],
            "fast_n1536": ["data.n_train=1536", "eval_before=false"],
            "fast_n3072": ["data.n_train=3072", "eval_before=false"],
            # rank with the Yes/No recipe's CPU settings of 2026-12-06 (1.55x examples/s there), twice the examples
            "fast_n768": ["lora.dropout=0.0", "train.bf16_autocast=auto", "data.n_train=768", "eval_before=false"]}
VARIANT_TASK = {"retrieval": "rank", "fast_n768": "rank"}  # the task a variant belongs to (default yesno)
_OLD = "LoRA dropout 0.05, no autocast"
VARIANT_LABELS = {"recipe_1205": f"SmolLM2 + QLoRA, recipe of 2026-12-05 ({_OLD})",
                  "stats": f"SmolLM2 + QLoRA, yesno_stats prompt (no estimate line), {_OLD}",
                  "lora": f"SmolLM2 + LoRA (full-precision base), yesno_stats prompt, {_OLD}",
                  "qlora_upcast": f"SmolLM2 + QLoRA, embeddings and norms upcast to fp32, yesno_stats prompt, {_OLD}",
                  "retrieval": "SmolLM2 + QLoRA, retrieved candidates",
                  "n1536": f"SmolLM2 + QLoRA, 1536 training examples, yesno_stats prompt, {_OLD}",
                  "n1536_estimate": f"SmolLM2 + QLoRA, 1536 training examples, {_OLD}",
                  "lr1e3": f"SmolLM2 + QLoRA, learning rate 1e-3 (recipe: 5e-4), {_OLD}",
                  "fast_n1536": "SmolLM2 + QLoRA, 1536 training examples",
                  "fast_n3072": "SmolLM2 + QLoRA, 3072 training examples",
                  "fast_n768": "SmolLM2 + QLoRA, no LoRA dropout, bf16 autocast, 768 training examples"}


def check_variant(a: argparse.Namespace) -> None:
    own = VARIANT_TASK.get(a.variant, "yesno")
    if a.variant and own != a.task:
        raise SystemExit(f"--variant {a.variant} belongs to --task {own}, not {a.task}")


def cmd_run(a: argparse.Namespace) -> None:
    check_variant(a)
    extra = VARIANTS[a.variant] if a.variant else []
    out = run_dir(a.task, a.dataset, f"_{a.variant}" if a.variant else "")
    finetune(a.task, out, [f"dataset={a.dataset}", *extra, *a.overrides])


def cmd_rescore(a: argparse.Namespace) -> None:
    """Score a finished run (main or `--variant`) again with the current evaluation; training figures kept."""
    check_variant(a)
    out = run_dir(a.task, a.dataset, f"_{a.variant}" if a.variant else "")
    # output_dir named: a run folder renamed since its run still records the old one
    cmd = [sys.executable, "-m", "llmrec.cli", "finetune", "--config", str(out / "recipe.yaml"), "--eval-only",
           f"output_dir={out}", "train.progress=false", *a.overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def short_run(a: argparse.Namespace) -> list[str]:
    """Overrides for a measurement run: `--steps` steps at `--batch-size` on exactly that many examples, no
    evaluation, no checkpoints, fresh (no resume). The command line's overrides go after it."""
    return [f"dataset={a.dataset}", f"data.n_train={a.batch_size * a.steps}", "data.n_valid=0", "data.n_test=0",
            "eval_before=false", "eval_after=false", f"train.max_steps={a.steps}", "train.save_steps=0",
            "train.resume=null", f"train.batch_size={a.batch_size}", "train.grad_accum=1"]


def cmd_mem(a: argparse.Namespace) -> None:
    label = a.label or ""
    common = [*short_run(a), f"train.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
              f"train.tensor_memory={str(a.tensor_memory).lower()}", *a.overrides]
    if a.model:
        common.append(f"model={a.model}")
    # all loaded in bf16 (`dtype`: the checkpoint is read in it before 4-bit quantization, and the non-quantized
    # weights keep it) and computing in bf16, so that only the weight format differs
    # (the upcast flags explicit: each kind measures what its name says, whatever the recipe's default)
    q4 = ["quant.load_in_4bit=true", "dtype=bfloat16", "quant.compute_dtype=bfloat16",
          "quant.upcast_frozen_embeddings=true", "quant.upcast_norms=true"]
    configs = {"qlora": q4,
               "bf16": ["quant.load_in_4bit=false", "dtype=bfloat16"],
               # QLoRA with the frozen embedding / LM head kept in bf16 instead of PEFT's fp32 upcast
               "qlora_bf16emb": [*q4, "quant.upcast_frozen_embeddings=false"],
               # ... and the norms too: the residual stream and the saved activations stay bf16, as in bf16 LoRA
               "qlora_bf16all": [*q4, "quant.upcast_frozen_embeddings=false", "quant.upcast_norms=false"]}
    # the allocator option (glibc: blocks >= 1 MiB mapped and unmapped on their own), on both sides of the ratio
    for kind in ("bf16", "qlora_bf16all"):
        configs[f"{kind}_mmap"] = [*configs[kind], "train.malloc_mmap_threshold_mb=1"]
    configs["qlora_bf16all_pre"] = configs["qlora_bf16all"]  # + the saved 4-bit copy as the model, below
    configs["qlora_bf16all_pre_mmap"] = configs["qlora_bf16all_mmap"]
    for kind in a.only or list(MEM_KINDS):
        # qlora_bf16all_pre*: qlora_bf16all from a copy saved 4-bit (`llmrec export --quantize-4bit`), made once
        extra = [f"model={prequantized_copy(a.model)}"] if kind.startswith("qlora_bf16all_pre") else []
        finetune(a.task, run_dir(a.task, a.dataset, f"_mem{label}_{kind}"), common + configs[kind] + extra)
    mem = memory_summary(a.task, a.dataset, label)
    from llmrec.bench_utils import md_table, write_result

    cols = ["trim_memory", "malloc_mmap_threshold_mb", "weights_mb", "lora_mb", "rss_after_load_mb",
            "rss_after_load_trimmed_mb", "peak_rss_mb",
            "peak_above_start_mb", "rss_at_train_start_mb", "rss_file_at_train_start_mb", "peak_rss_train_mb",
            "examples_per_s"]
    if a.tensor_memory:
        cols[cols.index("examples_per_s"):cols.index("examples_per_s")] = ["tensor_base_mb", "peak_tensor_mb"]
    rows = [{"run": k, **{c: mem[k].get(c) for c in cols}} for k in MEM_KINDS if k in mem]
    model = a.model or "the embedded SmolLM2-135M-Instruct"
    verdict = lambda r: "met" if r is not None and r <= 0.5 else "NOT met"  # noqa: E731
    table = (f"Model: {model}{' (' + a.model_note + ')' if a.model_note else ''}. {a.steps} step(s) at batch "
             f"{a.batch_size}, gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}, loaded in bf16 "
             f"and bf16 compute in all; one process per configuration. peak_rss = ru_maxrss of the whole process "
             f"(loading included); "
             f"peak_rss_train = the peak during trainer.train() alone (Linux VmHWM reset when it starts); "
             f"trim_memory: freed heap returned to the OS after loading and after each step (`train.trim_memory`; "
             f"blank: a run from before that option, i.e. no); malloc_mmap_threshold_mb: "
             f"`train.malloc_mmap_threshold_mb` "
             f"(0 or blank: glibc's default)."
             + (" tensor_base_mb / peak_tensor_mb: the bytes of live tensors when trainer.train() starts (the model, "
                "4-bit quantization state included) and at their peak during it (`train.tensor_memory`, "
                "llmrec.memtrack: the CPU's counterpart of torch.cuda.max_memory_allocated, without the runtime "
                "and allocator overhead that RSS holds; examples_per_s is ~15% lower with it)."
                if a.tensor_memory else "") + "\n\n"
             + md_table(rows, ["run", *cols])
             + "\n")
    labels = {"qlora": "QLoRA (PEFT's fp32 upcast of every non-quantized weight)",
              "qlora_bf16emb": "QLoRA with bf16 frozen embeddings (`quant.upcast_frozen_embeddings=false`)",
              "qlora_bf16all": "QLoRA with bf16 embeddings and norms (`quant.upcast_frozen_embeddings=false "
                               "quant.upcast_norms=false`)",
              "qlora_bf16all_mmap": "The same with `train.malloc_mmap_threshold_mb=1` (bf16 LoRA with it too)",
              "qlora_bf16all_pre": "QLoRA with bf16 embeddings and norms from a copy saved 4-bit (`llmrec export "
                                   "--quantize-4bit`)",
              "qlora_bf16all_pre_mmap": "QLoRA from the copy saved 4-bit with `train.malloc_mmap_threshold_mb=1` "
                                        "(bf16 LoRA with it too)"}
    for kind, text in labels.items():
        if ratio_key("peak_rss", kind) not in mem:
            continue
        r = {m: mem.get(ratio_key(m, kind)) for m in ("weights", "peak_rss", "above_start", "peak_train",
                                                      "peak_tensor")}
        table += (f"\n{text} / bf16 LoRA: weights {r['weights']}, peak RSS {r['peak_rss']} (whole process), "
                  f"{r['above_start']} (above the RSS before loading the model), {r['peak_train']} (during "
                  f"training)" + (f", peak tensor memory {r['peak_tensor']}" if r["peak_tensor"] else "")
                  + f". Goal peak <= 0.5: whole process **{verdict(r['peak_rss'])}**, above the start "
                  f"**{verdict(r['above_start'])}**, during training **{verdict(r['peak_train'])}**"
                  + (f", tensors **{verdict(r['peak_tensor'])}**" if r["peak_tensor"] else "") + ".\n")
    payload = {"dataset": a.dataset, "task": a.task, "model": model, "model_note": a.model_note, "steps": a.steps,
               "batch_size": a.batch_size, "gradient_checkpointing": a.gradient_checkpointing, "memory": mem}
    print(write_result(f"finetune_memory_{a.task}_{a.dataset}{label}", payload, table))
    print(table)


def alternating_runs(a: argparse.Namespace, configs: dict[str, list[str]], folder: str, key: str
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Short runs (`short_run`) of the recipe as users run it with each of `configs` (name -> overrides), one process
    each, the configurations alternating, `--repeats` times. Returns (runs, summary: the means per configuration, and
    speed / peak during training against the first); `key` names the configuration column."""
    common = [*short_run(a), *a.overrides]
    runs = []
    for rep in range(a.repeats):
        for name, over in configs.items():
            out = run_dir(a.task, a.dataset, f"_{folder}{name}_{rep}")
            t = finetune(a.task, out, [*common, *over])["train"]
            runs.append({key: name, "repeat": rep, "examples_per_s": t["examples_per_s"],
                         "train_wall_s": t["wall_s"], "peak_rss_train_mb": t.get("peak_rss_train_mb"),
                         "rss_at_train_start_mb": t.get("rss_at_train_start_mb"), "peak_rss_mb": t["peak_rss_mb"]})
    summary = []
    for name in configs:
        rs = [r for r in runs if r[key] == name]
        summary.append({key: name, "runs": len(rs),
                        **{f"mean_{k}": round(sum(r[k] for r in rs) / len(rs), 3)
                           for k in ("examples_per_s", "peak_rss_train_mb", "peak_rss_mb")}})
    base = summary[0]
    for row in summary[1:]:
        row["speed_vs_first"] = round(row["mean_examples_per_s"] / base["mean_examples_per_s"], 3)
        row["peak_train_vs_first"] = round(row["mean_peak_rss_train_mb"] / base["mean_peak_rss_train_mb"], 3)
    return runs, summary


def _alternating_table(a: argparse.Namespace, what: str, runs: list[dict[str, Any]],
                       summary: list[dict[str, Any]]) -> str:
    from llmrec.bench_utils import md_table

    return (f"Recipe `{recipe(a.task).name}` as configured (its own dtypes), {a.steps} steps at batch "
            f"{a.batch_size}, each run its own process, {what} alternating; peak_rss_train = the peak during "
            f"trainer.train() (VmHWM reset when it starts).\n\n"
            + md_table(runs, list(runs[0])) + "\n"
            + md_table(summary, list(dict.fromkeys(k for r in summary for k in r)))
            + (f"\n{a.note}\n" if a.note else ""))


def cmd_mmap(a: argparse.Namespace) -> None:
    """Speed and peak RSS of the recipe as users run it (its own dtypes), with `train.malloc_mmap_threshold_mb` at
    each of `--thresholds`, alternating, `--repeats` times: what the allocator option costs and saves."""
    from llmrec.bench_utils import write_result

    runs, summary = alternating_runs(a, {thr: [f"train.malloc_mmap_threshold_mb={thr}"] for thr in a.thresholds},
                                     "mmap", "malloc_mmap_threshold_mb")
    table = _alternating_table(a, "thresholds", runs, summary)
    payload = {"task": a.task, "dataset": a.dataset, "steps": a.steps, "batch_size": a.batch_size, "runs": runs,
               "summary": summary}
    print(write_result(f"finetune_mmap_{a.task}_{a.dataset}", payload, table))
    print(table)


# `speed`: what each of the 2026-12-06 changes to the CPU yesno recipe buys, against the recipe before them
SPEED_CONFIGS = {"recipe_1205": OLD,
                 "no_dropout": ["lora.dropout=0", "train.bf16_autocast=false"],
                 "autocast": ["lora.dropout=0.05", "train.bf16_autocast=auto"],
                 "recipe": [],
                 # the answer window handed to transformers as its length (the loss before 2026-12-06) instead of
                 # an index tensor: `speed --configs int_window recipe --label _window`
                 "int_window": ["train.loss_positions=int"]}


def cmd_speed(a: argparse.Namespace) -> None:
    """Examples/s and peak RSS of short runs of the recipe before 2026-12-06 (LoRA dropout 0.05, no autocast), with
    each change alone, and as it is now; alternating, `--repeats` times."""
    from llmrec.bench_utils import write_result

    configs = {k: SPEED_CONFIGS[k] for k in (a.configs or [k for k in SPEED_CONFIGS if k != "int_window"])}
    runs, summary = alternating_runs(a, configs, "speed_", "config")
    for row in [*runs, *summary]:
        row["overrides"] = " ".join(configs[row["config"]]) or "(none)"
    table = _alternating_table(a, "configurations", runs, summary)
    payload = {"task": a.task, "dataset": a.dataset, "steps": a.steps, "batch_size": a.batch_size, "runs": runs,
               "summary": summary}
    print(write_result(f"finetune_speed_{a.task}_{a.dataset}{a.label or ''}", payload, table))
    print(table)


def cmd_shaped(a: argparse.Namespace) -> None:
    """A Llama of a given shape with random weights, saved in bf16 with the embedded model's tokenizer: memory
    figures depend on shapes and dtypes, not on the weight values, so this measures a >= 1B model offline."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmrec.llm.loading import default_model_path

    tok = AutoTokenizer.from_pretrained(a.tokenizer or default_model_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=a.tie_embeddings, torch_dtype="bfloat16",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an fp32 3B would need 12 GB before the cast
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    n = sum(p.numel() for p in model.parameters())
    out = Path(a.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}: {n / 1e9:.2f}B parameters (random weights, bf16)")


# `gpu`: the GPU recipe as written (QLoRA, PEFT's fp32 upcast of embeddings and norms), QLoRA with those kept bf16,
# and bf16 LoRA; every run with the recipe's bf16 autocast and gradient checkpointing, at the same batch
GPU_KINDS = {"qlora": ["quant.load_in_4bit=true"],
             "qlora_bf16all": ["quant.load_in_4bit=true", "quant.upcast_frozen_embeddings=false",
                               "quant.upcast_norms=false"],
             "bf16": ["quant.load_in_4bit=false"]}
GPU_KEYS = ("examples", "steps", "batch_size", "examples_per_s", "wall_s", "peak_cuda_mb", "peak_cuda_train_mb",
            "weights_mb", "lora_mb", "peak_rss_mb", "gradient_checkpointing")


def gpu_summary(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Rows (one per run, from its metrics.json `train`) and the QLoRA / bf16 LoRA ratios of peak CUDA memory
    (whole run, training alone), weights and examples/s, for each QLoRA run that has a bf16 run beside it."""
    out: dict[str, Any] = {"rows": [{"run": k, **{c: t.get(c) for c in GPU_KEYS}} for k, t in runs.items()]}
    b = runs.get("bf16")
    for kind, q in runs.items():
        if kind == "bf16" or b is None:
            continue
        for key, metric in (("peak_cuda", "peak_cuda_mb"), ("peak_cuda_train", "peak_cuda_train_mb"),
                            ("weights", "weights_mb"), ("speed", "examples_per_s")):
            if q.get(metric) and b.get(metric):
                out[f"ratio_{key}_{kind}_over_bf16"] = round(q[metric] / b[metric], 3)
    return out


def cmd_gpu(a: argparse.Namespace) -> None:
    """QLoRA vs bf16 LoRA with the GPU recipe (`finetune/recipes/<task>_gpu_qlora.yaml`) on `--model`: examples/s
    and peak CUDA memory (torch.cuda.max_memory_allocated) at the same batch, one process per run. Without a GPU it
    runs on the CPU (a smoke run: no CUDA figures)."""
    from llmrec.bench_utils import md_table, write_result

    if not a.model:
        raise SystemExit("gpu: --model is required (a local HF folder, e.g. one made by `shaped`)")
    label = a.label or ""
    gpu_recipe = ROOT / "finetune" / "recipes" / f"{a.task}_gpu_qlora.yaml"
    common = [*short_run(a), f"model={a.model}", "train.report_to=none", *a.overrides]
    runs = {}
    for kind in a.only_gpu or list(GPU_KINDS):
        out = run_dir(a.task, a.dataset, f"_gpu{label}_{kind}")
        runs[kind] = finetune(a.task, out, common + GPU_KINDS[kind], recipe_path=gpu_recipe)["train"]
    summary = gpu_summary(runs)
    cols = ["run", *GPU_KEYS]
    table = (f"Model: {a.model}{' (' + a.model_note + ')' if a.model_note else ''}. Recipe `{gpu_recipe.name}` "
             f"(bf16 autocast, gradient checkpointing), {a.steps} steps at batch {a.batch_size}, one process per "
             "run; examples_per_s over the whole train() call (first steps included); peak_cuda_mb = "
             "torch.cuda.max_memory_allocated over the run (loading included), peak_cuda_train_mb = during train() "
             "alone.\n\n" + md_table(summary["rows"], cols) + "\n"
             + "".join(f"\n{k}: {v}" for k, v in summary.items() if k.startswith("ratio_"))
             + (f"\n\n{a.note}\n" if a.note else "\n"))
    payload = {"dataset": a.dataset, "task": a.task, "model": a.model, "model_note": a.model_note,
               "steps": a.steps, "batch_size": a.batch_size, **summary}
    print(write_result(f"finetune_gpu_{a.task}_{a.dataset}{label}", payload, table))
    print(table)


MEM_KINDS = ("qlora", "bf16", "qlora_bf16emb", "qlora_bf16all", "bf16_mmap", "qlora_bf16all_mmap",
             "qlora_bf16all_pre", "qlora_bf16all_pre_mmap")


def prequantized_copy(model: str | None) -> Path:
    """`artifacts/models/<name>-nf4`: the model saved 4-bit (nf4, double quantization, bf16 elsewhere), made once by
    `llmrec export --quantize-4bit` in its own process (Linux carries a process's peak RSS over to the programs it
    starts, so quantizing in this one would inflate every later run's measured peak)."""
    from llmrec.llm.loading import resolve_model_path

    src = resolve_model_path(model)
    out = ROOT / "artifacts" / "models" / f"{src.name}-nf4"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "llmrec.cli", "export", "--quantize-4bit", "--model", str(src),
                        "--out", str(out), "--dtype", "bfloat16"], check=True, cwd=ROOT)
    return out


def mem_denominator(kind: str) -> str:
    """The bf16 LoRA run a QLoRA run is compared with: the one with the same allocator setting."""
    return "bf16_mmap" if kind.endswith("_mmap") else "bf16"


def ratio_key(metric: str, kind: str) -> str:
    """e.g. `ratio_peak_rss_qlora_over_bf16`, `ratio_peak_rss_qlora_bf16all_mmap_over_bf16_mmap`."""
    return f"ratio_{metric}_{kind}_over_{mem_denominator(kind)}"


def memory_summary(task: str, dataset: str, label: str = "") -> dict[str, Any]:
    """The memory runs' figures and their QLoRA / bf16 ratios (ratios only for runs that exist)."""
    mem: dict[str, Any] = {}
    for kind in MEM_KINDS:
        p = run_dir(task, dataset, f"_mem{label}_{kind}") / "metrics.json"
        if p.is_file():
            t = json.loads(p.read_text())["train"]
            mem[kind] = {k: t.get(k) for k in ("peak_rss_mb", "rss_before_load_mb", "rss_after_load_mb",
                                               "rss_after_load_trimmed_mb", "trim_memory",
                                               "malloc_mmap_threshold_mb",
                                               "rss_at_train_start_mb", "rss_file_at_train_start_mb",
                                               "peak_rss_train_mb", "weights_mb", "lora_mb",
                                               "examples_per_s", "wall_s", "batch_size", "steps",
                                               "gradient_checkpointing", "tensor_base_mb", "peak_tensor_mb")}
            mem[kind]["peak_above_start_mb"] = round(t["peak_rss_mb"] - t["rss_before_load_mb"], 1)
    for kind in MEM_KINDS:
        base = mem_denominator(kind)
        if kind.startswith("bf16") or kind not in mem or base not in mem:
            continue
        q, b = mem[kind], mem[base]
        mem[ratio_key("peak_rss", kind)] = round(q["peak_rss_mb"] / b["peak_rss_mb"], 3)
        mem[ratio_key("above_start", kind)] = round(q["peak_above_start_mb"] / b["peak_above_start_mb"], 3)
        if q.get("weights_mb") and b.get("weights_mb"):
            mem[ratio_key("weights", kind)] = round(q["weights_mb"] / b["weights_mb"], 3)
        if q.get("peak_rss_train_mb") and b.get("peak_rss_train_mb"):
            mem[ratio_key("peak_train", kind)] = round(q["peak_rss_train_mb"] / b["peak_rss_train_mb"], 3)
        if q.get("peak_tensor_mb") and b.get("peak_tensor_mb"):
            mem[ratio_key("peak_tensor", kind)] = round(q["peak_tensor_mb"] / b["peak_tensor_mb"], 3)
    return mem


DEFAULT_BASELINES = {"yesno": "mf,bert_lstm", "rank": "pop,bpr,sasrec,bert_lstm"}
FEW_SHOT_KW = {"mf": {}, "bert_lstm": {"tasks": ["yesno"]}}  # baselines refitted on the LLM's few-shot rows


def baseline_yesno(names: list[str], dataset: str, n_test: int | None, seed: int,
                   few_shot: tuple[int, int] | None = None, probs: dict[str, Any] | None = None,
                   train_seed: int | None = None) -> dict[str, Any]:
    """Each baseline's test metrics on the recipe's test subset (`n_test` rows drawn with `seed`, the run's
    `data.eval_seed`; its checkpoint, else fitted with defaults on every training row), the counts-only reference,
    and with `few_shot` = (n_train, n_valid) the baselines of FEW_SHOT_KW refitted on exactly the LLM's n_train
    training rows (drawn with `train_seed`, the run's `data.seed`; default `seed`), early-stopped on the LLM's n_valid
    validation rows (drawn with `seed`, as its test rows).
    `probs`, when given, gets each method's P(Yes) per test row as a DataFrame (user_id, item_id, label, p_yes)."""
    import pandas as pd

    from llmrec.baselines import get_model, load_or_fit
    from llmrec.data import load_prepared
    from llmrec.evaluation import evaluate_yesno, yesno_subset

    ds = load_prepared(dataset)
    ex = yesno_subset(ds, "test", n_test, seed)
    out: dict[str, Any] = {}
    probs = {} if probs is None else probs

    def keep(name: str, p: Any) -> Any:
        probs[name] = pd.DataFrame({"user_id": ex["user_id"].astype(str).to_numpy(),
                                    "item_id": ex["item_id"].astype(str).to_numpy(),
                                    "label": ex["label"].to_numpy(), "p_yes": np.asarray(p, dtype=float)})
        return p

    for name in names:
        t0 = time.time()
        try:
            model, how = load_or_fit(name, ds)
            out[name] = {**evaluate_yesno(keep(name, model.predict_proba(ex)), ex), "how": how,
                         "seconds": round(time.time() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    for name in [n for n in names if n in FEW_SHOT_KW] if few_shot else []:
        n_tr, n_va = few_shot
        t0 = time.time()
        model = get_model(name, max_train_examples=n_tr, max_valid_examples=n_va,
                          seed=seed if train_seed is None else train_seed, valid_seed=seed, **FEW_SHOT_KW[name])
        model.fit(ds)
        out[f"{name}, same {n_tr} training rows"] = {
            **evaluate_yesno(keep(f"{name}, same {n_tr} training rows", model.predict_proba(ex)), ex),
            "seconds": round(time.time() - t0, 1),
            "how": f"fitted on the LLM's {n_tr} training rows, early stopping on its {n_va} validation rows",
        }
    from llmrec.data.stats import counts_only_p_yes

    out["counts only (no model)"] = {**evaluate_yesno(keep("counts only (no model)", counts_only_p_yes(ds, ex)), ex),
                                     "how": "the yesno_stats prompt's two counts, no fitting (llmrec.data.stats): "
                                            "the figure yesno_estimate shows"}
    return out


def paired_auc_intervals(run: Path, others: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """The tuned LLM's test AUC over each other method's on the same rows: a paired bootstrap of the ratio
    (llmrec.metrics.paired_bootstrap_ratio) from the run's `scores/test_after.csv` and the others' P(Yes), rows
    matched on (user_id, item_id). [] for a run from before the scores were kept (rescore it)."""
    import pandas as pd

    from llmrec.metrics import paired_auc_ratio

    path = run / "scores" / "test_after.csv"
    if not path.is_file():
        return []
    llm = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
    out = []
    for name, o in others.items():
        j = llm.merge(o, on=["user_id", "item_id"], suffixes=("", "_other"), validate="one_to_one")
        if len(j) != len(llm) or not (j["label"] == j["label_other"]).all():
            raise ValueError(f"{path}: its test rows are not {name}'s ({len(j)} of {len(llm)} matched)")
        ci = paired_auc_ratio(j["label"].to_numpy(dtype=float), j["p_yes"], j["p_yes_other"], seed=seed)
        out.append({"vs": name, **ci})
    return out


def counts_reading(runs: dict[str, Path], counts: Any, bins: int = 5) -> list[dict[str, Any]]:
    """How much of each run's tuned P(Yes) is the counts figure the yesno_stats / yesno_estimate prompts carry:
    Spearman's rho between the two over the test rows, and the AUC within `bins` quantile bins of the figure
    (llmrec.metrics.stratified_auc) of the run's score beside the figure's own: a model that read the titles would
    tell apart rows the counts rate alike. Runs without kept scores are skipped."""
    import pandas as pd

    from llmrec.metrics import spearman, stratified_auc

    strata = pd.qcut(counts["p_yes"].rank(method="first"), bins, labels=False)
    ref = counts.assign(stratum=strata.to_numpy())
    out = []
    for name, run in runs.items():
        path = run / "scores" / "test_after.csv"
        if not path.is_file():
            continue
        llm = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
        j = llm.merge(ref, on=["user_id", "item_id"], suffixes=("", "_counts"), validate="one_to_one")
        if len(j) != len(llm) or len(j) != len(ref):
            continue  # other test rows than the figure's
        y = j["label"].to_numpy()
        out.append({"run": name, "n": len(j), "spearman_vs_counts": spearman(j["p_yes"], j["p_yes_counts"]),
                    f"auc_within_{bins}_bins": stratified_auc(y, j["p_yes"], j["stratum"]),
                    f"counts_auc_within_{bins}_bins": stratified_auc(y, j["p_yes_counts"], j["stratum"])})
    return out


def baseline_rank(names: list[str], run: Path) -> dict[str, Any]:
    """Each next-item baseline's NDCG/HR/MRR@10 over exactly the test prompts' candidate sets of the finetune run in
    `run` (its resolved recipe rebuilds them: same seed, same candidates), plus the expected random order. A
    baseline scores the user's full test-time history (train + valid events); its scores order the candidates."""
    from llmrec.baselines import load_or_fit
    from llmrec.data import load_prepared
    from llmrec.finetune import load_recipe
    from llmrec.finetune.data import build_examples
    from llmrec.llm.loading import load_tokenizer
    from llmrec.metrics import random_order_metrics, ranking_metrics, ranks_from_scores

    cfg = load_recipe(run / "recipe.yaml", ["data.n_train=1", "data.n_valid=0"])  # test prompts: own seed
    ds = load_prepared(cfg.dataset)
    ex = build_examples(ds, "rank", cfg.data, load_tokenizer(cfg.model))["test"]
    n = len(ex[0].candidate_ids)
    out: dict[str, Any] = {"random order (expected)": {**random_order_metrics(n), "how": f"uniform over {n}"}}
    labels = np.array([e.label for e in ex])
    for name in names:
        t0 = time.time()
        try:
            model, how = load_or_fit(name, ds)
            scores = model.score_items([e.user_id for e in ex], split="test")
            cand = np.array([[scores[u, ds.item_index[c]] for c in e.candidate_ids] for u, e in enumerate(ex)])
            m = ranking_metrics(ranks_from_scores(cand, labels), ks=(10,))
            out[name] = {**m, "how": how, "seconds": round(time.time() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def load_main(a: argparse.Namespace) -> dict[str, Any]:
    """metrics.json of the recipe run; with --log, the zero-shot figures of a run that has not finished are read from
    its log (status "incomplete")."""
    import ast

    p = run_dir(a.task, a.dataset) / "metrics.json"
    if p.is_file():
        m = json.loads(p.read_text())
        if m.get("status", "done") == "done":
            return m
    if not a.log:
        raise SystemExit(f"{p}: the run has not finished (pass --log LOGFILE to report its partial figures)")
    m = {"status": "incomplete: training did not finish within the session", "train": {}, "wall_s": None}
    for line in Path(a.log).read_text(errors="replace").splitlines():
        if "test before: {" in line:
            m["test_before"] = ast.literal_eval(line.split("test before: ", 1)[1].strip())
        if "'loss': " in line and "{" in line:
            m["train"].setdefault("log", []).append(line[line.index("{"):].strip()[:200])
    return m


def cmd_report(a: argparse.Namespace) -> None:
    from llmrec.bench_utils import RESULTS_DIR, md_table, write_result

    main = load_main(a)
    recipe_used = (run_dir(a.task, a.dataset) / "recipe.yaml").read_text()
    manifest = json.loads((run_dir(a.task, a.dataset) / "data_manifest.json").read_text())
    # runs whose folders are gone ($LLMREC_HOME rebuilt, another machine) keep the figures of the previous report
    prev_path = Path(RESULTS_DIR) / f"finetune_{a.task}_{a.dataset}.json"
    prev = json.loads(prev_path.read_text()) if prev_path.is_file() else {}
    mem = memory_summary(a.task, a.dataset) or prev.get("memory") or {}
    n_test = manifest["test"]["n"]
    # the valid/test subsets are drawn with data.eval_seed (a manifest from before it: with data.seed), the training
    # rows with data.seed: the baselines are scored on the LLM's own test rows whatever its training seed
    train_seed = manifest["seed"]
    seed = manifest.get("eval_seed", train_seed)
    few = (manifest["train"]["n"], manifest["valid"]["n"]) if a.few_shot else None
    names = [n for n in (DEFAULT_BASELINES[a.task] if a.baselines is None else a.baselines).split(",") if n]
    base_probs: dict[str, Any] = {}
    if a.task == "yesno":
        baselines = baseline_yesno(names, a.dataset, n_test, seed, few, base_probs, train_seed) if names else {}
    else:  # the same candidate sets as the LLM's test prompts
        baselines = baseline_rank(names, run_dir(a.task, a.dataset))
    payload = {
        "dataset": a.dataset, "task": a.task, "status": main.get("status", "done"),
        "eval_base": main.get("eval_base"), "rescored": main.get("rescored"),
        "model": "SmolLM2-135M-Instruct (embedded GGUF -> HF bf16)",
        "test_subset": {"n": n_test, "seed": seed}, "train": main["train"], "test_before": main.get("test_before"),
        "test_after": main.get("test_after"), "valid_after": main.get("valid_after"), "memory": mem,
        "baselines_same_subset": baselines, "wall_s": main["wall_s"], "recipe": recipe_used,
        "data_manifest": manifest, "note": a.note,
        "auc_intervals": paired_auc_intervals(run_dir(a.task, a.dataset), base_probs, seed) if base_probs else [],
    }
    keys = ["auc", "accuracy", "f1"] if a.task == "yesno" else ["ndcg@10", "hr@10", "mrr@10"]
    on_deq = "dequantized" in main.get("eval_base", "")  # QLoRA scored on its own base (since 2026-12-05)
    rows = [{"model": "SmolLM2 zero-shot", **{k: (main.get("test_before") or {}).get(k) for k in keys},
             "note": "the nf4 base QLoRA starts from, dequantized" if on_deq else ""},
            {"model": "SmolLM2 + QLoRA", **{k: (main.get("test_after") or {}).get(k) for k in keys}}]
    thr = (main.get("test_after") or {}).get("at_valid_threshold")
    if thr:
        rows.append({"model": "SmolLM2 + QLoRA, threshold chosen on valid", "accuracy": thr["accuracy"],
                     "f1": thr["f1"], "note": f"P(Yes) >= {thr['threshold']:.3f} (AUC is threshold-free)"})
    rows += [{"model": n, **{k: v.get(k) for k in keys}, "note": v.get("how", v.get("error"))}
             for n, v in baselines.items()]
    variants = {}
    zero_shot_shown: set[tuple[str, ...]] = set()
    for name, label in VARIANT_LABELS.items():
        vp = run_dir(a.task, a.dataset, f"_{name}") / "metrics.json"
        v = json.loads(vp.read_text()) if vp.is_file() else {}
        if v.get("status") != "done" and name in prev.get("variants", {}):
            v = {**prev["variants"][name], "status": "done", "carried_over": prev_path.name}
        if v.get("status") == "done":
            variants[name] = {k: v.get(k) for k in ("train", "test_before", "test_after", "valid_after", "wall_s",
                                                    "load_in_4bit", "carried_over") if k in v}
            # the overrides this run had (a run made before its variant existed may have kept the zero-shot pass)
            over = [o for o in VARIANTS[name] if not (o == "eval_before=false" and v.get("test_before"))]
            # the test examples depend on every data setting but the number of training examples
            data_over = tuple(sorted(o for o in VARIANTS[name] if o.startswith("data.")
                                     and not o.startswith("data.n_train=")))
            own_sets = bool(data_over)  # other test examples than main's
            # one zero-shot row per distinct test set (e.g. every yesno_stats variant shares the `stats` one)
            if v.get("test_before") and own_sets and data_over not in zero_shot_shown:
                zero_shot_shown.add(data_over)
                rows.append({"model": f"{label}: zero-shot", **{k: v["test_before"].get(k) for k in keys},
                             "note": f"same recipe, {' '.join(over)}"})
            kept = f"; figures kept from the previous {v['carried_over']} (run folder gone)" if v.get(
                "carried_over") else ""
            rows.append({"model": label, **{k: (v.get("test_after") or {}).get(k) for k in keys},
                         "note": f"same recipe, {' '.join(over)}{kept}"})
            if a.task == "rank" and names and own_sets:  # baselines on this variant's own candidate sets
                vb = (v.get("baselines_same_candidates") or {} if v.get("carried_over")
                      else baseline_rank(names, run_dir(a.task, a.dataset, f"_{name}")))
                variants[name]["baselines_same_candidates"] = vb
                rows += [{"model": f"{n} ({label.split(', ', 1)[-1]})", **{k: b.get(k) for k in keys},
                          "note": b.get("how", b.get("error"))} for n, b in vb.items()]
            vthr = (v.get("test_after") or {}).get("at_valid_threshold")
            if vthr:
                rows.append({"model": f"{label}, threshold chosen on valid", "accuracy": vthr["accuracy"],
                             "f1": vthr["f1"], "note": f"P(Yes) >= {vthr['threshold']:.3f}"})
    payload["variants"] = variants
    import pandas as pd

    for name in variants:  # the main run against each variant scored on the same test rows
        path = run_dir(a.task, a.dataset, f"_{name}") / "scores" / "test_after.csv"
        if a.task == "yesno" and path.is_file():
            other = {VARIANT_LABELS[name]: pd.read_csv(path, dtype={"user_id": str, "item_id": str})}
            try:
                payload["auc_intervals"] += paired_auc_intervals(run_dir(a.task, a.dataset), other, seed)
            except ValueError:
                continue  # other test rows than the main run's
    reading = []
    if "counts only (no model)" in base_probs:
        runs = {"main": run_dir(a.task, a.dataset)} | {n: run_dir(a.task, a.dataset, f"_{n}") for n in variants}
        reading = counts_reading(runs, base_probs["counts only (no model)"])
        have = {r["run"] for r in reading}
        reading += [r for r in prev.get("counts_reading", []) if r["run"] in runs and r["run"] not in have]
    payload["counts_reading"] = reading
    tr = main["train"]
    perf = [{"run": "main (QLoRA)", "examples": tr.get("examples"), "steps": tr.get("steps"),
             "examples/s": tr.get("examples_per_s"), "train wall s": tr.get("wall_s"), "total wall s": main["wall_s"],
             "peak RSS MB": tr.get("peak_rss_mb")}]
    for name, v in variants.items():
        vt = v["train"]
        zs = "with" if v.get("test_before") else "no"
        perf.append({"run": f"{name} ({zs} zero-shot pass)", "examples": vt.get("examples"), "steps": vt.get("steps"),
                     "examples/s": vt.get("examples_per_s"), "train wall s": vt.get("wall_s"),
                     "total wall s": v["wall_s"], "peak RSS MB": vt.get("peak_rss_mb")})
    for k in MEM_KINDS:
        if k in mem:
            m = mem[k]
            perf.append({"run": f"memory: {k}, batch {m['batch_size']}, {m['steps']} steps",
                         "examples/s": m["examples_per_s"], "train wall s": m["wall_s"],
                         "peak RSS MB": m["peak_rss_mb"], "above start MB": m["peak_above_start_mb"]})
    status = main.get("status", "done")
    cands = (f" (candidates per prompt: {manifest.get('n_candidates')}, {manifest.get('candidates')}; a variant "
             "with other candidates has its own test prompts and baseline rows)") if a.task == "rank" else ""
    how = (f"Scored on: {main['eval_base']}" + (f" (scores from a rescore, {main['rescored']['at'][:10]} at "
                                                  f"{main['rescored']['commit']}; training figures from the run)"
                                                  if main.get("rescored") else "") + "\n\n"
           if main.get("eval_base") else "")
    intervals = ""
    if payload["auc_intervals"]:
        iv = payload["auc_intervals"][0]
        intervals = (f"\nSmolLM2 + QLoRA's test AUC / each other method's on the same {iv['n']} rows, with a "
                     f"{100 * iv['level']:.0f}% paired-bootstrap interval ({iv['n_boot']} resamples; "
                     "llmrec.metrics.paired_bootstrap_ratio):\n\n"
                     + md_table([{"vs": r["vs"], "auc ratio": r["ratio"], "low": r["lo"], "high": r["hi"],
                                  "resamples with LLM >= it": r["p_ge_1"]} for r in payload["auc_intervals"]],
                                ["vs", "auc ratio", "low", "high", "resamples with LLM >= it"]))
    if reading:
        cols = list(reading[0])
        intervals += ("\nHow much of the tuned P(Yes) is the counts figure (the `counts only` row) on the same rows: "
                      "Spearman's rho, and the AUC within 5 quantile bins of the figure (pairs from rows it rates "
                      "alike; llmrec.metrics.stratified_auc), the model's beside the figure's own:\n\n"
                      + md_table(reading, cols))
    table = (f"Status: {status}\n\nTest subset: {n_test} examples, seed {seed}{cands}\n\n{how}"
             + md_table(rows, ["model", *keys, "note"]) + intervals + "\n"
             + md_table(perf, ["run", "examples", "steps", "examples/s", "train wall s", "total wall s",
                               "peak RSS MB", "above start MB"])
             + "".join(f"\n{k} / {mem_denominator(k)} LoRA peak RSS: {mem[ratio_key('peak_rss', k)]} (whole "
                       "process), "
                       f"{mem.get(ratio_key('above_start', k))} (above the RSS before loading the model)\n"
                       for k in MEM_KINDS if ratio_key("peak_rss", k) in mem)
             + (f"\n{a.note}\n" if a.note else ""))
    print(write_result(f"finetune_{a.task}_{a.dataset}", payload, table, command=a.command))
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "rescore", "mem", "mmap", "speed", "report", "shaped", "gpu"])
    p.add_argument("--task", default="yesno", choices=["yesno", "rank"])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--steps", type=int, default=2, help="mem, mmap, speed: training steps per configuration")
    p.add_argument("--batch-size", type=int, default=4, help="mem, mmap: the batch every configuration uses")
    p.add_argument("--thresholds", type=int, nargs="+", default=[0, 1],
                   help="mmap: train.malloc_mmap_threshold_mb values, the first is the reference")
    p.add_argument("--repeats", type=int, default=2, help="mmap, speed: runs per configuration (alternating)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="mem: both configurations with it")
    p.add_argument("--tensor-memory", action="store_true",
                   help="mem: also count live tensor bytes during training (train.tensor_memory; ~15%% slower)")
    p.add_argument("--model", default=None, help="mem: a local HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--model-note", default="", help="mem: what the model is (printed in the report)")
    p.add_argument("--only", nargs="+", choices=list(MEM_KINDS), default=None,
                   help="mem: run only these configurations (the report reads every run folder that exists)")
    p.add_argument("--label", default="", help="mem: suffix of the run folders and the result name, e.g. _1b; "
                                               "speed: suffix of the result name")
    p.add_argument("--configs", nargs="+", choices=list(SPEED_CONFIGS), default=None,
                   help="speed: these configurations, the first is the reference (default: all but int_window)")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="run: the recipe with the variant's overrides, in its own folder (reported beside main); "
                        "rescore: that variant's run")
    p.add_argument("--only-gpu", nargs="+", choices=list(GPU_KINDS), default=None, help="gpu: only these runs")
    p.add_argument("--out", default=None, help="shaped: output folder")
    p.add_argument("--tokenizer", default=None, help="shaped: tokenizer folder (default: the embedded model's)")
    p.add_argument("--tie-embeddings", action="store_true", help="shaped: tie the input and output embeddings")
    for k, v in (("hidden", 2048), ("intermediate", 5632), ("layers", 22), ("heads", 32), ("kv-heads", 4)):
        p.add_argument(f"--{k}", type=int, default=v, help=f"shaped: (default {v}: TinyLlama-1.1B's shape)")
    p.add_argument("--baselines", default=None,
                   help="report: baselines scored on the same test subset (yesno; default mf,bert_lstm) or the same "
                        "candidate sets (rank; default pop,bpr,sasrec,bert_lstm); '' = none")
    p.add_argument("--few-shot", action=argparse.BooleanOptionalAction, default=True,
                   help="report (yesno): also refit mf / bert_lstm on the LLM's own training and validation rows")
    p.add_argument("--note", default="", help="report, mmap: free text (e.g. the CPU contention during the run)")
    p.add_argument("--command", default=None, help="report: the commands that produced the runs")
    p.add_argument("--log", default=None, help="report: log of a recipe run that has not finished")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    a = p.parse_intermixed_args()
    {"run": cmd_run, "rescore": cmd_rescore, "mem": cmd_mem, "mmap": cmd_mmap, "speed": cmd_speed,
     "report": cmd_report, "shaped": cmd_shaped, "gpu": cmd_gpu}[a.action](a)


if __name__ == "__main__":
    main()
