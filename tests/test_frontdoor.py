"""The front door: a real HAProxy on 127.0.0.1 in front of real HTTP backends."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from projects import take_ctrl_c

from pipeline.errors import ToolError, UsageError
from pipeline.targets.local import frontdoor
from pipeline.targets.local.frontdoor import FrontDoor, HealthCheck

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None,
    reason="HAProxy is not installed",
)

REPO = Path(__file__).resolve().parent.parent

# Fast checks keep the suite short; the default of 1 s would make a DOWN take seconds.
FAST = HealthCheck(interval=0.1, rise=2, fall=2)


class Backend:
    """An instance stand-in: answers its name on any path, and /healthz; can turn to 503.

    `keep_alive`: HTTP/1.1, each connection kept open for further requests until it has been
    idle for 10 s; otherwise HTTP/1.0, one request each.
    """

    def __init__(self, name: str, *, keep_alive: bool = False) -> None:
        self.name = name
        self.failing = False
        self.hits = 0  # requests other than health checks
        self._lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            if keep_alive:
                protocol_version = "HTTP/1.1"
                timeout = 10

            def do_GET(self) -> None:
                if self.path != "/healthz":
                    with backend._lock:
                        backend.hits += 1
                status = 503 if backend.failing else 200
                body = backend.name.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                # HAProxy ends each health check with a reset; that is not this test's concern.
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Probe(threading.Thread):
    """Hits the front door every 10 ms; counts answers by status, and connection errors."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.results: Counter[str] = Counter()
        self.failures: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                status, _ = get(self.port)
                self.results[str(status)] += 1
                if status != 200:
                    self.failures.append(f"HTTP {status}")
            except OSError as exc:
                self.results["error"] += 1
                self.failures.append(repr(exc))
            self._done.wait(0.01)

    def finish(self) -> None:
        self._done.set()
        self.join()


def get(port: int, path: str = "/") -> tuple[int, str]:
    # http.client, not urllib: no proxy from the environment may come between.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def answers(port: int, count: int) -> Counter[str]:
    """Who answered `count` requests, as "name" for a 200 and "HTTP nnn" otherwise."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        status, body = get(port)
        seen[body if status == 200 else f"HTTP {status}"] += 1
    return seen


def haproxy_pids(folder: Path) -> list[int]:
    """Live processes whose command line names `folder` (zombies have none)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(folder).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def backends() -> Iterator[Callable[[str], Backend]]:
    started: list[Backend] = []

    def start(name: str, **options: Any) -> Backend:
        backend = Backend(name, **options)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A front door's folder; whatever HAProxy the test left there is stopped."""
    path = (tmp_path / "fd").resolve()
    yield path
    if (path / "frontdoor.json").exists():
        FrontDoor(path, name="web").stop()
    for pid in haproxy_pids(path):
        os.kill(pid, 9)


def test_serves_all_backends_and_keeps_its_address_across_runs(folder, backends):
    a, b = backends("a"), backends("b")
    door = FrontDoor(folder, name="web", health=FAST)
    door.apply({"a": a.port, "b": b.port})

    assert door.running()
    assert set(answers(door.port, 6)) == {"a", "b"}
    assert door.servers() == {"a": "UP", "b": "UP"}

    # A later pipeline run adopts the running front door from its folder alone.
    adopted = FrontDoor(folder, name="web", health=FAST)
    assert adopted.url == door.url
    assert adopted.running()
    master = (folder / "haproxy.pid").read_text()
    adopted.apply({"b": b.port})
    assert (folder / "haproxy.pid").read_text() == master  # a reload, not a second HAProxy
    assert adopted.servers() == {"b": "UP"}

    adopted.stop()
    assert not adopted.running()
    restarted = FrontDoor(folder, name="web", health=FAST)
    assert restarted.url == door.url
    restarted.apply({"a": a.port})
    assert set(answers(restarted.port, 3)) == {"a"}


def test_a_new_server_takes_traffic_at_once(folder, backends):
    a, b = backends("a"), backends("b")
    # Slow checks: a server that had to pass `rise` checks first would wait 2 x 5 s.
    door = FrontDoor(folder, name="web", health=HealthCheck(interval=5.0))
    door.apply({"a": a.port})

    door.apply({"a": a.port, "b": b.port})

    assert door.servers()["b"] == "UP"
    assert answers(door.port, 4)["b"] >= 1


