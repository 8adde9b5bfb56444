"""Train the shipped recipes (`finetune/recipes/<task>_smollm2_qlora.yaml`) into named folders unless an adapter
trained with the same recipe is already there: the first stage of `llmrec demo` (short step budgets) and of
`llmrec bench --train` (the recipes as shipped, so the bench's tuned rows come from one command)."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent.parent
TASKS = ("yesno", "rank", "next_title")  # the bench's three adapters: Yes/No, letters, title likelihood
# how long a run trains: not a training key for resuming a checkpoint (`RUN_ONLY_KEYS`), but an adapter trained for
# 32 steps is not the recipe's adapter
LENGTH_KEYS = ("train.max_steps", "train.epochs")


class RecipeRunError(RuntimeError):
    """A training run failed or left no adapter; the message names the command."""


def recipe_file(task: str) -> str:
    """The shipped recipe of `task`, relative to the checkout (where the steps run)."""
    return f"finetune/recipes/{task}_smollm2_qlora.yaml"


def run_step(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run one command in the checkout; RecipeRunError naming it when it fails (its own output is above)."""
    print("$ " + shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        raise RecipeRunError(f"`{shlex.join(cmd)}` exited with code {rc} (its output is above)")


def changes_from(out_dir: Path, task: str, overrides: list[str]) -> list[str] | None:
    """None when `out_dir` holds no adapter; else what differs ("key: saved -> now") between the run saved there and
    `recipe_file(task)` with `overrides`: its training keys, how long it trained, and its training examples
    (`example_changes`) ([] = the same run)."""
    from llmrec.finetune import load_recipe
    from llmrec.finetune.trainer import recipe_changes

    if not (out_dir / "adapter" / "adapter_config.json").is_file():
        return None
    saved = out_dir / "recipe.yaml"
    if not saved.is_file():
        return [f"{saved}: missing"]
    cfg = load_recipe(ROOT / recipe_file(task), overrides)
    return recipe_changes(cfg, saved, also=LENGTH_KEYS) or example_changes(cfg, out_dir)


def example_changes(cfg: Any, out_dir: Path) -> list[str]:
    """[] when the run in `out_dir` trained on the examples this code builds from `cfg`; else why not. Its
    data_manifest.json records the template's hash and the example-building code's version (`EXAMPLES_VERSION`,
    1 when not recorded); where the version differs, the examples are built again (seconds to a minute) and their
    train / valid hashes compared, so a change that left this recipe's examples as they were keeps the adapter; the
    manifest then records the current version (and `examples_version_checked`), so the next check builds nothing."""
    import json

    import llmrec.prompts as prompts_api
    from llmrec.data import load_prepared
    from llmrec.finetune.data import EXAMPLES_VERSION, build_examples, manifest, resolve_template
    from llmrec.llm.loading import load_tokenizer

    path = out_dir / "data_manifest.json"
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{path}: unreadable ({type(e).__name__})"]
    saved_hash = (man.get("template") or {}).get("hash")
    now_hash = getattr(resolve_template(prompts_api, cfg.data.template or cfg.task), "hash", None)
    if saved_hash and now_hash and saved_hash != now_hash:
        return [f"template {cfg.data.template or cfg.task}: hash {saved_hash[:12]} -> {now_hash[:12]}"]
    saved_v, now_v = man.get("examples_version") or 1, EXAMPLES_VERSION.get(cfg.task)
    if saved_v == now_v:
        return []
    ds = load_prepared(cfg.dataset)
    now = manifest(ds, cfg.task, cfg.data, build_examples(ds, cfg.task, cfg.data, load_tokenizer(cfg.model)))
    differ = [s for s in ("train", "valid") if (man.get(s) or {}).get("sha256") != (now.get(s) or {}).get("sha256")]
    if differ:
        return [f"training examples ({'/'.join(differ)}): built by example code version {saved_v} -> {now_v} "
                "(llmrec.finetune.data.EXAMPLES_VERSION), and they differ"]
    # the same examples: recorded as this version's (and which version built them), so that the next check is free
    from llmrec.data.prepare import replace_atomic

    man.update(examples_version=now_v, examples_version_checked={"from": saved_v, "train_valid_sha256": "same"})
    try:
        replace_atomic(path, lambda tmp: tmp.write_text(json.dumps(man, indent=2) + "\n"))
    except OSError as e:  # a read-only run folder: the check is repeated next time, nothing else changes
        logger.warning("%s: could not record examples version %s (%s)", path, now_v, type(e).__name__)
    return []


def train_recipes(dataset: str, folder: Callable[[str], Path], overrides: list[str],
                  env: dict[str, str] | None = None, run: Callable[[list[str], dict | None], None] = run_step,
                  say: Callable[[str], None] = print, tasks: tuple[str, ...] = TASKS) -> dict[str, str]:
    """{task: adapter folder} for each of `tasks`, trained with its shipped recipe plus `dataset`, `overrides` and
    `output_dir=folder(task)`, or reused from there when the run saved in that folder used the same recipe and length
    (`changes_from`). A folder trained with another recipe is trained again from scratch (`train.resume=null`: its
    checkpoints are the other recipe's). `run(cmd, env)` runs a step; `say` reports each decision."""
    out: dict[str, str] = {}
    for task in tasks:
        out_dir = folder(task)
        adapter = out_dir / "adapter"
        sets = [f"dataset={dataset}", f"output_dir={out_dir}", *overrides]
        changed = changes_from(out_dir, task, sets)
        if changed == []:
            say(f"reusing {adapter} (trained with this recipe by an earlier run; delete {out_dir} to train it again)")
            out[task] = str(adapter)
            continue
        if changed:
            say(f"{adapter} was trained with another recipe or on other examples ({'; '.join(changed)}): "
                "training it again")
            sets.append("train.resume=null")
        run([sys.executable, "finetune/train.py", "--config", recipe_file(task), *sets], env)
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeRunError(f"{recipe_file(task)}: the run ended without writing {adapter}")
        out[task] = str(adapter)
    return out
