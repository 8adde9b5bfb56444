"""Train the shipped recipes (`finetune/recipes/<task>_smollm2_qlora.yaml`) into named folders unless an adapter
trained with the same recipe is already there: the first stage of `llmrec demo` (short step budgets) and of
`llmrec bench --train` (the recipes as shipped, so the bench's tuned rows come from one command)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
    """None when `out_dir` holds no adapter; else the keys ("key: saved -> now") in which the run saved there differs
    from `recipe_file(task)` with `overrides`: its training keys and how long it trained ([] = the same run)."""
    from llmrec.finetune import load_recipe
    from llmrec.finetune.trainer import recipe_changes

    if not (out_dir / "adapter" / "adapter_config.json").is_file():
        return None
    saved = out_dir / "recipe.yaml"
    if not saved.is_file():
        return [f"{saved}: missing"]
    return recipe_changes(load_recipe(ROOT / recipe_file(task), overrides), saved, also=LENGTH_KEYS)


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
            say(f"{adapter} was trained with another recipe ({'; '.join(changed)}): training it again")
            sets.append("train.resume=null")
        run([sys.executable, "finetune/train.py", "--config", recipe_file(task), *sets], env)
        if not (adapter / "adapter_config.json").is_file():
            raise RecipeRunError(f"{recipe_file(task)}: the run ended without writing {adapter}")
        out[task] = str(adapter)
    return out
