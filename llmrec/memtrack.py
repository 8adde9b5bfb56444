"""Peak tensor memory on any device, the counterpart of `torch.cuda.max_memory_allocated` where there is none (CPU).

Process RSS (`llmrec.bench_utils.peak_rss_mb`) counts everything a CPU process holds: the Python and torch runtime,
libraries, allocator caches and fragmentation, ~0.5 GB before a 135M model is even loaded. A GPU figure such as
QLoRA's "memory" is the bytes of live tensors. `TensorMemory` measures that on the CPU: a dispatch mode that sees the
output of every op dispatched through torch (autograd's backward ops and registered custom ops such as
bitsandbytes' included), adds the bytes of each new storage and subtracts them when the storage is freed.

    base = tensor_storages(model)              # parameters, buffers, 4-bit quantization state
    with TensorMemory(base) as tm:
        loss = model(**batch).loss; loss.backward(); optimizer.step()
    tm.peak_bytes                              # base + the peak of what the ops allocated on top

What it does not see: memory a kernel or C extension allocates for itself inside an op, and tensors made while it
was off (those are in `base` only when passed). A view shares its base's storage and costs nothing; an in-place op,
nothing. So it is a lower bound. `eval/memtrack_check.py` compares it with RSS (every allocation of 64 KiB or more
mapped on its own, so RSS follows what is live; after a warm-up call): a training forward of the 135M decoder at
batch 4 peaks at 824 MB of tensors and 829 MB of RSS growth, 56 vs 59 MB with gradient checkpointing; the same forward
through the LM head with an int `logits_to_keep` held 210 MB that no tensor accounts for (hence the index tensor in
`llmrec.finetune.data.answer_only_loss`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of a tensor's storage; None for a storage without data (meta, fake, empty)."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
        return None
    ptr = st.data_ptr()
    return (ptr, st.nbytes()) if ptr else None


def tensor_storages(*objs: Any) -> dict[int, int]:
    """{data pointer: bytes} of the distinct storages held by models (parameters, buffers and the bitsandbytes 4-bit
    quantization state: absmax, code, nested state), optimizers (their state) and plain tensors."""
    out: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            key = _storage_key(t)
            if key:
                out[key[0]] = key[1]

    def add_quant_state(qs: Any) -> None:
        if qs is None:
            return
        for name in ("absmax", "code"):
            add(getattr(qs, name, None))
        add_quant_state(getattr(qs, "state2", None))

    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                add(p)
                add_quant_state(getattr(p, "quant_state", None))
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    add(v)
        else:
            add(obj)
    return out


class TensorMemory(TorchDispatchMode):
    """Counts the bytes of live tensor storages while active (see the module docstring). `base`: storages that exist
    already ({data pointer: bytes}, from `tensor_storages`): counted in `base_bytes`, and not again when an op
    returns a view of them (a base storage freed and its address reused while active would be missed: pass what
    lives through the measured code, such as the model)."""

    def __init__(self, base: dict[int, int] | None = None):
        super().__init__()
        self.base_bytes = int(sum((base or {}).values()))
        self._live: dict[int, int] = dict.fromkeys(base or {}, 0)  # base storages: known, their bytes in base_bytes
        self.current_bytes = self.base_bytes
        self.peak_bytes = self.base_bytes
        self.allocations = 0
        self.untracked = 0

    def _free(self, ptr: int) -> None:
        self.current_bytes -= self._live.pop(ptr, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key is None or key[0] in self._live:
                continue
            ptr, n = key
            try:  # when the storage goes, its bytes go
                weakref.finalize(t.untyped_storage(), self._free, ptr)
            except TypeError:  # a storage that takes no weak reference: its end could not be seen, so not counted
                self.untracked += 1
                continue
            self._live[ptr] = n
            self.allocations += 1
            self.current_bytes += n
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def base_mb(self) -> float:
        return self.base_bytes / 2**20
