"""Shared header and writers for benchmark result files (`eval/results/<name>.json` + `.md`)."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# argparse types of the eval scripts' counts: the CLI's own (0 or less refused; `count_or_all`: 0 = all)
from llmrec.cli.args import count as count_or_all  # noqa: F401
from llmrec.cli.args import positive_int, positive_ints  # noqa: F401

RESULTS_DIR = Path(os.environ.get("LLMREC_RESULTS", Path(__file__).resolve().parent.parent / "eval" / "results"))

# the checkout this module runs from (where the eval/, finetune/ and serve/ scripts live)
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short HEAD of this checkout, "+dirty" with uncommitted changes to tracked files; outside git (a copy of the
    tree on another machine) `$LLMREC_COMMIT` if set, else "unknown"."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)

    try:
        out = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LLMREC_COMMIT") or "unknown"


# The code a long benchmark runs is the checkout as it was when the runner imported this module; commits made while it
# runs do not change what it measured, so the header names this commit (and the one at writing time when they differ).
COMMIT_AT_START = git_commit()


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    from llmrec.llm.loading import cpu_has_fast_bf16

    # `dtype: fast` is bf16 on such a CPU and fp32 without: the same command computes in a different dtype
    bf16 = "native bf16 (AVX512-BF16/AMX)" if cpu_has_fast_bf16() else "no native bf16"
    return f"{os.cpu_count()} x {cpu} ({bf16}){mem}{gpu}, Python {platform.python_version()}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (and finished children) in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux VmHWM, via /proc/self/clear_refs) so that `vm_hwm_mb` then
    measures one phase (e.g. training after loading). ru_maxrss (`peak_rss_mb`) is the same kernel mark and is
    reset too: read the peak so far first if it is still needed. False where the kernel does not offer it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Return freed heap memory to the OS (glibc `malloc_trim(0)`, after a `gc.collect()`). Memory that a process
    frees stays resident under glibc until trimmed, so without this RSS keeps the high-water mark of every
    temporary. False where there is no glibc (macOS, musl): nothing is done."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def set_mmap_threshold(mb: int) -> bool:
    """glibc `mallopt(M_MMAP_THRESHOLD, mb MiB)`: every allocation of `mb` MiB or more gets its own mapping, unmapped
    as soon as it is freed, instead of coming from the heap, where freed blocks stay resident and fragment (glibc's
    default threshold starts at 128 KiB and rises up to 32 MiB as large blocks are freed, so a training step's
    activations end up on the heap). The same as `MALLOC_MMAP_THRESHOLD_` in the environment, settable from a
    recipe. Costs a system call and page faults per large allocation. False where there is no glibc."""
    import ctypes

    if mb <= 0:
        raise ValueError(f"mmap threshold must be > 0 MiB, got {mb}")
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(mb) << 20))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM", ...), in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def memory_status_mb(fields: tuple[str, ...] = ("VmRSS", "RssAnon", "RssFile", "VmHWM")) -> dict[str, float]:
    """Those /proc/self/status memory fields, in MiB rounded to 0.1 (the fields not there are left out)."""
    out = {f: _proc_status_mb(f) for f in fields}
    return {f: round(v, 1) for f, v in out.items() if v is not None}


def vm_rss_mb() -> float | None:
    """Current resident memory (Linux VmRSS), in MiB; None elsewhere."""
    return _proc_status_mb("VmRSS")


def rss_file_mb() -> float | None:
    """The file-backed part of the current resident memory (Linux RssFile: mapped files such as a .safetensors
    checkpoint and shared libraries), in MiB; None elsewhere. RssAnon is the rest (heap, tensors)."""
    return _proc_status_mb("RssFile")


def vm_hwm_mb() -> float | None:
    """Peak resident memory since start or since `reset_peak_rss` (Linux VmHWM), in MiB; None elsewhere."""
    return _proc_status_mb("VmHWM")


def command_line(argv: list[str] | None = None) -> str:
    """The command as it can be typed again, quoted for a POSIX shell (`shlex.join`): `python eval/x.py args` for a
    script (its path from the repository root when it lies in this checkout), `python -m pkg args` for a `python -m`
    run (whose argv[0] is the package's `__main__.py`), the bare name for a console script (`llmrec args`)."""
    argv = list(sys.argv if argv is None else argv)
    head = Path(argv[0])
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if head.name == "__main__.py" and spec is not None and spec.name:
        words = ["python", "-m", spec.name.removesuffix(".__main__")]
    elif head.suffix == ".py":
        try:
            words = ["python", str(head.resolve().relative_to(REPO_ROOT))]
        except ValueError:
            words = ["python", argv[0]]
    else:
        words = [head.name]
    return shlex.join(words + argv[1:])


def md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
        return "" if v is None else str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    return head + "\n".join("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows) + "\n"


def json_safe(v: Any) -> Any:
    """`v` with NaN / inf floats as None (JSON has no NaN: `json.dumps` writes `NaN`, which strict parsers such as jq
    refuse) and numpy scalars / arrays as plain Python values, in nested dicts, lists and tuples."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if hasattr(v, "tolist") and type(v).__module__ == "numpy":  # numpy scalar or array
        return json_safe(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: Path, obj: Any) -> None:
    """`obj` as strict JSON (`json_safe`: a one-class AUC is null, not the NaN strict parsers refuse), indented."""
    Path(path).write_text(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")


def write_result(
    name: str, payload: dict[str, Any], table_md: str, command: str | None = None, results_dir: Path | None = None
) -> Path:
    """Write `<name>.json` (header + payload) and `<name>.md` (header + table). Returns the JSON path."""
    out_dir = Path(results_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = git_commit()
    header = {
        "dataset": payload.get("dataset"),
        "commit": COMMIT_AT_START if now == COMMIT_AT_START else f"{COMMIT_AT_START} (started; {now} when written)",
        "machine": machine_info(),
        "command": command or command_line(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    data = {**header, **{k: v for k, v in payload.items() if k not in header or k == "dataset"}}
    path = out_dir / f"{name}.json"
    write_json(path, data)
    md = (
        f"# {name}\n\n- dataset: {header['dataset']}\n- command: `{header['command']}`\n- commit: {header['commit']}\n"
        f"- machine: {header['machine']}\n- created: {header['created']}\n\n{table_md}"
    )
    (out_dir / f"{name}.md").write_text(md)
    return path


def random_lora_adapter(model: str | Path | None, out: str | Path, seed: int = 0, r: int = 8,
                        target_modules: list[str] | None = None, std: float = 0.01) -> Path:
    """Save a LoRA adapter for `model` with random non-zero B (PEFT starts B at 0, i.e. a no-op adapter): for
    memory / equivalence checks that need adapters which change the outputs, without training one."""
    import torch

    from llmrec.llm.loading import LoraSettings, apply_lora, load_causal_lm

    targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    m, _ = load_causal_lm(model, dtype="float32")
    pm = apply_lora(m, LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    pm.save_pretrained(out)
    return Path(out)
