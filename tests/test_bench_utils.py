"""`llmrec.bench_utils`: the per-phase peak-RSS mark used by the fine-tuning memory benchmark; the result header."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest

from llmrec.bench_utils import reset_peak_rss, vm_hwm_mb


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_reset_peak_rss_measures_one_phase():
    big = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    peak_with_big = vm_hwm_mb()
    del big
    assert reset_peak_rss()
    after_reset = vm_hwm_mb()
    assert after_reset < peak_with_big - 150  # the mark now starts from the current RSS, not the old peak
    own_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    assert own_maxrss <= after_reset + 5  # the kernel's ru_maxrss is the same mark: reset too (not the children's)
    x = np.ones(100 * 2**20 // 8)  # a 100 MiB phase
    phase_peak = vm_hwm_mb()
    assert 90 <= phase_peak - after_reset <= 130
    del x


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_trim_heap_returns_freed_heap_memory_to_the_os():
    import subprocess
    import sys

    # a fresh process, so that this test's own heap history does not matter; glibc's own heuristics (dynamic mmap
    # threshold, automatic trimming of the heap top) are pinned so that free() keeps the blocks resident
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.mallopt(-1, 1 << 30)\n"  # M_TRIM_THRESHOLD: free() never shrinks the heap by itself
        "libc.mallopt(-3, 32 << 20)\n"  # M_MMAP_THRESHOLD: 64 KB blocks come from the heap, not from mmap
        "import numpy as np\n"
        "from llmrec.bench_utils import trim_heap, vm_rss_mb\n"
        "blocks = [np.ones(8000) for _ in range(3000)]\n"  # 64 KB each, ~190 MB
        "del blocks\n"
        "before = vm_rss_mb()\n"
        "ok = trim_heap()\n"
        "print(ok, before - vm_rss_mb())\n"
    )
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("no glibc malloc_trim here")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"  # glibc reports that it released memory
    assert float(out[1]) > 50  # MB given back that free() alone had kept resident


def test_mmap_threshold_returns_freed_blocks_at_once():
    """Blocks of 4 MB freed under one live block: on glibc's heap (threshold pinned above them) they stay resident
    until trimmed; with `set_mmap_threshold(1)` each has its own mapping and free() returns it at once."""
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("no glibc mallopt here")

    def freed_mb(setup: str) -> float:
        code = (
            "import ctypes\n"
            "libc = ctypes.CDLL('libc.so.6')\n"
            "libc.mallopt(-1, 1 << 30)\n"  # M_TRIM_THRESHOLD: free() never shrinks the heap top by itself
            f"{setup}\n"
            "import numpy as np\n"
            "from llmrec.bench_utils import vm_rss_mb\n"
            "blocks = [np.ones(1 << 19) for _ in range(60)]\n"  # 60 x 4 MiB
            "keep = np.ones(1 << 19)\n"  # a live block after them
            "before = vm_rss_mb()\n"
            "del blocks\n"
            "print(before - vm_rss_mb())\n"
        )
        return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.split()[-1])

    on_heap = freed_mb("libc.mallopt(-3, 32 << 20)")  # M_MMAP_THRESHOLD 32 MiB: 4 MiB blocks come from the heap
    mapped = freed_mb("from llmrec.bench_utils import set_mmap_threshold\nassert set_mmap_threshold(1)")
    assert on_heap < 50  # free() kept the ~240 MB resident
    assert mapped > 200  # unmapped at once
    with pytest.raises(ValueError, match="> 0"):
        from llmrec.bench_utils import set_mmap_threshold

        set_mmap_threshold(0)


def test_memory_status_reads_the_kernels_fields():
    from pathlib import Path

    from llmrec.bench_utils import memory_status_mb

    m = memory_status_mb()
    if not Path("/proc/self/status").exists():
        assert m == {}
        return
    assert set(m) == {"VmRSS", "RssAnon", "RssFile", "VmHWM"} and m["VmRSS"] > 0
    assert m["RssAnon"] + m["RssFile"] <= m["VmRSS"] + 1.0 and m["VmRSS"] <= m["VmHWM"] + 1.0
    assert set(memory_status_mb(("VmRSS", "NoSuchField"))) == {"VmRSS"}


def test_result_header_names_the_commit_the_run_started_from(tmp_path, monkeypatch):
    import json

    from llmrec import bench_utils

    monkeypatch.setattr(bench_utils, "COMMIT_AT_START", "abc1234")
    monkeypatch.setattr(bench_utils, "git_commit", lambda: "abc1234")
    bench_utils.write_result("same", {"dataset": "d"}, "t\n", command="x", results_dir=tmp_path)
    assert json.loads((tmp_path / "same.json").read_text())["commit"] == "abc1234"
    monkeypatch.setattr(bench_utils, "git_commit", lambda: "def5678+dirty")
    bench_utils.write_result("moved", {"dataset": "d"}, "t\n", command="x", results_dir=tmp_path)
    moved = "abc1234 (started; def5678+dirty when written)"
    assert json.loads((tmp_path / "moved.json").read_text())["commit"] == moved
    assert "- commit: abc1234 (started; def5678+dirty when written)" in (tmp_path / "moved.md").read_text()


def test_result_json_is_strict_json_with_nan_as_null(tmp_path):
    """A one-class AUC (NaN) was written as `NaN`, which strict JSON parsers (jq, JSON.parse) refuse; numpy scalars
    became strings through `default=str`."""
    import json

    import numpy as np

    from llmrec import bench_utils

    payload = {"dataset": "d", "rows": [{"auc": float("nan"), "n": np.int64(3), "x": np.float32(0.5),
                                         "v": np.array([1.0, np.inf])}], "t": (1, float("-inf"))}
    path = bench_utils.write_result("nan", payload, "t\n", command="x", results_dir=tmp_path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert d["rows"] == [{"auc": None, "n": 3, "x": 0.5, "v": [1.0, None]}] and d["t"] == [1, None]


def test_machine_line_says_whether_the_cpu_computes_bf16_natively(monkeypatch):
    # `dtype: fast` resolves to bf16 or fp32 by this CPU flag, so every result's machine line records it
    import llmrec.llm.loading as loading
    from llmrec.bench_utils import machine_info

    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    assert "(native bf16 (AVX512-BF16/AMX))" in machine_info()
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda cpuinfo=None: False)
    assert "(no native bf16)" in machine_info()


def test_commit_outside_git_comes_from_llmrec_commit(monkeypatch):
    # a copy of the tree on another machine (no .git): the commit the copy was made from, passed in the environment
    import subprocess

    from llmrec import bench_utils

    monkeypatch.setattr(bench_utils.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "fatal: not a git repository"))
    monkeypatch.delenv("LLMREC_COMMIT", raising=False)
    assert bench_utils.git_commit() == "unknown"
    monkeypatch.setenv("LLMREC_COMMIT", "abc1234")
    assert bench_utils.git_commit() == "abc1234"


def test_command_line_names_a_python_m_run_by_its_package(monkeypatch):
    import sys
    import types

    from llmrec.bench_utils import command_line

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="llmrec.cli.__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/x/llmrec/cli/__main__.py", "bench", "--dataset", "ml-100k"])
    assert command_line() == "python -m llmrec.cli bench --dataset ml-100k"
    monkeypatch.setattr(sys, "argv", ["/x/eval/ranking_modes.py", "--users", "5"])
    assert command_line() == "python /x/eval/ranking_modes.py --users 5"  # outside this checkout: as typed


def test_command_line_can_be_typed_again(monkeypatch):
    """A script in the checkout is named by its path from the repository root, and arguments with spaces or shell
    characters are quoted, so that the recorded command runs as it ran."""
    import shlex
    import sys

    from llmrec.bench_utils import REPO_ROOT, command_line

    argv = [str(REPO_ROOT / "eval" / "ranking_modes.py"), "--note", "quiet machine, 2 cores", "rank_modes=[a, b]"]
    monkeypatch.setattr(sys, "argv", argv)
    line = command_line()
    assert line == "python eval/ranking_modes.py --note 'quiet machine, 2 cores' 'rank_modes=[a, b]'"
    assert shlex.split(line)[2:] == argv[1:]
    assert command_line(["/venv/bin/llmrec", "bench", "--set", "x=1"]) == "llmrec bench --set x=1"
