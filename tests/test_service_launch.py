"""Backend planning (vLLM launched / URL / transformers fallback / none), adapter modes, and `llmrec serve` CLI."""

from __future__ import annotations

import pytest

from llmrec.cli import main
from llmrec.config import ConfigError
from llmrec.service import launch
from llmrec.service.config import LLMConfig, ServiceConfig


def cfg(**llm) -> ServiceConfig:
    return ServiceConfig(llm=LLMConfig(**llm))


class FakeBackend:
    """What `llmrec.llm.load_backend` returns in these tests: records loads and adapter loads in `calls`."""

    model_name = "m"

    def __init__(self, calls):
        self.calls = calls

    def add_adapter(self, name, path):
        self.calls.append(("add_adapter", name, path))
        return f"view:{name}"


def fake_load_backend(monkeypatch) -> list:
    import llmrec.llm

    calls: list = []
    monkeypatch.setattr(llmrec.llm, "load_backend", lambda kind, **kw: calls.append((kind, kw)) or FakeBackend(calls))
    return calls


def test_plan_without_vllm_falls_back_to_transformers(monkeypatch):
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: False)
    plan = launch.plan_backend(cfg(backend="auto"))
    assert plan.kind == "transformers" and "vLLM is not installed" in plan.note
    with pytest.raises(ConfigError, match="vllm is not installed"):
        launch.plan_backend(cfg(backend="vllm"))
    assert launch.plan_backend(cfg(backend="none")).kind == "none"


def test_plan_url_and_adapter_modes(monkeypatch):
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: True)
    monkeypatch.setattr(launch, "_has_cuda", lambda: False)
    assert launch.plan_backend(cfg(vllm_url="http://127.0.0.1:9/v1")).kind == "vllm-http"
    one = launch.plan_backend(cfg(adapters={"yesno": "/a"}))
    assert one.kind == "vllm-launch" and one.adapter_mode == "merged"  # CPU + one adapter -> merged
    two = launch.plan_backend(cfg(adapters={"a": "/a", "b": "/b"}))
    assert two.adapter_mode == "lora"
    assert launch.plan_backend(cfg(adapters={"a": "/a"}, adapter_mode="lora")).adapter_mode == "lora"
    with pytest.raises(ConfigError, match="exactly one adapter"):
        launch.plan_backend(cfg(adapters={"a": "/a", "b": "/b"}, adapter_mode="merged"))
    monkeypatch.setattr(launch, "_has_cuda", lambda: True)
    assert launch.plan_backend(cfg(adapters={"yesno": "/a"})).adapter_mode == "lora"  # GPU: LoRA is cheap
    # title likelihood reads prompt log-probs, which kill a LoRA-enabled vLLM engine: refused before the launch
    likelihood = cfg(adapters={"a": "/a", "b": "/b"})
    likelihood.rank_mode = "likelihood"
    with pytest.raises(ConfigError, match="rank_mode: likelihood"):
        launch.plan_backend(likelihood)
    monkeypatch.setattr(launch, "_has_cuda", lambda: False)
    likelihood.llm.adapters = {"a": "/a"}  # one adapter, merged on CPU: allowed
    assert launch.plan_backend(likelihood).adapter_mode == "merged"


def test_likelihood_mode_refuses_an_endpoint_with_lora_modules(tiny_dataset):
    from types import SimpleNamespace

    c = cfg(vllm_url="http://127.0.0.1:9/v1")
    c.rank_mode = "likelihood"
    with pytest.raises(ConfigError, match="rank_mode: likelihood"):
        launch.build_recommenders(c, tiny_dataset, {None: SimpleNamespace(_lora_engine=True)})


