"""Audit of `llmrec serve`'s vLLM launcher, the serving benchmark's load test and the kill test, with fakes only: a
tiny fake vLLM server script (and a fake interpreter that runs it), never the real vLLM or a real model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import fake_service

from llmrec.cli import main
from llmrec.config import ConfigError
from llmrec.llm.base import BackendError
from llmrec.service import launch
from llmrec.service.config import LLMConfig, ServiceConfig

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for `python -m vllm.entrypoints.openai.api_server`: reads --host/--port, optionally starts a child (its
# pid written to $FAKE_CHILD_PIDFILE; it ignores SIGTERM when $FAKE_CHILD_IGNORES_TERM is set), waits $FAKE_DELAY_S
# seconds (loading the model), then, by $FAKE_MODE:
# healthy (answers GET /health with 200), never (never listens), exit (prints an error and exits 1).
FAKE_VLLM = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys, time
    argv = sys.argv[1:]
    with open(os.environ.get("FAKE_ARGV_FILE", os.devnull), "w") as f:
        f.write("\\n".join(argv))
    host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    pidfile = os.environ.get("FAKE_CHILD_PIDFILE")
    if pidfile:
        ign = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if os.environ.get("FAKE_CHILD_IGNORES_TERM") else ""
        child = subprocess.Popen([sys.executable, "-c", f"import signal, time; {ign}time.sleep(300)"])
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.replace(pidfile + ".tmp", pidfile)
    time.sleep(float(os.environ.get("FAKE_DELAY_S", "0")))  # loading the model
    mode = os.environ.get("FAKE_MODE", "healthy")
    if mode == "exit":
        print("ValueError: fake engine failure", flush=True)
        sys.exit(1)
    if mode == "never":
        time.sleep(300)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer((host, port), H).serve_forever()
""")


