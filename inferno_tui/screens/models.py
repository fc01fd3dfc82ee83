"""Models: the table of available and loaded models, a detail pane, and model actions."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, ProgressBar, Static

from inferno_tui import fmt
from inferno_tui.errors import in_words
from inferno_tui.screens.base import InfernoScreen
from inferno_tui.screens.dialogs import AskText, Confirm, ModelSettingsForm
from inferno_tui.state import Progress, Snapshot
from inferno_tui.views import ModelRow
from inferno_tui.widgets.status import update_if_changed

# 62 columns of content + 2 padding per column = 80 (the table fits an 80x24 terminal).
COLUMNS = (("name", "Name", 14), ("state", "State", 7), ("arch", "Arch", 7),
           ("params", "Par.", 4), ("quant", "Quant", 6), ("size", "Size", 5),
           ("ctx", "Ctx", 5), ("mem", "Mem", 5), ("ka", "Idle", 6))
STATE_STYLE = {"loaded": "bold green", "loading": "yellow", "unloading": "yellow",
               "available": "dim", "failed": "bold red"}


def model_cells(r: ModelRow) -> tuple[Any, ...]:
    if r.pinned:
        ka = "pinned"
    elif r.running:
        ka = f"busy {r.running}"
    else:
        ka = fmt.secs(r.keep_alive_left_s)
    params = r.size_label or fmt.count(r.param_count)
    state = Text("avail" if r.state == "available" else r.state[:7],
                 STATE_STYLE.get(r.state, ""))
    name = r.name if r.kind in (None, "gguf") else f"{r.name} ({r.kind})"
    return (name, state, fmt.text(r.architecture), params, fmt.text(r.quantization),
            fmt.size_short(r.size_bytes), fmt.count(r.context_length),
            fmt.size_short(r.memory_bytes) if r.loaded else "", ka if r.loaded else "")


def detail_text(info: dict[str, Any] | None, row: ModelRow | None) -> Text:
    if row is None:
        return Text("no model selected", "dim")
    t = Text()
    t.append(row.name, "bold")
    if row.state == "failed":
        t.append("\n   failed ", "bold red")
        t.append(row.failed_reason or "its runner died")
    if row.runner_pid is not None:  # live: from models.list and every models event
        t.append("\n   runner ", "cyan")
        t.append(f"pid {row.runner_pid}  rss {fmt.size(row.runner_rss_bytes)}  "
                 f"cpu {fmt.text(row.runner_cpu_s)} s")
    if info is None:
        t.append("  (details loading...)", "dim")
        return t
    fields = (("kind", info.get("kind")), ("file", info.get("path")),
              ("name", info.get("display_name")),
              ("layers", info.get("n_layer")), ("heads", info.get("n_head")),
              ("kv heads", info.get("n_head_kv")), ("embd", info.get("embedding_length")),
              ("vocab", info.get("vocab_size")), ("swa", info.get("sliding_window")),
              ("weights", fmt.size(info.get("weights_bytes"))),
              ("template", info.get("chat_template_name")),
              ("chat", "yes" if info.get("has_chat_template") else "no (base model)"))
    for key, value in fields:
        t.append(f"\n{key:>9} ", "cyan")
        t.append(fmt.text(value))
    own = {k: v.get("value") for k, v in (info.get("settings") or {}).items()
           if isinstance(v, dict) and v.get("source") == "model"}
    if own:
        t.append(f"\n{'settings':>9} ", "cyan")
        t.append(" ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                          for k, v in own.items()))
    memory = info.get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("devices"), dict):
        t.append(f"\n{'gpu layers':>9} ", "cyan")
        t.append(fmt.text(memory.get("n_gpu_layers")))
        for device, d in memory["devices"].items():  # host RAM, then each GPU
            if not isinstance(d, dict):
                continue
            t.append(f"\n{device:>9} ", "cyan")
            t.append(f"needs {fmt.size(d.get('estimate_bytes'))} of "
                     f"{fmt.size(d.get('budget_bytes'))}, "
                     f"{fmt.size(d.get('used_bytes'))} used by other models")
    meta = info.get("metadata")
    if isinstance(meta, dict):
        for key in sorted(meta)[:40]:
            value = str(meta[key])
            t.append(f"\n  {key} ", "dim cyan")
            t.append(value if len(value) < 60 else value[:57] + "...")
    return t


class ModelsScreen(InfernoScreen):
    MODE = "models"
    MUTATING = frozenset({"load", "unload", "pin", "unpin", "import_model", "pull_model", "cancel_pull",
                          "remove"})
    BINDINGS = [
        Binding("l", "load", "Load"),
        Binding("u", "unload", "Unload"),
        Binding("p", "pin", "Pin"),
        Binding("P", "unpin", "Unpin", show=False),
        Binding("i", "import_model", "Import"),
        Binding("d", "pull_model", "Pull"),
        Binding("D", "cancel_pull", "Stop pull", show=False),
        Binding("s", "settings", "Set"),
        Binding("x", "remove", "Remove"),
        Binding("r", "refresh", "Refresh", show=False),  # the list follows the models events
    ]

    def __init__(self) -> None:
        super().__init__()
        self._rows: tuple[ModelRow, ...] = ()
        self._details: dict[str, dict[str, Any]] = {}  # models.show of the daemon shown
        self._daemon = 0
        self._selected: str | None = None

    def compose_body(self) -> ComposeResult:
        table: DataTable[Any] = DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
        for key, label, width in COLUMNS:
            table.add_column(label, key=key, width=width)
        yield table
        with Vertical(id="models-progress"):
            yield Static("", id="models-notice")
            yield ProgressBar(id="models-bar", show_eta=False)
        yield Static(detail_text(None, None), id="models-detail")

    def on_mount(self) -> None:
        self.query_one("#models-bar").display = False

    def render_snapshot(self, snap: Snapshot) -> None:
        if snap.models != self._rows or self.inferno.active != self._daemon:
            self._rows, self._daemon = snap.models, self.inferno.active
            table = self.query_one(DataTable)
            cursor = table.cursor_row
            table.clear()
            for row in snap.models:
                table.add_row(*model_cells(row), key=row.name)
            if snap.models:
                table.move_cursor(row=min(cursor, len(snap.models) - 1))
            self._details.clear()
            self._show_detail()
        self._render_progress(snap)

    def _render_progress(self, snap: Snapshot) -> None:
        bar = self.query_one("#models-bar", ProgressBar)
        notice = self.query_one("#models-notice", Static)
        p: Progress | None = next(iter(snap.progress.values()), None)
        if p is None:
            bar.display = False
            update_if_changed(notice, Text(snap.notice, "italic"))
            return
        bar.display = True
        if p.action in ("importing", "pulling") and p.total_bytes:
            bar.update(total=p.total_bytes, progress=p.done_bytes or 0)
        else:
            bar.update(total=None)
        what = f"{p.action} {p.model}"
        if p.action == "loading":  # the daemon says when a load starts and ends, no fraction
            if p.total_bytes:
                what += f" (~{fmt.size(p.total_bytes)})"
            if p.since is not None:
                what += f", {time.monotonic() - p.since:.0f} s so far"
            what += "; infernod reports no fraction for a load"
        update_if_changed(notice, Text(f"{what} {p.message}".rstrip(), "bold yellow"))

    # -- selection and detail ---------------------------------------------------------------
    def selected(self) -> ModelRow | None:
        table = self.query_one(DataTable)
        if not self._rows or table.cursor_row < 0 or table.cursor_row >= len(self._rows):
            return None
        return self._rows[table.cursor_row]

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def _show_detail(self) -> None:
        row = self.selected()
        detail = self.query_one("#models-detail", Static)
        if row is None:
            detail.update(detail_text(None, None))
            return
        detail.update(detail_text(self._details.get(row.name), row))
        if row.name not in self._details and self.inferno.snapshot.connection == "connected":
            self.fetch_detail(row.name)

    @work(exclusive=True, group="models-show", exit_on_error=False)
    async def fetch_detail(self, name: str) -> None:
        try:
            info = await self.inferno.connection.request("models.show", {"model": name})
        except Exception as e:
            info = {"kind": f"n/a ({in_words(e, 'details').why})"}
        self._details[name] = info
        if (row := self.selected()) is not None and row.name == name:
            self.query_one("#models-detail", Static).update(detail_text(info, row))

    def show_detail_for_test(self, name: str, info: dict[str, Any]) -> None:
        self._details[name] = info
        self._show_detail()

    # -- actions ----------------------------------------------------------------------------
    def action_load(self) -> None:
        if (row := self.selected()) is not None:
            self.model_request("models.load", {"model": row.name}, f"loading {row.name}")

    def action_pin(self) -> None:
        if (row := self.selected()) is not None:
            self.model_request("models.load", {"model": row.name, "keep_alive": -1},
                               f"pinning {row.name}")

    def action_unpin(self) -> None:
        """Shift+P: back to the idle keep-alive it would have had without the pin."""
        if (row := self.selected()) is not None:
            self.model_unpin(row.name)

    @work(group="model-actions", exit_on_error=False)
    async def model_unpin(self, name: str) -> None:
        conn = self.inferno.connection
        try:
            info = await conn.request("models.show", {"model": name})
            pin = (info.get("settings") or {}).get("pin") or {}
            if pin.get("source") == "model" and pin.get("value"):  # its own setting pins it
                await conn.request("models.unset", {"model": name, "keys": ["pin"]})
            else:  # pinned by a load: load again with the configured keep-alive
                own = (info.get("settings") or {}).get("keep_alive_s") or {}
                if own.get("source") == "model":
                    keep = own.get("value")
                else:
                    keep = (await conn.request("config.get",
                                               {"key": "models.keep_alive_s"})).get("value")
                await conn.request("models.load", {"model": name, "keep_alive": keep},
                                   timeout=600)
        except Exception as e:
            self.inferno.update_snapshot(
                notice=self.notify_error(e, f"unpinning {name}").line)
            return
        self.inferno.update_snapshot(notice=f"{name}: unpinned")
        self._details.pop(name, None)
        self.inferno.refresh_models()

    def action_unload(self) -> None:
        if (row := self.selected()) is not None:
            self.model_request("models.unload", {"model": row.name}, f"unloading {row.name}")

    def action_import_model(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.model_upload(path)

        self.app.push_screen(AskText("Import a .gguf/.onnx file (path on this machine; it is "
                                     "sent to the daemon):", placeholder="/path/to/model.gguf"),
                             done)

    @work(group="model-actions", exit_on_error=False)
    async def model_upload(self, path: str) -> None:
        self.notify(f"sending {path}...", timeout=3)
        try:
            reply = await self.inferno.connection.upload_model(path)
        except Exception as e:
            words = self.notify_error(e, f"importing {path}")
            self.inferno.update_snapshot(notice=words.line)
            return
        self.inferno.update_snapshot(notice=f"{reply['model']}: imported")
        self.inferno.refresh_models()

    def action_pull_model(self) -> None:
        def done(source: str | None) -> None:
            if source and source.strip():
                self.model_request("models.pull", {"source": source.strip()},
                                   f"pulling {source.strip()}")

        self.app.push_screen(AskText("Pull a model onto the daemon's host (https://.../x.gguf, "
                                     "hf://org/repo/file.gguf or org/repo:QUANT):",
                                     placeholder="ggml-org/gemma-3-270m-it-GGUF:Q8_0"), done)

    def action_cancel_pull(self) -> None:
        """Stops the pull shown in the progress line (shift+d)."""
        pulling = [p for p in self.inferno.snapshot.progress.values() if p.action == "pulling"]
        if pulling:
            self.model_request("models.pull.cancel", {"pull": pulling[0].model},
                               f"stopping the pull of {pulling[0].model}")

    def action_settings(self) -> None:
        """The model's own settings in a form (from models.show): a filled field sets the
        key, an emptied one removes it (back to the config's value)."""
        if (row := self.selected()) is not None:
            self.settings_form(row.name)

    @work(group="model-actions", exit_on_error=False)
    async def settings_form(self, name: str) -> None:
        try:
            info = await self.inferno.connection.request("models.show", {"model": name})
        except Exception as e:
            self.inferno.update_snapshot(
                notice=self.notify_error(e, f"reading {name}'s settings").line)
            return

        def done(result: tuple[dict[str, str], list[str]] | None) -> None:
            if result is not None and (result[0] or result[1]):
                self.model_settings(name, *result)

        self.app.push_screen(ModelSettingsForm(name, info.get("settings") or {}), done)

    @work(group="model-actions", exit_on_error=False)
    async def model_settings(self, name: str, values: dict[str, str], unset: list[str]) -> None:
        try:
            reply: dict[str, Any] = {}
            if values:
                reply = await self.inferno.connection.request(
                    "models.set", {"model": name, "settings": values})
            if unset:
                reply = await self.inferno.connection.request(
                    "models.unset", {"model": name, "keys": unset})
        except Exception as e:
            words = self.notify_error(e, f"changing {name}'s settings")
            self.inferno.update_snapshot(notice=words.line)
            return
        later = reply.get("next_load") or []
        self.inferno.update_snapshot(notice=f"{name}: {', '.join([*values, *unset])} changed"
                                     + (f"; {', '.join(later)} on its next load" if later
                                        else ""))
        self._details.pop(name, None)
        self._show_detail()

    def action_remove(self) -> None:
        row = self.selected()
        if row is None:
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.model_request("models.remove", {"model": row.name},
                                   f"removing {row.name}")

        self.app.push_screen(Confirm(f"Remove {row.name} from the model directory?"), done)

    def action_refresh(self) -> None:
        self._details.clear()
        self.inferno.refresh_models()

    @work(group="model-actions", exit_on_error=False)
    async def model_request(self, type_: str, body: dict[str, Any], what: str) -> None:
        self.notify(what + "...", timeout=3)
        try:
            reply = await self.inferno.connection.request(type_, body, timeout=600)
        except Exception as e:
            words = self.notify_error(e, what)
            self.inferno.update_snapshot(notice=words.line)
            return
        state = reply.get("state") or "done"
        self.inferno.update_snapshot(notice=f"{reply.get('model', '')}: {state}")
        self.inferno.refresh_models()
