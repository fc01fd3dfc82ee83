"""GPU & system: per-GPU history graphs and current values, GPU processes, CPU/RAM/swap."""

from __future__ import annotations

import time

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from inferno_tui import fmt
from inferno_tui.screens.base import InfernoScreen
from inferno_tui.state import Snapshot
from inferno_tui.views import GpuView, Histories, MetricsView, SystemView
from inferno_tui.widgets.graphs import bar, metric_line
from inferno_tui.widgets.lines import Lines
from inferno_tui.widgets.status import update_if_changed

GRAPH_W = 44


def gpu_panel(g: GpuView, h: Histories) -> list[Text]:
    key = f"gpu{g.index}"
    title = Text(f"GPU{g.index} {fmt.text(g.name)}", "bold underline")
    title.append(f"  {fmt.fixed(g.temperature_c, 0, '°C')}  fan {fmt.pct(g.fan_pct)}", "")
    mem = f"{fmt.size(g.memory_used_bytes)}/{fmt.size(g.memory_total_bytes)}"
    power = f"{fmt.fixed(g.power_w, 0, 'W')}/{fmt.fixed(g.power_limit_w, 0, 'W')}"
    power_pct = (100 * g.power_w / g.power_limit_w
                 if g.power_w is not None and g.power_limit_w else None)
    lines = [
        title,
        metric_line("util", h.get(f"{key}.util"), fmt.pct(g.utilization_pct), GRAPH_W,
                    0, 100, g.utilization_pct),
        metric_line("mem", h.get(f"{key}.mem"), f"{mem} ({fmt.pct(g.memory_pct)})", GRAPH_W,
                    0, 100, g.memory_pct),
        metric_line("temp", h.get(f"{key}.temp"), fmt.fixed(g.temperature_c, 0, "°C"),
                    GRAPH_W, 20, 100),
        metric_line("power", h.get(f"{key}.power"), power, GRAPH_W, 0,
                    g.power_limit_w, power_pct),
        metric_line("clock", h.get(f"{key}.clock_sm"),
                    f"sm {fmt.fixed(g.clock_sm_mhz, 0)} mem {fmt.fixed(g.clock_mem_mhz, 0)} MHz",
                    GRAPH_W, 0, None),
    ]
    return lines


def gpu_processes(gpus: tuple[GpuView, ...]) -> Table:
    t = Table(box=None, expand=True, padding=(0, 1), header_style="bold")
    for col, just in (("GPU", "right"), ("PID", "right"), ("Process", "left"),
                      ("GPU memory", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    rows = [(g.index, p) for g in gpus for p in g.processes]
    for index, p in sorted(rows, key=lambda r: (r[0], -(r[1].used_memory_bytes or 0))):
        style = "bold reverse green" if p.is_daemon else ""
        name = fmt.text(p.name) + (" (infernod)" if p.is_daemon else "")
        t.add_row(str(index), fmt.text(p.pid), name, fmt.size(p.used_memory_bytes), style=style)
    if not rows:
        t.add_row("", "", Text("no GPU processes", "dim"), "")
    return t


def system_panel(s: SystemView, h: Histories) -> list[Text]:
    mem_pct = (100 * s.memory_used_bytes / s.memory_total_bytes
               if s.memory_used_bytes is not None and s.memory_total_bytes else None)
    swap_pct = (100 * s.swap_used_bytes / s.swap_total_bytes
                if s.swap_used_bytes is not None and s.swap_total_bytes else None)
    lines: list[Text] = [
        Text("System", "bold underline"),
        metric_line("cpu", h.get("cpu"), fmt.pct(s.cpu_pct), GRAPH_W, 0, 100, s.cpu_pct),
        metric_line("ram", h.get("ram"),
                    f"{fmt.size(s.memory_used_bytes)}/{fmt.size(s.memory_total_bytes)}",
                    GRAPH_W, 0, 100, mem_pct),
    ]
    swap = Text("swap  ", "bold")
    swap.append_text(bar(swap_pct, GRAPH_W))
    swap.append(f" {fmt.size(s.swap_used_bytes)}/{fmt.size(s.swap_total_bytes)}")
    lines.append(swap)
    daemon = Text("daemon", "bold")
    daemon.append(f" rss {fmt.size(s.process_rss_bytes)}  cpu {fmt.pct(s.process_cpu_pct)}")
    lines.append(daemon)
    cores = s.cpu_per_core_pct
    per_line = 4
    for start in range(0, len(cores), per_line):
        row = Text()
        for i in range(start, min(start + per_line, len(cores))):
            row.append(f"c{i:<3}", "bold")
            row.append_text(bar(cores[i], 8))
            row.append(f" {fmt.pct(cores[i]):>4}  ")
        lines.append(row)
    if not cores:
        lines.append(Text("per-core CPU: n/a", "dim"))
    return lines


class GpuScreen(InfernoScreen):
    MODE = "gpu"
    # The graphs move with every sample, and each moved graph line is ~250 bytes to the
    # terminal: redrawn every 2 s the screen writes ~0.3 KB/s here (1 KB/s with a GPU).
    GRAPH_EVERY_S = 2.0

    def __init__(self) -> None:
        super().__init__()
        self._drawn_at: float | None = None

    def on_screen_resume(self) -> None:
        self._drawn_at = None  # coming back: show the newest at once
        super().on_screen_resume()

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="gpu-scroll"):
            yield Lines(id="gpu-panel")
            yield Static(id="gpu-procs")
            yield Lines(id="system-panel")

    def render_snapshot(self, snap: Snapshot) -> None:
        # line by line, only what changed: see widgets/lines.py
        now = time.monotonic()
        if self._drawn_at is not None and now - self._drawn_at < self.GRAPH_EVERY_S:
            return
        self._drawn_at = now
        m: MetricsView = snap.metrics
        h = snap.histories
        procs = self.query_one("#gpu-procs", Static)
        if m.gpu_available:
            self.query_one("#gpu-panel", Lines).set_lines(
                [line for g in m.gpus for line in gpu_panel(g, h)])
            update_if_changed(procs, gpu_processes(m.gpus), key=m.gpus)
            procs.display = True
        else:
            self.query_one("#gpu-panel", Lines).set_lines(
                [Text(f"no GPU: {m.gpu_reason or 'n/a'}", "bold yellow")])
            procs.display = False
        self.query_one("#system-panel", Lines).set_lines(system_panel(m.system, h))