def fake_server_cmd(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    return [sys.executable, str(script)]


def fake_vllm_python(tmp_path: Path) -> Path:
    """An "interpreter with vllm" for `llm.vllm_python`: python_has_vllm's `-c` probe succeeds, `-m vllm...` runs the
    fake server with the launcher's arguments."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    py = tmp_path / "fakepython"
    py.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\nshift 2\n'
                  f'exec "{sys.executable}" "{script}" "$@"\n')
    py.chmod(0o755)
    return py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped by its parent) is gone too
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def gone_within(pid: int, seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


def read_pid(path: Path, seconds: float = 30) -> int:
    end = time.time() + seconds
    while time.time() < end:
        if path.is_file():
            return int(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"no {path} within {seconds} s")


@contextlib.contextmanager
def reaping(*pids_files: Path):
    """Kill what a failing test left behind (the processes whose pids the files hold)."""
    try:
        yield
    finally:
        for f in pids_files:
            if f.is_file():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(f.read_text()), signal.SIGKILL)


@contextlib.contextmanager
def health_server(port: int):
    """Something else on `port` that answers GET /health with 200 (an earlier vLLM server, another replica's)."""

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------------------------------------ the vLLM server
def test_a_vllm_port_already_in_use_is_refused_before_anything_is_launched(tmp_path, monkeypatch):
    """Another server on llm.vllm_port (an earlier vLLM, another replica's) answers /health with 200: the launcher
    took that for its own server being up, while its own process failed to bind and died, and the service then
    ranked with whatever model the other server holds. It must refuse to launch, naming the port and the key."""
    port = free_port()
    argv_file = tmp_path / "argv"
    srv = launch.VLLMServer("unused", port=port, log_path=tmp_path / "vllm.log")
    srv.cmd = [*fake_server_cmd(tmp_path), *srv.cmd[3:]]
    monkeypatch.setenv("FAKE_ARGV_FILE", str(argv_file))
    monkeypatch.setenv("FAKE_DELAY_S", "3")  # a real server loads its model before it binds the port
    try:
        with health_server(port), pytest.raises(BackendError, match=rf"127\.0\.0\.1:{port} is already in use.*"
                                                                    r"llm\.vllm_port"):
            srv.start(timeout_s=20)
    finally:
        srv.stop()
    assert srv.proc is None and not argv_file.exists()  # nothing was started


def test_stop_ends_the_servers_children_after_the_server_itself_died(tmp_path, monkeypatch):
    """The api_server process can die while its engine processes live on (a crash after start-up): stop() returned
    at once because the server had exited, leaving its children running (and holding the memory of the model)."""
    pidfile = tmp_path / "child.pid"
    with reaping(pidfile):
        srv = launch.VLLMServer("unused", port=free_port(), log_path=tmp_path / "vllm.log")
        srv.cmd = [*fake_server_cmd(tmp_path), *srv.cmd[3:]]
        monkeypatch.setenv("FAKE_CHILD_PIDFILE", str(pidfile))
        srv.start(timeout_s=30)
        child = read_pid(pidfile)
        os.kill(srv.proc.pid, signal.SIGKILL)  # the server dies, its child does not
        srv.proc.wait(timeout=10)
        assert alive(child)
        srv.stop()
        assert gone_within(child, 5), "the dead server's child outlived stop()"


def test_stop_ends_children_that_outlive_the_servers_sigterm(tmp_path, monkeypatch):
    """A worker that ignores (or is slow to act on) SIGTERM outlived stop(): only the group leader was waited for."""
    pidfile = tmp_path / "child.pid"
    with reaping(pidfile):
        srv = launch.VLLMServer("unused", port=free_port(), log_path=tmp_path / "vllm.log")
        srv.cmd = [*fake_server_cmd(tmp_path), *srv.cmd[3:]]
        monkeypatch.setenv("FAKE_CHILD_PIDFILE", str(pidfile))
        monkeypatch.setenv("FAKE_CHILD_IGNORES_TERM", "1")
        srv.start(timeout_s=30)
        child = read_pid(pidfile)
        srv.stop(grace_s=10)
        assert srv.proc.poll() is not None
        assert gone_within(child, 5), "a child that ignored SIGTERM outlived stop()"
        srv.stop()  # twice (the app's shutdown hook, then Runtime.close): harmless


# ------------------------------------------------------------------------------------------------ `llmrec serve`
CLI = "import sys; from llmrec.cli import main; sys.exit(main())"


def serve_args(tmp_path: Path, fakepy: Path, vllm_port: int, *extra: str) -> list[str]:
    """`llmrec serve` on the tiny dataset with a fake vLLM interpreter (llm.backend: vllm), nothing else heavy: the
    vLLM server is launched before the retriever or a tokenizer is built."""
    return ["serve", "--dataset", "tiny", "--port", str(free_port()), "--set",
            f"store_url=sqlite:///{tmp_path / 'events.db'}", "llm.backend=vllm", f"llm.vllm_python={fakepy}",
            f"llm.vllm_port={vllm_port}", "llm.model=/no/such/model", *extra]


def test_sigterm_while_vllm_starts_leaves_none_of_its_processes(tmp_path, tiny_dataset, tiny_home):
    """`llmrec serve` got SIGTERM (systemd stop, docker stop, kill) during vLLM's start-up, which takes a minute: it
    died at once, without the cleanup of the start-up path, and the vLLM server's own children (EngineCore, workers)
    lived on; only the server got a signal (PR_SET_PDEATHSIG)."""
    fakepy, pidfile = fake_vllm_python(tmp_path), tmp_path / "child.pid"
    env = {**os.environ, "LLMREC_HOME": str(tiny_home), "FAKE_MODE": "never", "FAKE_CHILD_PIDFILE": str(pidfile)}
    with reaping(pidfile):
        proc = subprocess.Popen([sys.executable, "-c", CLI, *serve_args(tmp_path, fakepy, free_port())], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            child = read_pid(pidfile, 120)  # the fake server is up (and waiting) with its child
            time.sleep(1.5)  # the launcher is polling /health
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode != 0
        assert gone_within(child, 5), "the vLLM server's child outlived `llmrec serve`"
        assert b"Traceback" not in err, err.decode()[-2000:]


@pytest.mark.parametrize("mode", ["exit", "never"])
def test_a_vllm_server_that_fails_to_start_is_a_one_line_cli_error_naming_its_log(tmp_path, tiny_dataset, tiny_home,
                                                                                  monkeypatch, capsys, mode):
    """vLLM exiting at start (a bad flag, no memory, an engine crash) or never answering /health within
    llm.vllm_startup_timeout_s: `llmrec serve` ended with a Python traceback (RuntimeError / TimeoutError were not
    errors the CLI reports); it must be one `llmrec: error:` line naming the log file (and its tail on an exit)."""
    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    monkeypatch.setenv("FAKE_MODE", mode)
    vport = free_port()
    args = serve_args(tmp_path, fake_vllm_python(tmp_path), vport, "llm.vllm_startup_timeout_s=3")
    assert main(args) == 1
    err = capsys.readouterr().err
    log_path = tiny_home / "logs" / f"vllm-{vport}.log"
    assert err.startswith("llmrec: error: vLLM server") and str(log_path) in err, err
    want = "exited with code 1" if mode == "exit" else "did not answer 200 within 3 s"
    assert want in err, err
    if mode == "exit":
        assert "fake engine failure" in err  # the log's tail says why
    assert not launch.port_in_use("127.0.0.1", vport)  # nothing of it is left holding the port


def test_the_service_port_in_use_is_refused_before_the_long_start(monkeypatch, tmp_path):
    """A second replica on the same --port: uvicorn only found out after the whole start (vLLM server, adapter
    merge, retriever: minutes), then exited; the port is checked first, with the key to change."""
    built: list[int] = []
    monkeypatch.setattr(launch, "build_runtime", lambda cfg: built.append(1))
    port = free_port()
    with health_server(port), pytest.raises(ConfigError, match=rf"port: 127\.0\.0\.1:{port} is already in use"):
        launch.serve(ServiceConfig(port=port))
    assert built == []


def test_a_service_port_equal_to_the_vllm_port_is_a_config_error(monkeypatch):
    """`--port 8011` (a replica given the next free-looking port) with the launched vLLM on llm.vllm_port 8011: vLLM
    took the port first and the service failed to bind after the start; refused when the config is planned."""
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: True)
    c = ServiceConfig(port=8011, llm=LLMConfig(vllm_port=8011))
    with pytest.raises(ConfigError, match="llm.vllm_port: 8011 is also the service's port"):
        launch.plan_backend(c)
    assert launch.plan_backend(ServiceConfig(port=8012, llm=LLMConfig(vllm_port=8011))).kind == "vllm-launch"
    # an existing endpoint or the in-process backend launch nothing on llm.vllm_port
    assert launch.plan_backend(ServiceConfig(port=8011, llm=LLMConfig(vllm_url="http://h:8011/v1"))).kind
    assert launch.plan_backend(ServiceConfig(port=8011, llm=LLMConfig(backend="transformers"))).kind


@pytest.mark.parametrize("extra, key", [(["--port", "9000"], "llm.vllm_port"), (["--port=9000"], "llm.vllm_port"),
                                        (["--host", "0.0.0.0"], "llm.vllm_host"), (["--model", "/m2"], "llm.model"),
                                        (["--served-model-name", "x"], "llm.adapters"),
                                        (["--lora-modules", "a=/a"], "llm.adapters"),
                                        (["--dtype", "float16"], "llm.dtype"),
                                        (["--max_model_len=4096"], "llm.max_model_len")])
def test_extra_args_that_would_undo_the_launchers_own_flags_are_refused(monkeypatch, extra, key):
    """llm.vllm_extra_args are appended after the launcher's flags, and vLLM's argparse keeps the last one: with
    `--port 9000` the server listened elsewhere while the launcher waited on llm.vllm_port for the whole start-up
    timeout (600 s); `--served-model-name` / `--model` made every request name a model the server does not serve."""
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: True)
    flag = extra[0].split("=")[0].replace("_", "-")
    with pytest.raises(ConfigError, match=rf"llm.vllm_extra_args: {flag} is set by the launcher \(from {key}\)"):
        launch.plan_backend(ServiceConfig(llm=LLMConfig(vllm_extra_args=extra)))


def test_tensor_parallel_and_other_vllm_flags_pass_through_unchanged(tmp_path, monkeypatch):
    """Tensor parallelism (or quantization, a rank above 64, ...) needs no code change: llm.vllm_extra_args reach the
    server verbatim, after the launcher's flags; paths with spaces stay one argument each."""
    monkeypatch.setattr(launch, "python_has_vllm", lambda python: True)
    extra = ["--tensor-parallel-size", "2", "--max-lora-rank", "128"]
    assert launch.plan_backend(ServiceConfig(llm=LLMConfig(vllm_extra_args=extra))).kind == "vllm-launch"
    srv = launch.VLLMServer("/models/my model", port=8011, lora_modules={"a": "/ad apters/a"}, extra_args=extra,
                            python="/py")
    assert srv.cmd[srv.cmd.index("--model") + 1] == "/models/my model"
    assert json.loads(srv.cmd[srv.cmd.index("--lora-modules") + 1]) == {"name": "a", "path": "/ad apters/a"}
    assert srv.cmd[-4:] == extra


def test_the_logged_vllm_command_can_be_run_again_with_paths_with_spaces(tmp_path, caplog):
    """The launch log line is the command to rerun by hand when vLLM fails; joined with spaces, a model folder with a
    space in its name read as two arguments."""
    import shlex

    srv = launch.VLLMServer("/models/my model", port=free_port(), lora_modules={"a": "/ad apters/a"},
                            log_path=tmp_path / "vllm.log")
    srv.cmd = [*fake_server_cmd(tmp_path), *srv.cmd[3:]]
    with caplog.at_level(logging.INFO, logger="llmrec.service.launch"), srv:
        pass
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("starting vLLM: "))
    logged = shlex.split(line.removeprefix("starting vLLM: ").rsplit(" (log: ", 1)[0])
    assert logged == srv.cmd


