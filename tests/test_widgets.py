"""The live widgets, without a browser: state through ``get_state()``, lifecycle, no comm leak.

Producers are real (the resilience hub's ``CircuitBreaker`` with a fake clock, the checkpoint
manager, a real Session and its event bus, real ``MemorySample`` values); the memory sampler
and the pause between samples are injected so nothing sleeps.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import comm
import pytest
from ipywidgets.widgets import widget as ipw_widget
from IPython.core.error import UsageError

from kernel_ext.config import KernelExtConfig
from kernel_ext.memory import GpuSample, MemorySample
from kernel_ext.resilience import attach as attach_resilience
from kernel_ext.session import Session
from widgets import BreakerPanel, CheckpointPanel, Dashboard, MemoryPanel, open_dashboards
from fakes import FakeClock

GiB = 1024**3


def _own_listeners(session: Session) -> int:
    """Listeners the session itself keeps (its alerts); the dashboard must add none for good."""
    return len(session.alerts._unsubscribe)


# --- helpers -------------------------------------------------------------------------------------

class Sampler:
    """Real MemorySample values with a RAM figure the test controls."""

    def __init__(self, clock: FakeClock, gpus: int = 0) -> None:
        self.clock = clock
        self.ram_used = 4 * GiB
        self.gpus = gpus
        self.calls = 0
        self.fail_next = False

    def __call__(self) -> MemorySample:
        self.calls += 1
        if self.fail_next:
            self.fail_next = False
            raise OSError("probe failed")
        gpus = [GpuSample(i, f"Fake GPU {i}", 16 * GiB, (2 + i) * GiB, (14 - i) * GiB)
                for i in range(self.gpus)]
        return MemorySample(self.clock(), 16 * GiB, 16 * GiB - self.ram_used, self.ram_used,
                            GiB, gpus)


class Gate:
    """A waiter for the dashboard thread: one sample per ``step()``, no real sleeping."""

    def __init__(self) -> None:
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self.waits = 0

    def __call__(self, stop: threading.Event, seconds: float) -> bool:
        if self.waits:
            self._done.release()  # the tick before this wait has finished
        self.waits += 1
        while not stop.is_set():
            if self._go.acquire(timeout=0.01):
                return stop.is_set()
        return True

    def step(self) -> None:
        self._go.release()
        assert self._done.acquire(timeout=10), "the dashboard thread did not tick"


def html(w: Any) -> str:
    return str(w.get_state()["value"])


def state_of(panel: BreakerPanel, name: str) -> str:
    row = rf"<tr data-breaker='{re.escape(name)}' data-state='([a-z_]+)'"
    m = re.search(row, html(panel.table))
    assert m, html(panel.table)
    return m.group(1)


def widget_count() -> int:
    return len(ipw_widget._instances)


def comm_count() -> int:
    return len(comm.get_comm_manager().comms)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(KernelExtConfig(), None, state_dir=tmp_path)
    yield s
    s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dash(session: Session, clock: FakeClock) -> Iterator[Dashboard]:
    d = Dashboard(session, interval=0, sampler=Sampler(clock), clock=clock, monotonic=clock)
    yield d
    d.close()


# --- breaker panel -------------------------------------------------------------------------------
def test_breaker_panel_follows_every_transition_of_a_real_breaker(
    session: Session, dash: Dashboard, clock: FakeClock
) -> None:
    session.config.breaker_consecutive_failures = 2
    session.config.breaker_open_seconds = 30
    br = attach_resilience(session, clock=clock).breaker("local")  # publishes on the bus
    assert "no providers yet" in html(dash.breakers.table)
    dash.start()  # shows the breakers that exist already
    assert state_of(dash.breakers, "local") == "closed"
    assert "0 of 0" in html(dash.breakers.table)

    br.record_success()
    assert state_of(dash.breakers, "local") == "closed"
    assert "#2e7d32" in html(dash.breakers.table)  # green

    br.record_error(ConnectionError("refused"))
    assert state_of(dash.breakers, "local") == "closed"
    assert "1 of 2" in html(dash.breakers.table)  # failures in the window
    assert "50%" in html(dash.breakers.table)

    br.record_error(ConnectionError("refused again"))
    table = html(dash.breakers.table)
    assert state_of(dash.breakers, "local") == "open"
    assert "#c62828" in table  # red
    assert "ConnectionError: refused again" in table
    assert "30.0 s" in table or "30 s" in table  # next trial in
    assert re.search(r"<td[^>]*>1</td></tr>", table)  # trip count

    clock.advance(12)
    dash.tick()  # the live countdown
    assert dash.breakers.retry_in("local") == pytest.approx(18)
    assert "18 s" in html(dash.breakers.table)

    clock.advance(18)
    with pytest.raises(Exception):  # noqa: B017 - any call moves open -> half_open first
        br.call(lambda: (_ for _ in ()).throw(ConnectionError("still down")))
    assert state_of(dash.breakers, "local") == "open"  # the trial failed: open again
    assert re.search(r"<td[^>]*>2</td></tr>", html(dash.breakers.table))

    clock.advance(30)
    assert br.call(lambda: "ok") == "ok"  # trial succeeds
    assert state_of(dash.breakers, "local") == "closed"
    assert "–" in html(dash.breakers.table)  # no countdown when closed


def test_breaker_panel_shows_half_open_and_several_providers() -> None:
    panel = BreakerPanel(clock=FakeClock())
    try:
        panel.update({"name": "remote", "state": "half_open", "failures_in_window": 3,
                      "calls_in_window": 5, "failure_rate": 0.6, "retry_in": 0.0,
                      "last_error": "<TimeoutError>", "trip_count": 1})
        panel.update({"name": "local", "state": "closed", "failures_in_window": 0,
                      "calls_in_window": 1, "failure_rate": 0.0, "retry_in": None,
                      "last_error": None, "trip_count": 0})
        assert panel.states == {"remote": "half_open", "local": "closed"}
        table = html(panel.table)
        assert "half-open" in table and "#ef6c00" in table
        assert "&lt;TimeoutError&gt;" in table  # escaped
        assert table.index("data-breaker='local'") < table.index("data-breaker='remote'")
    finally:
        panel.close()


# --- memory panel --------------------------------------------------------------------------------
def test_memory_panel_shows_each_sample_limits_footprints_and_history(clock: FakeClock) -> None:
    panel = MemoryPanel(history_seconds=60)
    sampler = Sampler(clock, gpus=1)
    try:
        panel.update(sampler(), footprints={}, limits={"cpu": 12 * GiB, "cuda:0": 10 * GiB})
        devices = html(panel.devices)
        assert "4.0 GiB / 16.0 GiB (25%)" in devices
        assert "guard limit 12.0 GiB" in devices
        assert "kernel RSS 1.0 GiB" in devices
        assert "data-device='cuda:0'" in devices and "Fake GPU 0" in devices
        assert "2.0 GiB / 16.0 GiB" in devices
        assert "no model loaded" in html(panel.models)
        assert panel.readings["cpu"].over_limit is False

        for i in range(5):  # a leak: RAM grows every sample, past the guard's limit
            clock.advance(10)
            sampler.ram_used += 2 * GiB
            panel.update(sampler(), footprints={"gemma3-270m": 300 * 1024**2},
                         limits={"cpu": 12 * GiB})
        devices = html(panel.devices)
        assert "14.0 GiB / 16.0 GiB (88%)" in devices
        assert "data-device='cpu' data-over-limit='true'" in devices
        assert panel.readings["cpu"].over_limit
        models = html(panel.models)
        assert "gemma3-270m" in models and "300.0 MiB" in models

        history = html(panel.history)
        assert history.count("<svg") == 2  # RAM and the GPU
        assert "kernel-ext-limit" in history
        ram_line = re.search(r"data-series='ram_used'[^>]*points='([^']*)'", history)
        assert ram_line
        ys = [float(p.split(",")[1]) for p in ram_line.group(1).split()]
        assert len(ys) == 6 and ys == sorted(ys, reverse=True)  # rising line (y grows down)

        clock.advance(45)  # older points fall out of the 60 s window
        panel.update(sampler())
        assert panel.history_length == 3  # t = 1040, 1050, 1095
        assert panel.samples == 7
    finally:
        panel.close()


# --- checkpoint panel ----------------------------------------------------------------------------
def test_checkpoint_panel_follows_checkpoint_events(
    session: Session, dash: Dashboard, clock: FakeClock
) -> None:
    dash.start()
    assert "no checkpoint yet" in html(dash.checkpoints.body)
    status = {"last_time": clock() - 3, "size_bytes": 5 * 1024**2, "duration_s": 0.25,
              "tracked": ["df", "x"], "skipped": {"conn": "not serialisable (socket)",
                                                  "big": "over the size cap"},
              "last_failure": None}
    session.events.emit("checkpoint", action="committed", status=status)
    body = html(dash.checkpoints.body)
    assert "committed" in body and "5.0 MiB" in body and "0.25 s" in body
    assert "3.00 s ago" in body
    assert "tracked (2): df, x" in body
    assert "<code>conn</code>: not serialisable (socket)" in body
    assert "<code>big</code>: over the size cap" in body
    assert "last failure" not in body

    clock.advance(20)
    dash.tick()
    assert "23 s ago" in html(dash.checkpoints.body)

    failed = dict(status, last_failure="OSError: [Errno 28] No space left on device")
    session.events.emit("checkpoint", action="failed", status=failed)
    body = html(dash.checkpoints.body)
    assert "data-action='failed'" in body
    assert "last failure: OSError: [Errno 28] No space left on device" in body


def test_checkpoint_panel_alone_escapes_names() -> None:
    panel = CheckpointPanel(clock=FakeClock())
    try:
        panel.update({"tracked": ["<x>"], "skipped": {}, "last_time": None}, "skipped")
        assert "&lt;x&gt;" in html(panel.body)
        assert "never" in html(panel.body)
    finally:
        panel.close()


# --- dashboard lifecycle -------------------------------------------------------------------------
def test_dashboard_costs_nothing_until_displayed(session: Session, clock: FakeClock) -> None:
    sampler = Sampler(clock)
    before = session.events.listener_count()
    d = Dashboard(session, interval=1.0, sampler=sampler, clock=clock, monotonic=clock,
                  waiter=Gate())
    try:
        assert session.events.listener_count() == before
        assert d.thread is None and not d.live and sampler.calls == 0
        assert not [t for t in threading.enumerate() if t.name == "kernel_ext-dashboard"]

        bundle = d._repr_mimebundle_()  # what IPython's display does
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert d.live and d.thread is not None and d.thread.is_alive()
        assert session.events.listener_count() > before
        assert sampler.calls == 1  # shown with a first sample at once
    finally:
        d.close()
    assert not d.thread.is_alive()


def test_live_updates_from_the_thread_then_stop_after_close(
    session: Session, clock: FakeClock
) -> None:
    sampler = Sampler(clock)
    gate = Gate()
    d = Dashboard(session, interval=1.0, sampler=sampler, clock=clock, monotonic=clock,
                  waiter=gate)
    before = session.events.listener_count()
    d.start()
    for i in range(3):
        clock.advance(1)
        sampler.ram_used += GiB
        gate.step()
        assert d.ticks == 2 + i
        assert f"{5 + i}.0 GiB / 16.0 GiB" in html(d.memory.devices)
        assert f"data-ticks='{2 + i}'" in html(d.footer)
    assert d.thread is not None and d.thread.name == "kernel_ext-dashboard"

    d.close()
    assert not d.thread.is_alive()
    assert session.events.listener_count() == before
    assert session.events.listener_count("breaker") == 0
    assert session.events.listener_count("checkpoint") == 0
    calls = sampler.calls
    session.events.emit("checkpoint", action="committed", status={"tracked": ["late"]})
    session.events.emit("model", action="loaded", name="m", info={})
    assert sampler.calls == calls and d.ticks == 4


def test_session_close_stops_the_dashboard(session: Session, clock: FakeClock) -> None:
    d = Dashboard(session, interval=1.0, sampler=Sampler(clock), clock=clock, monotonic=clock,
                  waiter=Gate())
    try:
        d.start()
        assert d in open_dashboards(session)
        session.close()  # extension unload / kernel shutdown
        assert d.thread is not None and not d.thread.is_alive()
        assert not d.live and d not in open_dashboards(session)
        assert session.events.listener_count() == _own_listeners(session)
        assert "kernel_ext session closed" in html(d.footer)
    finally:
        d.close()


def test_a_failing_probe_shows_in_the_footer_and_sampling_goes_on(
    session: Session, clock: FakeClock
) -> None:
    sampler = Sampler(clock)
    gate = Gate()
    d = Dashboard(session, interval=1.0, sampler=sampler, clock=clock, monotonic=clock,
                  waiter=gate)
    try:
        d.start()
        sampler.fail_next = True
        gate.step()
        assert "last update failed: OSError: probe failed" in html(d.footer)
        assert d.thread is not None and d.thread.is_alive()
        sampler.ram_used = 8 * GiB
        gate.step()
        assert "failed" not in html(d.footer)
        assert "8.0 GiB / 16.0 GiB" in html(d.memory.devices)
    finally:
        d.close()


def test_no_widget_or_comm_leaks_after_close(session: Session, clock: FakeClock) -> None:
    widgets_before, comms_before = widget_count(), comm_count()
    listeners_before = session.events.listener_count()  # the session's own (alerts)
    for _ in range(3):
        d = Dashboard(session, interval=0, sampler=Sampler(clock, gpus=2), clock=clock,
                      monotonic=clock)
        d.start()
        session.events.emit("checkpoint", action="committed", status={"tracked": ["a"]})
        for job in range(8):  # progress rows, more than the panel keeps
            session.events.emit("load_progress", name=f"m{job}", done=1, total=2, stage="w")
        assert widget_count() > widgets_before
        d.close()
    assert widget_count() == widgets_before
    assert comm_count() == comms_before
    assert session.events.listener_count() == listeners_before


def test_model_events_refresh_footprints(session: Session, dash: Dashboard) -> None:
    dash.start()
    ticks = dash.ticks
    session.events.emit("model", action="loaded", name="m", info={})
    assert dash.ticks == ticks + 1
    assert "no model loaded" in html(dash.memory.models)  # the real registry is empty


def test_real_memory_probe(session: Session) -> None:
    d = Dashboard(session, interval=0)
    try:
        d.start()
        reading = d.memory.readings["cpu"]
        assert 0 < reading.used < reading.total
        assert reading.extra["kernel RSS"] > 0
    finally:
        d.close()


# --- %dashboard ----------------------------------------------------------------------------------
def test_dashboard_magic_shows_and_closes(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("dashboard", "--interval 0")
    (d,) = open_dashboards()
    assert d.live and d.thread is None  # interval 0: events only
    assert "Dashboard(" in capsys.readouterr().out  # published through the shell's display_pub
    ip.run_line_magic("dashboard", "--interval 5")
    assert len(open_dashboards()) == 2
    assert open_dashboards()[0].interval in (0.0, 5.0)
    ip.run_line_magic("dashboard", "close")
    assert "closed 2 dashboards" in capsys.readouterr().out
    assert open_dashboards() == []


def test_dashboard_magic_uses_the_configured_interval(ip: Any) -> None:
    ip.run_line_magic("config", "KernelExt.dashboard_interval = 0")
    ip.run_line_magic("dashboard", "")
    (d,) = open_dashboards()
    try:
        assert d.interval == 0 and d.thread is None
    finally:
        d.close()


@pytest.mark.parametrize(
    ("line", "message"),
    [("--interval -1", "must be >= 0"), ("--interval 0.01", "flood"),
     ("--interval soon", "invalid float"), ("explode", "invalid choice")],
)
def test_dashboard_magic_bad_input(ip: Any, line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ip.run_line_magic("dashboard", line)
    assert open_dashboards() == []


def test_unloading_the_extension_stops_live_dashboards(ip: Any) -> None:
    ip.run_line_magic("dashboard", "--interval 0")
    (d,) = open_dashboards()
    ip.extension_manager.unload_extension("kernel_ext")
    assert not d.live
    ip.extension_manager.load_extension("kernel_ext")  # the fixture unloads it again


def test_interpreter_exit_stops_sampling_threads(session: Session, clock: FakeClock) -> None:
    from widgets.dashboard import _stop_all_at_exit  # registered with atexit

    d = Dashboard(session, interval=1.0, sampler=Sampler(clock), clock=clock, monotonic=clock,
                  waiter=Gate())
    try:
        d.start()
        footer = html(d.footer)
        _stop_all_at_exit()
        assert d.thread is not None and not d.thread.is_alive()
        assert not d.live and session.events.listener_count() == _own_listeners(session)
        assert html(d.footer) == footer  # no message sent while the kernel is going away
    finally:
        d.close()


def test_dashboard_marks_the_guards_limit(session: Session, dash: Dashboard) -> None:
    import kernel_ext.memory as km

    session.config.memory_fraction = 0.5
    dash.start()
    reading = dash.memory.readings["cpu"]
    assert reading.used == 4 * GiB
    limit_fn = getattr(km, "memory_limit", None)
    budget = limit_fn(session, "cpu") if limit_fn else 0.5 * 12 * GiB  # fraction of available
    assert reading.limit == 4 * GiB + int(budget)
    devices = html(dash.memory.devices)
    assert "guard limit" in devices and "kernel-ext-limit" in devices  # text and marker
    if limit_fn is None:
        assert "guard limit 10.0 GiB (a new load may take 6.0 GiB)" in devices


def test_dashboard_shows_the_real_subsystems_state_when_shown(
    ip: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real producers: the checkpoint manager and the resilience hub of a loaded extension."""
    import kernel_ext

    session = kernel_ext.current_session()
    ip.run_cell("import numpy as np\narr = np.arange(10)\nnote = 'hello'\nimport socket\n"
                "sock = socket.socket()")
    ip.run_line_magic("checkpoint", "now")
    breaker = session.resilience.breaker("remote-x")  # the hub wires it to the event bus
    breaker.record_error(ConnectionError("refused"))

    ip.run_line_magic("dashboard", "--interval 0")
    (d,) = open_dashboards()
    body = html(d.checkpoints.body)
    assert "tracked" in body and "arr" in body and "note" in body
    assert "<code>sock</code>" in body  # skipped, with its reason
    assert state_of(d.breakers, "remote-x") == "closed"
    assert "1 of 1" in html(d.breakers.table)

    for _ in range(2):  # consecutive failures trip it; the hub publishes the transition
        breaker.record_error(ConnectionError("refused"))
    assert state_of(d.breakers, "remote-x") == "open"
    ip.run_cell("sock.close()")
    d.close()