@pytest.mark.parametrize("keep_alive", [False, True], ids=["http1.0", "kept-alive"])
def test_reloads_drop_no_request(folder, backends, keep_alive):
    pool = {name: backends(name, keep_alive=keep_alive) for name in ("a", "b", "c", "d", "e", "f")}
    door = FrontDoor(folder, name="web", health=FAST)
    live = {"a": pool["a"].port, "b": pool["b"].port}
    door.apply(live)
    probe = Probe(door.port)
    probe.start()

    try:
        steps = [("add", "c"), ("add", "d"), ("remove", "a"), ("same", ""), ("remove", "b"),
                 ("add", "e"), ("same", ""), ("remove", "c"), ("add", "f"), ("remove", "d"),
                 ("same", "")]  # fmt: skip
        for action, name in steps:
            time.sleep(0.15)
            if action == "add":
                live[name] = pool[name].port
            elif action == "remove":
                del live[name]
            door.apply(dict(live))
            if action == "remove":
                # Requests still in flight to it are finished before it goes away.
                door.drain()
                pool[name].close()
        time.sleep(0.3)
    finally:
        probe.finish()

    print(f"probe: {dict(probe.results)} over {len(steps)} reloads")
    assert probe.failures == []
    assert probe.results["200"] > 50
    assert door.servers() == {"e": "UP", "f": "UP"}
    assert pool["f"].hits > 0


def test_a_body_one_client_leaves_unread_never_reaches_another_clients_request(folder, backends):
    """An instance that keeps connections open and never reads a GET's body (as Python's
    http.server does not) finds the body at the start of that connection's next request. That
    next request must be the same client's: HAProxy's default `http-reuse safe` never sends
    another client's first request over it. With `http-reuse always`, the probe right after
    got HTTP 501 ("helloGET" is no method)."""
    a = backends("a", keep_alive=True)
    door = FrontDoor(folder, name="web", health=HealthCheck(interval=5.0))
    door.apply({"a": a.port})

    seen: Counter[str] = Counter()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", door.port), timeout=5) as client:
            client.sendall(
                b"GET / HTTP/1.1\r\nHost: door\r\nContent-Length: 5\r\n"
                b"Connection: close\r\n\r\nhello"
            )
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
        seen += answers(door.port, 4)
    assert seen == Counter({"a": 20})


def test_a_failing_backend_goes_down_and_gets_no_traffic(folder, backends):
    a, b = backends("a"), backends("b")
    door = FrontDoor(folder, name="web", health=FAST)
    door.apply({"a": a.port, "b": b.port})

    b.failing = True
    assert wait_for(lambda: door.servers()["b"] == "DOWN"), door.servers()
    b.hits = 0
    assert answers(door.port, 10) == Counter({"a": 10})
    assert b.hits == 0

    # A reload keeps it DOWN: it does not come back UP until it passes its checks.
    door.apply({"a": a.port, "b": b.port})
    assert door.servers() == {"a": "UP", "b": "DOWN"}
    assert answers(door.port, 10) == Counter({"a": 10})
    assert b.hits == 0


def test_a_refused_config_leaves_the_running_one_serving(folder, backends, monkeypatch):
    a, b = backends("a"), backends("b")
    door = FrontDoor(folder, name="web", health=FAST)
    door.apply({"a": a.port})
    config = (folder / "haproxy.cfg").read_text()

    with pytest.raises(UsageError, match="server name"):
        door.apply({"a": a.port, "b; server evil 10.0.0.1:80": b.port})
    with pytest.raises(UsageError, match="70000"):
        door.apply({"a": a.port, "b": 70000})
    with pytest.raises(UsageError, match="port"):
        door.apply({"a": a.port, "b": str(b.port)})  # type: ignore[dict-item]

    # A configuration that passes our checks but not HAProxy's is refused by `haproxy -c`.
    render = FrontDoor._render
    monkeypatch.setattr(FrontDoor, "_render", lambda self, s: render(self, s) + "    bogus\n")
    with pytest.raises(ToolError) as refused:
        door.apply({"a": a.port, "b": b.port})
    assert "haproxy.cfg.candidate" in str(refused.value)
    assert "bogus" in str(refused.value)

    assert (folder / "haproxy.cfg").read_text() == config
    assert door.servers() == {"a": "UP"}
    assert answers(door.port, 4) == Counter({"a": 4})