def test_the_fallback_to_transformers_names_the_interpreter_it_looked_in(tmp_path, monkeypatch):
    """serve/config.yaml names `.venv-vllm/bin/python`, relative to the working folder: `llmrec serve` started from
    another folder quietly served on transformers with the note "vLLM is not installed" (it is, in the checkout);
    the note (logged, and in /health) and the `backend: vllm` error must name the interpreter looked for."""
    monkeypatch.chdir(tmp_path)
    c = ServiceConfig(llm=LLMConfig(vllm_python=".venv-vllm/bin/python"))
    plan = launch.plan_backend(c)
    where = str(tmp_path / ".venv-vllm" / "bin" / "python")
    assert plan.kind == "transformers" and "vLLM is not installed" in plan.note
    assert where in plan.note and "does not exist" in plan.note, plan.note
    c.llm.backend = "vllm"
    with pytest.raises(ConfigError, match="vllm is not installed") as e:
        launch.plan_backend(c)
    assert where in str(e.value)


# ------------------------------------------------------------------------------------------------ serve/*.py scripts
@pytest.fixture(scope="module")
def bench_serving(load_script):
    return load_script("serve/bench_serving.py")


@pytest.fixture(scope="module")
def kill_test(load_script):
    return load_script("serve/kill_test.py")


