"""`llmrec.bench_utils`: the per-phase peak-RSS mark used by the fine-tuning memory benchmark."""

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
