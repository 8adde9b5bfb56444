"""Thin entry point: `python finetune/train.py --config finetune/recipes/yesno_smollm2_qlora.yaml [key=value ...]`.

Same code as `llmrec finetune`; runs unchanged under `accelerate launch --config_file finetune/accelerate/... `."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from llmrec.cli.finetune import main_finetune  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_finetune())