# --- a real kernel -------------------------------------------------------------------------------
BUSY_UNTIL_THREE_TICKS = """\
import time, widgets
(d,) = widgets.open_dashboards()
t0, deadline = d.ticks, time.monotonic() + 60
while d.ticks < t0 + 3 and time.monotonic() < deadline:  # busy: the shell never idles here
    sum(range(10_000))
print('TICKS', d.ticks - t0)
"""


@pytest.mark.slow
def test_real_kernel_sends_updates_while_busy_and_shuts_down_cleanly(tmp_path: Path) -> None:
    import os

    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    log = tmp_path / "kernel.log"
    with open(log, "w") as out:
        km.start_kernel(cwd=str(tmp_path), stdout=out, stderr=out,
                        env=dict(os.environ, JPY_SESSION_NAME=str(tmp_path / "k.ipynb")))
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=120)
            kc.execute_interactive("%load_ext kernel_ext\n%dashboard --interval 0.2",
                                   timeout=120, output_hook=lambda m: None)
            during: list[dict[str, Any]] = []
            texts: list[str] = []

            def hook(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "comm_msg":
                    during.append(msg["content"]["data"])
                elif msg["msg_type"] == "stream":
                    texts.append(msg["content"]["text"])

            reply = kc.execute_interactive(BUSY_UNTIL_THREE_TICKS, timeout=120, output_hook=hook)
            assert reply["content"]["status"] == "ok"
            assert "TICKS 3" in "".join(texts)
            # The updates reached the client while the cell was still running (before idle).
            footers = [d["state"]["value"] for d in during
                       if d.get("method") == "update"
                       and "kernel-ext-footer" in str(d.get("state", {}).get("value", ""))]
            assert len(footers) >= 3, during[:3]
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)  # a graceful shutdown: atexit stops the thread
    text = log.read_text()
    assert "Traceback" not in text, text


