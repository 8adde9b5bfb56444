"""Start-up: pick the LLM backend (vLLM server launched here, an existing vLLM URL, or in-process transformers),
build the Recommender, open the event store, and run the FastAPI app with uvicorn.

Backend choice (`llm.backend`):
- `vllm`/`auto` with `llm.vllm_url`: use that OpenAI-compatible endpoint.
- `vllm`/`auto` with vllm importable by `llm.vllm_python` (default: this interpreter): launch
  `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with the base model and the adapters. On CPU with one
  adapter (`adapter_mode: auto`), the adapter is merged into the base (LoRA through vLLM-CPU is ~10x slower) and the
  merged folder is served under the adapter's name; otherwise `--enable-lora --lora-modules` in vLLM's JSON
  form (`{"name": ..., "path": ...}` per adapter).
- `auto` without vLLM: the in-process transformers backend; /health and the logs say so.
- `none`: no LLM; every answer is the collaborative fallback (degraded: true).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.util
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrec.config import ConfigError, llmrec_home
from llmrec.llm.base import BackendError
from llmrec.llm.loading import resolve_dtype
from llmrec.llm.vllm_backend import VLLM_CPU_ENV
from llmrec.service.config import ServiceConfig

log = logging.getLogger(__name__)


def _has_cuda() -> bool:
    """Whether this machine has an NVIDIA GPU: this interpreter's torch sees one, or the driver's device node exists
    (the vLLM interpreter, e.g. `.venv-vllm`, can have CUDA where the service's own torch is a CPU build)."""
    if Path("/dev/nvidiactl").exists():
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def python_has_vllm(python: str | None) -> bool:
    # compare without resolving symlinks: every venv's python links to the same base interpreter
    if python is None or Path(python).absolute() == Path(sys.executable).absolute():
        return importlib.util.find_spec("vllm") is not None
    try:
        probe = "import importlib.util,sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        r = subprocess.run([python, "-c", probe], capture_output=True, timeout=60)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def port_in_use(host: str, port: int) -> bool:
    """Whether `host:port` cannot be bound because something holds it (bound as uvicorn and vLLM bind: with
    SO_REUSEADDR, so a port in TIME_WAIT counts as free). Other bind errors (an address that is not this machine's)
    are left to the server to report."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def _vllm_python_desc(python: str | None) -> str:
    """The interpreter `python_has_vllm` looked in, resolved: a relative llm.vllm_python is relative to the folder
    the service was started from, not to its config file."""
    if python is None or Path(python).absolute() == Path(sys.executable).absolute():
        return f"this interpreter, {sys.executable}"
    where = Path(python).absolute()
    return f"llm.vllm_python: {where}" + ("" if where.exists() else ", which does not exist")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the service process dies, even by SIGKILL (Linux prctl). The
    signal follows the *thread* that started the child, so `VLLMServer.start()` belongs in a long-lived thread."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class VLLMServer:
    """A vLLM OpenAI-compatible server subprocess on loopback; `start()` waits for /health, `stop()` ends it."""

    def __init__(self, model: str, port: int = 8011, host: str = "127.0.0.1", served_name: str | None = None,
                 lora_modules: dict[str, str] | None = None, python: str | None = None, dtype: str = "fast",
                 max_model_len: int = 2048, extra_args: list[str] | None = None, log_path: Path | None = None,
                 max_lora_rank: int = 64):
        self.model, self.port, self.host = model, port, host
        self.url = f"http://{host}:{port}/v1"
        cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", host, "--port", str(port), "--dtype", resolve_dtype(dtype),
               "--max-model-len", str(max_model_len)]
        if served_name:
            cmd += ["--served-model-name", served_name]
        if lora_modules:
            cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--lora-modules"]
            # vLLM's JSON form: its `name=path` form is taken for JSON when the path holds a comma
            cmd += [json.dumps({"name": n, "path": str(p)}) for n, p in lora_modules.items()]
        self.cmd = cmd + list(extra_args or [])
        self.log_path = log_path or (llmrec_home() / "logs" / f"vllm-{port}.log")
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None
        self._stopped = False

    def start(self, timeout_s: float = 600.0) -> VLLMServer:
        """Launch the server and wait for its /health (at most `timeout_s`). `BackendError` when the port is taken
        (before anything is launched), when the server exits before it is up, or after `timeout_s`; each names the
        log file. Whatever of the server's session was started is ended on any failure, Ctrl-C included."""
        from llmrec.service.client import wait_until_up

        if port_in_use(self.host, self.port):
            # a server already there would answer /health for this one, which would then die on the bind
            raise BackendError(f"vLLM server: {self.host}:{self.port} is already in use (another vLLM server, or "
                               "another replica's?): give each replica its own llm.vllm_port, or use the server "
                               "that is there with llm.vllm_url")
        env = dict(os.environ)
        if not _has_cuda():
            for k, v in VLLM_CPU_ENV.items():
                env.setdefault(k, v)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM: %s (log: %s)", shlex.join(self.cmd), self.log_path)
        t0 = time.perf_counter()
        with self.log_path.open("ab") as logf:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            wait_until_up(f"http://{self.host}:{self.port}/health", self.proc, timeout_s, name="vLLM server",
                          log_path=self.log_path)
        except (RuntimeError, TimeoutError) as e:  # exited early (the log's tail), or timed out (the log's path)
            self.stop()
            raise BackendError(str(e)) from None
        except BaseException:  # interrupted: nothing of its session may outlive the failure
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        log.info("vLLM server ready at %s after %.1fs", self.url, self.start_s)
        return self

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's session (the server, its EngineCore and workers), up to `grace_s` for the server
        to exit, then SIGKILL to whatever of the session is left: children that outlived it, also when the server
        itself had already died (a crash leaves its engine processes behind)."""
        if self.proc is None or self._stopped:
            return
        self._stopped = True
        pid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.killpg(pid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the whole session had ended
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("vLLM server (pid %d) did not exit after SIGKILL", pid)
        log.info("vLLM server stopped")

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *a: Any) -> None:
        self.stop()


def merged_dir(base: str, adapter: str) -> Path:
    """The cache folder of a merged adapter: `$LLMREC_HOME/models/merged/<run>-<hash of base and adapter paths>`.
    Fine-tuning names every adapter folder `adapter`, so the run folder names it; the hash keeps two adapters (or
    one adapter on two bases) from sharing, and re-merging, one folder."""
    ad = Path(adapter).resolve()
    key = hashlib.sha256(f"{Path(base).resolve()}\n{ad}".encode()).hexdigest()[:10]
    name = ad.parent.name if ad.name == "adapter" and ad.parent.name else ad.name
    return llmrec_home() / "models" / "merged" / f"{name}-{key}"


def merge_adapter(base: str, adapter: str, out: Path | None = None) -> Path:
    """Merge a LoRA adapter into its base once (`llmrec.llm.loading.merge_and_save`: a QLoRA adapter into the
    dequantized 4-bit base it was trained on); returns the merged folder, cached until the base, the adapter's
    weights or its base record change."""
    from llmrec.llm.loading import BASE_FILE, merge_and_save

    out = out or merged_dir(base, adapter)
    marker = out / ".merged-from"
    ad = Path(adapter)
    stamp = [str(Path(base).resolve()), str(ad.resolve())] + [
        f"{f.name} {f.stat().st_mtime_ns} {f.stat().st_size}"
        for f in (ad / "adapter_model.safetensors", ad / BASE_FILE) if f.is_file()]
    src = "\n".join(stamp) + "\n"
    if marker.is_file() and marker.read_text() == src:
        return out
    log.info("merging adapter %s into %s -> %s", adapter, base, out)
    merge_and_save(base, adapter, out, dtype="bfloat16")
    marker.write_text(src)
    return out


@dataclass
class BackendPlan:
    kind: str  # vllm-http | vllm-launch | transformers | none
    note: str
    model: str | None = None
    adapter_mode: str = "none"
    served: dict[str, str] = field(default_factory=dict)  # adapter name -> served model name (vLLM)


LIKELIHOOD_LORA = ("rank_mode: likelihood reads prompt log-probs, which crash a vLLM engine with LoRA enabled (vLLM "
                   "0.32 CPU); serve one adapter merged (llm.adapter_mode: merged or auto), or use rank_mode: "
                   "verbalizer, or the transformers backend")


# vLLM flags the launcher sets from the config: the same flag in llm.vllm_extra_args would win (argparse keeps the
# last) and leave the launcher waiting on another port, or asking for a model name the server does not serve, or
# serve another dtype / context length than the config (and --print-config) says
LAUNCHER_FLAGS = {"--model": "llm.model", "--host": "llm.vllm_host", "--port": "llm.vllm_port",
                  "--served-model-name": "llm.adapters", "--lora-modules": "llm.adapters", "--dtype": "llm.dtype",
                  "--max-model-len": "llm.max_model_len"}


def _qlora_adapters(llm: Any) -> list[str]:
    """Names of the registry's adapters trained on a 4-bit base (`llmrec_base.json`): fitted to that base's
    dequantized weights, not the original ones that vLLM's LoRA layers (or a plain base) would apply them to."""
    from llmrec.llm.base import BackendError
    from llmrec.llm.loading import adapter_base_quant

    out = []
    for name, path in llm.adapters.items():
        try:
            if adapter_base_quant(path) is not None:
                out.append(name)
        except BackendError as e:  # an unreadable llmrec_base.json: a config fault, reported as the others
            raise ConfigError(f"llm.adapters.{name}: {e}") from None
    return out


def _adapter_mode(llm: Any, vllm: bool = False) -> str:
    """merged | lora | none: `auto` merges exactly one adapter on a CPU machine (LoRA layers cost ~10x on vLLM-CPU,
    1.3x on transformers), keeps LoRA for several adapters or on a GPU. On vLLM (`vllm`) a QLoRA adapter is only
    served merged (into the dequantized base it was fitted to): `auto` merges a single one, and LoRA mode refuses
    them (vLLM's LoRA layers sit on the original weights)."""
    mode = llm.adapter_mode
    if mode == "auto":
        mode = "merged" if (len(llm.adapters) == 1 and not _has_cuda()) else ("lora" if llm.adapters else "none")
        if vllm and mode == "lora" and len(llm.adapters) == 1 and _qlora_adapters(llm):
            mode = "merged"
    if vllm and mode == "lora" and (qlora := _qlora_adapters(llm)):
        raise ConfigError(f"llm.adapters {qlora}: trained on a 4-bit base (QLoRA), which vLLM's LoRA layers would "
                          "replace by the original weights; serve one such adapter merged (llm.adapter_mode: merged "
                          "or auto), or several on the transformers backend (llm.backend: transformers)")
    if mode == "merged" and len(llm.adapters) != 1:
        raise ConfigError("llm.adapter_mode: merged serves exactly one adapter; use lora for several (or none)")
    return mode


def resolved_batching(cfg: ServiceConfig, plan: BackendPlan) -> str:
    """none | micro. `auto`: micro on the in-process transformers backend (one model runs one batch at a time, so
    grouping concurrent requests' prompts doubled requests/s with explanations at concurrency 16), none on vLLM
    (its continuous batching merges concurrent calls; micro-batching was slightly slower there)."""
    if cfg.batching != "auto":
        return cfg.batching
    return "micro" if plan.kind == "transformers" else "none"


def plan_backend(cfg: ServiceConfig) -> BackendPlan:
    llm = cfg.llm
    if llm.backend == "none":
        return BackendPlan("none", "no LLM backend (llm.backend: none): the collaborative fallback answers, degraded")
    if llm.load_in_4bit:
        if llm.backend == "vllm" or (llm.backend == "auto" and llm.vllm_url):
            raise ConfigError("llm.load_in_4bit is for the transformers backend; vLLM quantizes with its own "
                              "options (llm.vllm_extra_args, e.g. --quantization bitsandbytes on a GPU)")
        if llm.adapter_mode == "merged":
            raise ConfigError("llm.adapter_mode: merged needs a full-precision base (merging into 4-bit weights "
                              "would re-quantize them); use lora or auto with llm.load_in_4bit")
        return BackendPlan("transformers", "llm.load_in_4bit: serving a 4-bit base on the in-process transformers "
                           "backend", llm.model, "lora" if llm.adapters else "none")
    if llm.vllm_url and llm.backend in ("auto", "vllm"):
        return BackendPlan("vllm-http", f"vLLM endpoint {llm.vllm_url}", llm.model,
                           served={n: n for n in llm.adapters})
    if llm.backend in ("auto", "vllm") and python_has_vllm(llm.vllm_python):
        for arg in llm.vllm_extra_args:  # appended after the launcher's own flags, where vLLM keeps the last one
            flag = str(arg).split("=", 1)[0].replace("_", "-")  # vLLM reads --served_model_name too
            if flag in LAUNCHER_FLAGS:
                raise ConfigError(f"llm.vllm_extra_args: {flag} is set by the launcher (from {LAUNCHER_FLAGS[flag]}); "
                                  "set that key instead")
        if llm.vllm_port == cfg.port:  # the launched server would take it first; the service would then fail to bind
            raise ConfigError(f"llm.vllm_port: {llm.vllm_port} is also the service's port (port); give the launched "
                              "vLLM server and each service replica ports of their own")
        mode = _adapter_mode(llm, vllm=True)
        if mode == "lora" and cfg.rank_mode == "likelihood":
            raise ConfigError(LIKELIHOOD_LORA)
        return BackendPlan("vllm-launch", f"vLLM server launched on {llm.vllm_host}:{llm.vllm_port} "
                           f"(adapters: {mode})", llm.model, mode, {n: n for n in llm.adapters})
    if llm.backend == "vllm":
        raise ConfigError("llm.backend: vllm requested but vllm is not installed (make setup-vllm, then set "
                          "llm.vllm_python: .venv-vllm/bin/python) and no llm.vllm_url is given; looked in "
                          f"{_vllm_python_desc(llm.vllm_python)}")
    why = ("llm.backend: transformers" if llm.backend == "transformers"
           else f"vLLM is not installed ({_vllm_python_desc(llm.vllm_python)})")
    note = f"{why}: serving on the in-process transformers backend"
    return BackendPlan("transformers", note, llm.model, _adapter_mode(llm))




# -------------------------------------------------------------------------------------------------------- wiring
@dataclass
class Runtime:
    """Everything `serve` built; `close()` stops what it started."""

    app: Any
    plan: BackendPlan
    backend: Any = None
    server: VLLMServer | None = None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def _model_path(cfg: ServiceConfig) -> str:
    if cfg.llm.model:
        return cfg.llm.model
    from llmrec.llm import default_model_path

    return str(default_model_path())


def build_backends(
    cfg: ServiceConfig, plan: BackendPlan
) -> tuple[dict[str | None, Any], VLLMServer | None, str | None]:
    """{adapter name or None (= default): backend}, the launched vLLM server (or None), the model name to report."""
    llm = cfg.llm
    if plan.kind == "none":
        return {}, None, None
    model = _model_path(cfg)
    if plan.kind == "transformers":
        from llmrec.llm import load_backend

        if plan.adapter_mode == "merged":  # one adapter, merged into the weights at load (as vLLM's merged mode)
            (name, path), = llm.adapters.items()
            be = load_backend("transformers", model=model, adapter=path, dtype=llm.dtype)
            return {None: be, name: be}, None, f"{be.model_name}+{name} (merged)"
        # one model in memory: every registry adapter is loaded into it by name, a view per adapter switches to it;
        # on the (dequantized) 4-bit base QLoRA adapters were trained on, when there are such
        qlora = _qlora_adapters(llm)
        like = {"base_of_adapter": llm.adapters[qlora[0]]} if qlora else {}
        base = load_backend("transformers", model=model, dtype=llm.dtype, load_in_4bit=llm.load_in_4bit, **like)
        out: dict[str | None, Any] = {None: base}
        for name, path in llm.adapters.items():
            out[name] = base.add_adapter(name, path)
        if llm.default_adapter:
            out[None] = out[llm.default_adapter]
        return out, None, base.model_name
    from llmrec.llm.vllm_backend import VLLMBackend

    if plan.kind == "vllm-http":
        be = VLLMBackend(url=llm.vllm_url, model=llm.model, timeout=llm.timeout_s)
        out = {None: be, **{n: be.with_adapter(n) for n in llm.adapters}}
        if llm.default_adapter:
            out[None] = out[llm.default_adapter]
        return out, None, be.model_name
    server_args = {"port": llm.vllm_port, "host": llm.vllm_host, "python": llm.vllm_python, "dtype": llm.dtype,
                   "max_model_len": llm.max_model_len, "extra_args": llm.vllm_extra_args}
    if plan.adapter_mode == "merged":
        (name, path), = llm.adapters.items()
        merged = str(merge_adapter(model, path))
        server = VLLMServer(merged, served_name=name, **server_args).start(llm.vllm_startup_timeout_s)
        try:
            be = VLLMBackend(url=server.url, model=name, tokenizer=merged, timeout=llm.timeout_s)
        except BaseException:
            server.stop()
            raise
        return {None: be, name: be}, server, f"{Path(model).name}+{name} (merged)"
    server = VLLMServer(model, lora_modules=llm.adapters or None, **server_args).start(llm.vllm_startup_timeout_s)
    try:
        be = VLLMBackend(url=server.url, model=model, timeout=llm.timeout_s)
    except BaseException:
        server.stop()
        raise
    out = {None: be, **{n: be.with_adapter(n) for n in llm.adapters}}
    if llm.default_adapter:
        out[None] = out[llm.default_adapter]
    return out, server, be.model_name


def build_recommenders(cfg: ServiceConfig, ds: Any, backends: dict[str | None, Any]) -> dict[str | None, Any]:
    """One `llmrec.ranking.Recommender` per backend view, sharing one retriever."""
    from llmrec.ranking import RankingConfig, Recommender
    from llmrec.ranking.factory import build_retriever, with_adapter_templates

    if cfg.rank_mode == "likelihood" and any(getattr(be, "_lora_engine", False) for be in backends.values()):
        raise ConfigError(LIKELIHOOD_LORA)  # e.g. an endpoint (llm.vllm_url) that lists LoRA modules
    retriever = build_retriever(ds, cfg.retriever)
    rcfg = RankingConfig(mode=cfg.rank_mode, n_candidates=cfg.candidates, like_threshold=cfg.like_threshold,
                         retrieval_weight=cfg.retrieval_weight, listings=cfg.listings,
                         exclude_seen_titles=cfg.exclude_seen_titles)
    recs: dict[str | None, Any] = {}
    made: dict[int, Any] = {}
    for name, be in backends.items():
        if id(be) not in made:
            adapter = name if name is not None else cfg.llm.default_adapter
            # render with the prompt templates the adapter was trained on (its llmrec_prompt.json)
            tcfg = with_adapter_templates(rcfg, cfg.llm.adapters.get(adapter) if adapter else None,
                                          model=cfg.llm.model)  # a merged model carries its adapter's templates
            rec = made[id(be)] = Recommender(ds, be, retriever, tcfg, adapter=adapter)
            try:  # the service ranks in this mode on every request: refuse at start, not with a 500 on each one
                rec.check_labels(cfg.rank_mode)
            except ValueError as e:
                raise ConfigError(f"candidates={cfg.candidates}: {e}") from None
        recs[name] = made[id(be)]
    return recs


def build_runtime(cfg: ServiceConfig) -> Runtime:
    from llmrec.data import load_prepared
    from llmrec.service.app import create_app
    from llmrec.store import EventStore

    t0 = time.perf_counter()
    plan = plan_backend(cfg)  # first: a refused llm setting must not have created (or filled) the event store
    log.info("backend: %s", plan.note)
    ds = load_prepared(cfg.dataset)
    from llmrec.ranking.recommender import like_threshold_of

    store = EventStore.from_dataset(ds, url=cfg.store_url, like_threshold=like_threshold_of(ds, cfg.like_threshold))
    backends: dict[str | None, Any] = {}
    server: Any = None
    try:  # from here on a failure (a vLLM server that does not start, a model that does not load) closes the store
        backends, server, model_name = build_backends(cfg, plan)
        batching = resolved_batching(cfg, plan) if backends else "none"
        recommenders = None
        if backends:
            from llmrec.service.batching import LockedBackend, MicroBatchingBackend

            wrapped: dict[int, Any] = {}
            for n, be in list(backends.items()):
                if id(be) not in wrapped:
                    if batching == "micro":
                        wrapped[id(be)] = MicroBatchingBackend(be, cfg.batch_max_size, cfg.batch_max_wait_ms)
                    elif plan.kind == "transformers":  # one model + fast tokenizer: not thread-safe
                        wrapped[id(be)] = LockedBackend(be)
                    else:  # vLLM: concurrent calls, the engine batches them (continuous batching)
                        wrapped[id(be)] = be
                backends[n] = wrapped[id(be)]
            recommenders = build_recommenders(cfg, ds, backends)

        def ready() -> dict[str, str]:
            if server is not None and (server.proc is None or server.proc.poll() is not None):
                return {"backend": "vLLM server exited"}
            if plan.kind in ("vllm-http", "vllm-launch"):
                import httpx

                url = (server.url if server is not None else cfg.llm.vllm_url or "").rstrip("/")
                url = url[: -len("/v1")] if url.endswith("/v1") else url
                try:
                    ok = httpx.get(f"{url}/health", timeout=3).status_code == 200
                except httpx.HTTPError:
                    ok = False
                return {"backend": "ok" if ok else f"vLLM endpoint {url} not healthy"}
            return {"backend": "ok"}

        # /health reports the batching in effect (auto resolved)
        cfg = dataclasses.replace(cfg, batching=batching)
        # at shutdown: the micro-batchers' worker threads, then the vLLM server (the app closes the store last)
        closers = [be.close for be in {id(b): b for b in backends.values()}.values()
                   if type(be).__name__ == "MicroBatchingBackend"]
        app = create_app(cfg, recommender=recommenders, store=store, catalogue=ds, backend_name=plan.kind,
                         backend_note=plan.note, model_name=model_name, ready_check=ready,
                         on_shutdown=closers + ([server.stop] if server else []))
    except BaseException:
        for be in backends.values():
            if type(be).__name__ == "MicroBatchingBackend":
                be.close()
        if server is not None:
            server.stop()
        store.close()
        raise
    for be in backends.values():
        if type(be).__name__ == "MicroBatchingBackend":
            be.metrics = app.state.metrics  # micro-batch sizes into /metrics
    log.info("service built in %.1fs", time.perf_counter() - t0)
    return Runtime(app=app, plan=plan, backend=backends.get(None), server=server)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as an exception, so that the clean-up of whatever is under way runs (the vLLM server's whole session
    is ended), as it does for Ctrl-C; further SIGTERMs are ignored so that they cannot cut that clean-up short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.info("SIGTERM: stopping")
    raise SystemExit(128 + signum)


def serve(cfg: ServiceConfig) -> None:
    import threading

    import uvicorn

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per vLLM call otherwise
    # the default SIGTERM action kills this process at once: during the start (a vLLM start takes a minute) nothing
    # would stop the server's engine processes. uvicorn handles SIGTERM itself while it serves, then restores this
    # handler and raises the signal again, which ends here too (after its graceful shutdown).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if port_in_use(cfg.host, cfg.port):  # found before the start, not by uvicorn minutes later
            raise ConfigError(f"port: {cfg.host}:{cfg.port} is already in use (another service, or another replica?):"
                              " give each replica its own port (--port)")
        rt = build_runtime(cfg)
        try:
            # access_log off: uvicorn's access log prints raw paths, which contain user ids
            uvicorn.run(rt.app, host=cfg.host, port=cfg.port, access_log=False, log_level="info")
        finally:
            rt.close()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