@contextlib.contextmanager
def status_service(respond):
    """GET /v1/users/<user>/recommendations answered by respond(user) -> status code (after any sleep it does)."""
    with fake_service(lambda user, query: (respond(user), json.dumps({"degraded": False}).encode())) as base:
        yield base


def test_load_run_throughput_counts_answered_requests_only(bench_serving):
    """requests_per_s divided every request, failed ones included, by the wall time: a service that fails half its
    requests at once looked as fast as one that answers them all. It is the 200 answers per second (the same figure
    whenever every answer is a 200, as in every published row)."""

    def respond(user):
        if user.startswith("ok"):
            time.sleep(0.2)
            return 200
        return 500

    users = [f"ok{i}" for i in range(4)] + [f"fail{i}" for i in range(4)]
    with status_service(respond) as base:
        r = bench_serving.load_run(base, users, 1, 10.0)
    assert r["status"] == {"200": 4, "500": 4} and r["errors"] == 4
    assert r["requests_per_s"] == pytest.approx(4 / r["wall_s"]), r
    with status_service(lambda user: 200) as base:
        r = bench_serving.load_run(base, users, 2, 10.0)
    assert r["requests_per_s"] == pytest.approx(8 / r["wall_s"])


@pytest.mark.parametrize("script", ["bench", "kill"])
def test_an_interrupted_service_start_leaves_no_service_running(script, bench_serving, kill_test, tmp_path,
                                                                tiny_dataset, tiny_home, monkeypatch):
    """Ctrl-C while the scripts wait for the service (up to 900 s with vLLM): the service runs in its own session,
    so the terminal's SIGINT never reaches it, and only a TimeoutError stopped it: it ran on, holding its port."""
    import llmrec.service.client as client

    procs: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            procs.append(self)

    def interrupted(*a, **kw):
        time.sleep(0.5)
        raise KeyboardInterrupt

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    monkeypatch.setattr(subprocess, "Popen", Recorded)
    monkeypatch.setattr(client, "wait_until_up", interrupted)
    port = free_port()
    try:
        with pytest.raises(KeyboardInterrupt):
            if script == "bench":
                bench_serving.start_service(["dataset=tiny", "llm.backend=none", "retriever=itemcf",
                                             f"store_url=sqlite:///{tmp_path / 'e.db'}"], port, tmp_path / "log")
            else:
                kill_test.start_service("tiny", tmp_path / "e.db", port, tmp_path / "log")
        assert len(procs) == 1
        assert procs[0].poll() is not None, "the service outlived the interrupted start"
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def test_kill_test_fails_when_the_kill_missed_the_event_stream(tiny_dataset, tiny_home):
    """The kill test claims that acknowledged events survive a SIGKILL *during* a stream of events. With few events
    (or a late --kill-after) the stream had ended before the kill, or with an early one no event was acknowledged:
    every check held vacuously and the script reported passed (exit 0), testing nothing."""
    env = {**os.environ, "LLMREC_HOME": str(tiny_home)}
    r = subprocess.run([sys.executable, str(ROOT / "serve" / "kill_test.py"), "--dataset", "tiny", "--events", "5",
                        "--workers", "1", "--kill-after", "2", "--no-write"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("{'dataset'")), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-2000:]
    import ast

    result = ast.literal_eval(line)
    assert result["sent"] == result["acknowledged_201"] == 5  # all acknowledged before the kill
    assert result["passed"] is False and r.returncode == 1, result
    assert result["kill_inside_stream"] is False and "did not fall inside the stream" in r.stdout


