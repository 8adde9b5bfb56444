"""`llmrec.memtrack`: live tensor bytes counted by hand-computable cases, a 4-bit model's quantization state
included. The training run that records them is tested in test_finetune_run.py
(test_tensor_memory_of_a_4bit_run_and_its_results_file)."""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")

from llmrec.memtrack import TensorMemory, tensor_storages  # noqa: E402


def test_allocations_views_and_frees_by_hand():
    w = torch.ones(256)  # 1,024 bytes, there before: the base
    with TensorMemory(tensor_storages(w)) as tm:
        assert tm.base_bytes == tm.current_bytes == 1024
        x = torch.empty(1000)  # +4,000
        v, wv = x.view(10, 100), w.view(16, 16)  # views share storages: +0
        x.add_(1)  # in place: +0
        assert tm.current_bytes == 5024
        y = x * 2  # +4,000
        assert tm.current_bytes == tm.peak_bytes == 9024
        del x, v, wv
        gc.collect()
        assert tm.current_bytes == 5024  # x's storage freed once its last view went
        del y
        assert tm.current_bytes == 1024 and tm.peak_bytes == 9024 and tm.allocations == 2
    assert tm.peak_mb == pytest.approx(9024 / 2**20) and tm.base_mb == pytest.approx(1024 / 2**20)


def test_tensor_storages_counts_shared_storages_once_and_optimizer_state():
    emb = torch.nn.Embedding(10, 8)  # 320 bytes
    head = torch.nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied: one storage
    model = torch.nn.Sequential(emb, head, torch.nn.BatchNorm1d(4))  # + 4 x 4 x 4 bytes of params/buffers + 8
    assert sum(tensor_storages(model).values()) == 320 + 2 * 16 + 2 * 16 + 8
    opt = torch.optim.Adam(head.parameters())
    head(torch.ones(2, 8)).sum().backward()
    opt.step()  # exp_avg + exp_avg_sq (320 each) + the step count (a 4-byte float32 scalar)
    assert sum(tensor_storages(opt).values()) == 2 * 320 + 4


def test_backward_and_an_optimizer_step_are_counted():
    lin = torch.nn.Linear(64, 32, bias=False)  # 8,192 bytes
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    x = torch.ones(4, 64)
    with TensorMemory(tensor_storages(lin, x)) as tm:
        lin(x).sum().backward()
        opt.step()
    # at least the weight's gradient and its momentum buffer (8,192 each) were alive at the end
    assert tm.current_bytes >= tm.base_bytes + 2 * 8192
    assert tm.peak_bytes >= tm.current_bytes


def test_a_4bit_models_quantization_state_is_counted():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.load_state_dict({"weight": torch.randn(64, 64)})
    lin = lin.to("cpu")  # quantizes
    w = lin.weight
    packed = w.numel() * w.element_size()
    assert packed == 64 * 64 // 2  # two nf4 values per byte
    qs = w.quant_state
    state = qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
    if qs.state2 is not None:
        state += sum(t.numel() * t.element_size() for t in (qs.state2.absmax, qs.state2.code))
    assert sum(tensor_storages(lin).values()) == packed + state