# --- progress ------------------------------------------------------------------------------------
def test_progress_panel_follows_a_real_load_and_a_real_task(ip: Any, tmp_path: Path) -> None:
    from tinymodels import write_tiny_llama

    import kernel_ext

    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model)
    ip.run_line_magic("dashboard", "--interval 0")
    (d,) = open_dashboards()
    try:
        assert d.progress.jobs == {}
        ip.run_line_magic("model", f"load {model} --name tiny --no-progress")
        assert d.progress.jobs == {"load:tiny": 1.0}
        rows = d.progress.rows_box.children
        assert len(rows) == 1 and "done" in html(rows[0].children[2])
        assert rows[0].children[1].get_state()["bar_style"] == "success"
        assert "tiny" in html(d.memory.models)  # the footprint, refreshed by the model event

        ip.user_ns["kernel_ext"] = kernel_ext
        result = ip.run_cell("t = kernel_ext.task('squares', range(4), progress=False)\n"
                             "for i in t:\n    t.record(i * i)")
        result.raise_error()
        assert d.progress.jobs["task:squares"] == 1.0
        assert "4 / 4" in html(d.progress.rows_box.children[1].children[2])
    finally:
        d.close()


def test_progress_updates_are_coalesced_to_whole_percents(session: Session, dash: Dashboard) -> None:
    dash.start()
    values: list[float] = []
    for done in range(1, 237):
        session.events.emit("load_progress", name="big", done=done, total=236, stage="weights")
        if done == 1:
            bar = dash.progress.rows_box.children[0].children[1]
            bar.observe(lambda change: values.append(change["new"]), "value")
    assert 50 <= len(values) <= 100  # one message per visible percent, not one per tensor
    assert values[-1] == 1.0 and values == sorted(values)


def test_checkpoint_panel_shows_the_writer_pending_changes_and_kept_variables() -> None:
    panel = CheckpointPanel(clock=FakeClock())
    try:
        panel.update({"tracked": ["a"], "skipped": {}, "last_time": None, "pending": True,
                      "writer": "another kernel: kernel pid 7 on vm; this kernel only reads",
                      "carried": {"w": "DAMAGED in every kept snapshot"}}, "lease_lost")
        body = html(panel.body)
        assert "writer: another kernel: kernel pid 7" in body
        assert "unsaved changes" in body and "data-action='lease_lost'" in body
        assert "kept from the restored snapshot (1)" in body and "<code>w</code>: DAMAGED" in body
        panel.update({"tracked": ["a"], "writer": "this kernel (lease taken ...)"}, "committed")
        assert "writer:" not in html(panel.body) and "unsaved" not in html(panel.body)
    finally:
        panel.close()