def test_a_refused_backend_config_changes_nothing(tmp_path, tiny_dataset, tiny_home, monkeypatch):
    """`llm.backend: vllm` without vLLM (or another refused llm setting) was found only after the event store had
    been created and filled with the whole dataset (and the dataset prepared, on first use): a refused config must
    leave no file behind."""
    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    db = tmp_path / "events.db"
    cfg = ServiceConfig(dataset="tiny", store_url=f"sqlite:///{db}",
                        llm=LLMConfig(backend="vllm", vllm_python=str(tmp_path / "no-python")))
    with pytest.raises(ConfigError, match="vllm is not installed"):
        launch.build_runtime(cfg)
    assert not db.exists()


def test_a_vllm_start_that_fails_closes_the_event_store(tmp_path, tiny_dataset, tiny_home, monkeypatch):
    """`build_backends` ran before the `try` that closes the event store on a failed start: when the vLLM server did
    not start (or the model did not load), a library caller of `build_runtime` was left with the store's connection
    pool open. The store must be closed, and the start's own error must reach the caller."""
    from llmrec.store import EventStore

    monkeypatch.setenv("LLMREC_HOME", str(tiny_home))
    monkeypatch.setattr(launch, "plan_backend", lambda cfg: launch.BackendPlan("vllm-launch", "fake", "/m"))

    def failed_start(cfg, plan):
        raise RuntimeError("vLLM server exited with code 1")

    monkeypatch.setattr(launch, "build_backends", failed_start)
    closed: list[EventStore] = []
    real_close = EventStore.close
    monkeypatch.setattr(EventStore, "close", lambda self: closed.append(self) or real_close(self))
    cfg = ServiceConfig(dataset="tiny", store_url=f"sqlite:///{tmp_path / 'events.db'}")
    with pytest.raises(RuntimeError, match="exited with code 1"):
        launch.build_runtime(cfg)
    assert len(closed) == 1