def test_transformers_backend_merges_a_single_adapter_on_cpu(monkeypatch):
    """Without vLLM, one adapter on CPU is merged at load (one backend for it and for no-adapter requests, named as
    merged); several adapters, lora mode or a GPU keep LoRA layers in one shared model; merged needs one adapter."""
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: False)
    monkeypatch.setattr(launch, "_has_cuda", lambda: False)
    calls = fake_load_backend(monkeypatch)
    c = cfg(adapters={"yesno": "/a"}, model="/m", dtype="float32")
    plan = launch.plan_backend(c)
    assert plan.kind == "transformers" and plan.adapter_mode == "merged"
    backends, server, name = launch.build_backends(c, plan)
    assert server is None and backends[None] is backends["yesno"] and name == "m+yesno (merged)"
    assert calls == [("transformers", {"model": "/m", "adapter": "/a", "dtype": "float32"})]
    for c2 in (cfg(adapters={"a": "/a", "b": "/b"}), cfg(adapters={"a": "/a"}, adapter_mode="lora")):
        assert launch.plan_backend(c2).adapter_mode == "lora"
    assert launch.plan_backend(cfg()).adapter_mode == "none"
    with pytest.raises(ConfigError, match="exactly one adapter"):
        launch.plan_backend(cfg(adapter_mode="merged"))
    with pytest.raises(ConfigError, match="full-precision base"):
        launch.plan_backend(cfg(adapters={"a": "/a"}, adapter_mode="merged", load_in_4bit=True))
    monkeypatch.setattr(launch, "_has_cuda", lambda: True)
    assert launch.plan_backend(cfg(adapters={"yesno": "/a"})).adapter_mode == "lora"


def test_4bit_base_is_served_by_transformers_with_the_configured_dtype(monkeypatch):
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: True)  # even where vLLM could be launched
    c = cfg(load_in_4bit=True, dtype="float32", adapters={"yesno": "/a"}, model="/m")
    plan = launch.plan_backend(c)
    assert plan.kind == "transformers" and "4-bit" in plan.note
    for bad in (cfg(load_in_4bit=True, backend="vllm"), cfg(load_in_4bit=True, vllm_url="http://127.0.0.1:9/v1")):
        with pytest.raises(ConfigError, match="load_in_4bit is for the transformers backend"):
            launch.plan_backend(bad)
    calls = fake_load_backend(monkeypatch)
    backends, server, model_name = launch.build_backends(c, plan)
    assert server is None and backends["yesno"] == "view:yesno" and isinstance(backends[None], FakeBackend)
    assert model_name == "m"  # the backend's own model name
    # one model loaded, the adapter into it (not a second model per adapter)
    assert calls == [("transformers", {"model": "/m", "dtype": "float32", "load_in_4bit": True}),
                     ("add_adapter", "yesno", "/a")]


def test_python_without_vllm_is_detected(tmp_path):
    assert launch.python_has_vllm(str(tmp_path / "no-such-python")) is False