def test_a_taken_port_is_named_and_stop_leaves_no_process(folder, backends):
    a = backends("a")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        door = FrontDoor(folder, name="web", port=taken, health=FAST)
        with pytest.raises(frontdoor.PortTaken, match=f"127.0.0.1:{taken}"):
            door.apply({"a": a.port})
        assert not door.running()
        assert haproxy_pids(folder) == []

    door.apply({"a": a.port})
    assert haproxy_pids(folder) != []
    door.stop()
    assert wait_for(lambda: haproxy_pids(folder) == [])
    assert not (folder / "haproxy.pid").exists()
    assert not (folder / "admin.sock").exists()


def test_a_port_change_that_fails_keeps_the_address_that_serves(folder, backends):
    a = backends("a")
    door = FrontDoor(folder, name="web", health=FAST)
    door.apply({"a": a.port})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        moved = FrontDoor(folder, name="web", port=taken, health=FAST)
        with pytest.raises(frontdoor.PortTaken):
            moved.apply({"a": a.port})

        assert moved.url == door.url
        assert FrontDoor(folder, name="web", health=FAST).url == door.url
        assert answers(door.port, 3) == Counter({"a": 3})


def test_a_stale_pid_file_is_not_taken_for_haproxy(folder, backends):
    a = backends("a")
    door = FrontDoor(folder, name="web", health=FAST)
    (folder / "haproxy.pid").write_text(f"{os.getpid()}\n")

    assert not door.running()
    # Nothing is signalled: this test's own process is the pid on file.
    door.apply({"a": a.port})
    assert door.running()
    assert int((folder / "haproxy.pid").read_text()) != os.getpid()


def test_no_backends_answers_503(folder):
    door = FrontDoor(folder, name="web", health=FAST)
    door.apply({})
    assert door.servers() == {}
    assert get(door.port)[0] == 503


def test_only_loopback_ports_and_safe_names_are_accepted(tmp_path):
    with pytest.raises(UsageError):
        FrontDoor(tmp_path / "x", name="web prod")
    with pytest.raises(UsageError):
        FrontDoor(tmp_path / "x", name="web", port=0)
    with pytest.raises(UsageError):
        HealthCheck(path="/healthz # comment")
    door = FrontDoor(tmp_path / "x", name="web")
    with pytest.raises(UsageError, match="own port"):
        door.apply({"a": door.port})
    config = door._render({"a": 8080})
    assert f"bind 127.0.0.1:{door.port}\n" in config
    assert "server a 127.0.0.1:8080 " in config
    assert "\n    log " not in config
    assert frontdoor.ADDRESS == "127.0.0.1"


@pytest.mark.parametrize("how", ["KILL", "INT"])
def test_a_reload_killed_before_haproxy_was_told_is_made_by_the_next_apply(folder, backends, how):
    a, b = backends("a"), backends("b")
    FrontDoor(folder, name="web", health=FAST).apply({"a": a.port, "b": b.port})
    script = (
        "import sys; from pathlib import Path\n"
        "from pipeline.targets.local.frontdoor import FrontDoor, HealthCheck\n"
        "door = FrontDoor(Path(sys.argv[1]), name='web', health=HealthCheck(interval=0.1))\n"
        "door.apply({'b': int(sys.argv[2])})\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(b.port)],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PIPELINE_FAILPOINT": f"frontdoor.reload:{how}",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # A test run started in the background makes its children ignore SIGINT.
        preexec_fn=take_ctrl_c,
    )
    assert killed.returncode != 0, killed.stderr

    door = FrontDoor(folder, name="web", health=FAST)
    # Whatever the dead run left on disk, HAProxy still serves what it was last told.
    assert door.servers() == {"a": "UP", "b": "UP"}
    door.apply({"b": b.port})
    assert door.servers() == {"b": "UP"}
    assert set(answers(door.port, 4)) == {"b"}