def test_ctrl_c_while_serving_ends_without_a_traceback(monkeypatch, capsys):
    """uvicorn re-raises SIGINT after its graceful shutdown: `llmrec serve` used to end on a KeyboardInterrupt
    traceback; it now says it stopped and exits 130 (the shell's code for SIGINT)."""
    import llmrec.service.launch as launch
    from llmrec.cli import main

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "serve", interrupted)
    assert main(["serve", "--no-llm"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_gpu_is_seen_by_its_driver_when_the_services_torch_is_a_cpu_build(monkeypatch):
    """The service's .venv can hold CPU torch while .venv-vllm has CUDA: `_has_cuda` asked only this interpreter's
    torch, so on a GPU machine the launcher set vLLM's CPU variables and merged adapters as on a CPU. The driver's
    device node now counts too."""
    import torch

    import llmrec.service.launch as launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: True if str(self) == "/dev/nvidiactl" else real_exists(self))
    assert launch._has_cuda() is True
    monkeypatch.setattr(Path, "exists", lambda self: False if str(self) == "/dev/nvidiactl" else real_exists(self))
    assert launch._has_cuda() is False


def test_an_adapter_path_with_a_comma_or_equals_sign_reaches_vllm_whole():
    """`--lora-modules name=path` is read by vLLM as JSON when the item holds a comma (a path like
    /runs/lr=1e-4,r=8/adapter failed to parse): the launcher passes vLLM's JSON form."""
    import llmrec.service.launch as launch

    path = "/runs/lr=1e-4,r=8/adapter"
    srv = launch.VLLMServer("/m", port=8011, lora_modules={"tuned": path, "b": "/x"}, python="/py")
    i = srv.cmd.index("--lora-modules")
    got = [json.loads(a) for a in srv.cmd[i + 1 : i + 3]]
    assert got == [{"name": "tuned", "path": path}, {"name": "b", "path": "/x"}]


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--events", "0"], ["--kill-after", "-1"],
                                  ["--kill-after", "nan"]])
def test_kill_test_refuses_a_run_that_could_test_nothing_before_starting_the_service(kill_test, monkeypatch,
                                                                                     capsys, argv):
    monkeypatch.setattr(kill_test, "start_service", lambda *a, **k: pytest.fail("a service was started"))
    monkeypatch.setattr("llmrec.data.load_prepared", lambda *a, **k: pytest.fail("the dataset was read"))
    monkeypatch.setattr(sys, "argv", ["kill_test.py", *argv])
    with pytest.raises(SystemExit) as e:
        kill_test.main()
    assert e.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_an_unknown_llm_dtype_is_refused_with_the_config(tmp_path):
    """`llm.dtype: foo` was accepted by the config and refused only when the model loaded, after the event store had
    been created and filled with the whole dataset."""
    import typing

    from llmrec.llm.loading import _DTYPES
    from llmrec.service.config import load_service_config

    assert set(typing.get_args(typing.get_type_hints(LLMConfig)["dtype"])) == set(_DTYPES)
    with pytest.raises(ConfigError, match=r"override llm.dtype: 'foo' is not one of \['fast'"):
        load_service_config(None, ["llm.dtype=foo", f"store_url=sqlite:///{tmp_path / 'e.db'}"], environ={})
    assert load_service_config(None, ["llm.dtype=float32"], environ={}).llm.dtype == "float32"
    assert not (tmp_path / "e.db").exists()