def test_serve_cli_print_config(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMREC_SERVE_API_KEY", "hidden")
    assert main(["serve", "--config", "serve/config.yaml", "--no-llm", "--port", "8555", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "port: 8555" in out and "backend: none" in out and "hidden" not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("prot: 1\n")
    assert main(["serve", "--config", str(bad), "--print-config"]) == 1
    assert "unknown key" in capsys.readouterr().err


def test_batching_auto_is_micro_on_transformers_and_none_on_vllm():
    """`batching: auto` groups concurrent requests itself only where the engine cannot (in-process transformers)."""
    from llmrec.service.launch import BackendPlan, resolved_batching

    for kind, want in (("transformers", "micro"), ("vllm-launch", "none"), ("vllm-http", "none")):
        assert resolved_batching(ServiceConfig(), BackendPlan(kind, "")) == want
    for explicit in ("none", "micro"):
        assert resolved_batching(ServiceConfig(batching=explicit), BackendPlan("transformers", "")) == explicit
        assert resolved_batching(ServiceConfig(batching=explicit), BackendPlan("vllm-launch", "")) == explicit


def test_merge_adapter_merges_once_on_the_adapters_own_base_and_again_when_it_changes(tmp_path):
    """The vLLM merged mode's folder: merged like `llmrec export --merge` (a QLoRA adapter into its dequantized
    4-bit base), reused while base and adapter are unchanged, merged again after the adapter was retrained."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("peft")
    from llm_fixtures import make_tiny_llm

    from llmrec.bench_utils import random_lora_adapter
    from llmrec.llm import load_backend
    from llmrec.llm.loading import QuantSettings, write_adapter_base

    base = make_tiny_llm(tmp_path / "base")
    ad = tmp_path / "adapter"
    random_lora_adapter(base, ad, r=4, target_modules=["q_proj", "v_proj"], std=0.5)
    write_adapter_base(ad, QuantSettings(load_in_4bit=True))
    out = launch.merge_adapter(str(base), str(ad), out=tmp_path / "merged")
    prompts, yn = ["The user liked Action Story 1. Answer:"], [" Yes", " No"]
    # merged and stored in bf16: the same as merging at load in bf16
    want = load_backend("transformers", model=base, adapter=ad, dtype="bfloat16").score_choices(prompts, yn)
    got = load_backend("transformers", model=out, dtype="bfloat16").score_choices(prompts, yn)
    np.testing.assert_allclose(got, want, atol=1e-3)
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert launch.merge_adapter(str(base), str(ad), out=tmp_path / "merged") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == first  # cached
    random_lora_adapter(base, ad, r=4, target_modules=["q_proj", "v_proj"], std=0.5, seed=1)  # retrained in place
    launch.merge_adapter(str(base), str(ad), out=tmp_path / "merged")
    assert (out / "model.safetensors").stat().st_mtime_ns != first


@pytest.mark.parametrize("mode", ["merged", "lora"])
def test_launched_vllm_server_is_stopped_when_the_backend_cannot_be_built(monkeypatch, mode):
    """A vLLM server the launcher started must not outlive a failure to build its client (tokenizer missing, ...),
    in the merged mode as in the lora mode."""
    import llmrec.llm.vllm_backend as vllm_backend

    stopped: list[int] = []

    class FakeServer:
        def __init__(self, model, **kw):
            self.url = "http://127.0.0.1:9/v1"

        def start(self, timeout_s):
            return self

        def stop(self):
            stopped.append(1)

    def broken_backend(*a, **kw):
        raise OSError("cannot load the tokenizer")

    monkeypatch.setattr(launch, "VLLMServer", FakeServer)
    monkeypatch.setattr(launch, "merge_adapter", lambda base, adapter: "/merged")
    monkeypatch.setattr(vllm_backend, "VLLMBackend", broken_backend)
    c = cfg(model="/m", adapters={"a": "/a"})
    with pytest.raises(OSError, match="tokenizer"):
        launch.build_backends(c, launch.BackendPlan("vllm-launch", "", "/m", mode))
    assert stopped == [1]


def test_merged_cache_folders_are_one_per_adapter_and_base(tmp_path, monkeypatch):
    """Every fine-tuning run names its adapter folder `adapter`: the merge cache is keyed by the run and a hash of the
    base and adapter paths, so two runs' adapters (or one adapter on two bases) neither share nor re-merge a folder."""
    monkeypatch.setenv("LLMREC_HOME", str(tmp_path / "home"))
    a, b = tmp_path / "yesno_run" / "adapter", tmp_path / "rank_run" / "adapter"
    da, db = launch.merged_dir("/m/base", str(a)), launch.merged_dir("/m/base", str(b))
    assert da.parent == db.parent == tmp_path / "home" / "models" / "merged"
    assert da.name.startswith("yesno_run-") and db.name.startswith("rank_run-") and da != db
    assert launch.merged_dir("/m/other", str(a)) != da
    assert launch.merged_dir("/m/base", str(a)) == da  # stable: the cache is found again
    assert launch.merged_dir("/m/base", str(tmp_path / "my-adapter")).name.startswith("my-adapter-")


def test_more_candidates_than_the_rank_letters_is_refused_at_start(tiny_dataset):
    """The service ranks by letter on every request: candidates above the rank template's 20 letters is a config
    error at start (naming the key), not a 500 on each request; in likelihood mode it is allowed."""
    from tests.test_ranking import ScriptedBackend

    c = cfg()
    c.candidates = 25
    with pytest.raises(ConfigError, match=r"candidates=25: RankingConfig.n_candidates=25 exceeds the 20 labels"):
        launch.build_recommenders(c, tiny_dataset, {None: ScriptedBackend()})
    c.rank_mode = "likelihood"
    assert launch.build_recommenders(c, tiny_dataset, {None: ScriptedBackend()})[None].cfg.n_candidates == 25


def test_a_server_that_exits_before_it_is_up_leaves_no_child_behind(tmp_path):
    """A vLLM server whose process exits before /health answers (a bad flag, an engine crash) may have started
    children in its session (EngineCore, workers): start() fails and kills them too."""
    import os
    import time

    pidfile = tmp_path / "child.pid"
    srv = launch.VLLMServer("unused", port=9, log_path=tmp_path / "vllm.log")
    srv.cmd = ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; sleep 0.5; exit 3"]
    with pytest.raises(RuntimeError, match="exited with code 3"):
        srv.start(timeout_s=30)
    child = int(pidfile.read_text())
    for _ in range(50):  # killed and reaped (by init) within moments
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        raise AssertionError("the server's child outlived the failed start")
