"""Chat: streaming Markdown, conversations in SQLite, settings, stop and regenerate.

Tokens are shown as plain text while they stream (``StreamingText``: only the cells that
changed repaint, at most 10 times a second; the view follows in jumps), then the
message is rendered as Markdown once: over SSH that is ~30x fewer bytes than re-rendering
Markdown per token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Input, Markdown, Static

from inferno_tui import fmt
from inferno_tui.screens.ab import ABScreen, parse_sides
from inferno_tui.screens.base import InfernoScreen
from inferno_tui.screens.chat_dialogs import ConversationsDialog, SettingsDialog
from inferno_tui.screens.dialogs import AskText, Confirm
from inferno_tui.state import Snapshot
from inferno_tui.store import ChatMessage, ChatSettings, ChatStore, default_data_dir, slug
from inferno_tui.store import stats_line as format_stats
from inferno_tui.widgets.streaming import StreamingText

if TYPE_CHECKING:
    from infernod.client import AsyncStream

DEFAULT_MODEL = "gemma3-270m"


class MessageView(Vertical):
    """One message: a header line (role, stats or queue position) and a Markdown body."""

    DEFAULT_CSS = "MessageView { height: auto; }"

    def __init__(self, role: str, content: str = "", stats: dict[str, Any] | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self._content = content
        self._stats = stats or {}

        self._header = Static(self.header(), classes="message-header")
        self._body = Markdown(content, classes="message-body")
        self._live: StreamingText | None = None

    def compose(self) -> ComposeResult:
        yield self._header
        yield self._body

    def header(self, status: str = "") -> Text:
        t = Text(self.role, "bold cyan" if self.role == "user" else "bold green")
        line = status or (format_stats(self._stats) if self._stats else "")
        if line:
            t.append("  ")
            t.append(line, "dim")
        return t

    def set_status(self, status: str) -> None:
        self._header.update(self.header(status))

    def set_stats(self, stats: dict[str, Any]) -> None:
        self._stats = stats
        self._header.update(self.header())

    @property
    def markdown(self) -> Markdown:
        return self._body

    @property
    def shown_text(self) -> str:
        """What the body shows: the streamed text while it streams, then the Markdown."""
        return self._live.shown if self._live is not None else self._body.source

    async def start_streaming(self, reserve: int, max_height: int) -> StreamingText:
        """Show text as it arrives, cheaply (see widgets/streaming.py), until
        :meth:`finish_streaming` renders the whole message as Markdown once."""
        live = self._live = StreamingText(reserve=reserve, max_height=max_height,
                                          classes="message-body")
        self._body.display = False
        await self.mount(live, before=self._body)
        return live

    async def finish_streaming(self, live: StreamingText, content: str) -> None:
        await self._body.update(content)
        self._body.display = True
        self._live = None
        await live.remove()


class ChatScreen(InfernoScreen):
    MODE = "chat"
    MUTATING = frozenset({"regenerate", "stop", "submit", "ab"})
    BINDINGS = [
        Binding("ctrl+n", "new", "New", priority=True),
        Binding("ctrl+o", "conversations", "Chats", priority=True),
        Binding("ctrl+s", "settings", "Settings", priority=True),
        Binding("ctrl+g", "regenerate", "Regen", priority=True),
        Binding("ctrl+b", "ab", "A/B", priority=True),
        Binding("escape", "stop", "Stop/leave"),
        Binding("i", "focus_input", "Type", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.store: ChatStore | None = None
        self.conv_id: int | None = None
        self.settings = ChatSettings()
        self.history: list[ChatMessage] = []
        self.generating = False
        self._stream: AsyncStream | None = None
        self._pending: MessageView | None = None

    def compose_body(self) -> ComposeResult:
        yield Static(id="chat-info")
        yield VerticalScroll(id="chat-log")
        inp = Input(placeholder="message (enter: send · esc: stop/leave input)", id="chat-input")
        inp.cursor_blink = False  # a blink repaints the input: ~1.7 KB/s over SSH for nothing
        yield inp

    def on_mount(self) -> None:
        data_dir = Path(self.inferno.settings.data_dir or default_data_dir())
        self.store = ChatStore(data_dir / "chats.sqlite3")
        convs = self.store.conversations()
        if convs:
            self.open_conversation(convs[0].id)
        else:
            self.new_conversation()
        inp = self.query_one("#chat-input", Input)
        if self.inferno.readonly:
            inp.disabled = True
            inp.placeholder = "read-only: generation disabled"
        else:
            inp.focus()

    def on_unmount(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- conversations ----------------------------------------------------------------------
    def _default_settings(self) -> ChatSettings:
        models = [m for m in self.inferno.snapshot.models if m.kind in (None, "gguf")]
        pick = next((m for m in models if m.state == "loaded"), None) \
            or next((m for m in models if m.name == DEFAULT_MODEL), None) \
            or (models[0] if models else None)
        name = pick.name if pick else DEFAULT_MODEL
        base = pick.has_chat_template is False if pick else name == DEFAULT_MODEL
        return ChatSettings(model=name, mode="completion" if base else "chat")

    def new_conversation(self) -> None:
        assert self.store is not None
        title = time.strftime("chat %Y-%m-%d %H:%M")
        conv = self.store.create(title, self._default_settings())
        self.open_conversation(conv.id)

    def open_conversation(self, conv_id: int) -> None:
        assert self.store is not None
        conv = self.store.get(conv_id)
        if conv is None:
            return
        self.conv_id, self.settings = conv.id, conv.settings
        self.history = self.store.messages(conv.id)
        log = self.query_one("#chat-log", VerticalScroll)
        log.remove_children()
        log.mount_all([MessageView(m.role, m.content, m.stats) for m in self.history])
        log.scroll_end(animate=False)
        self._render_info()

    def _render_info(self) -> None:
        s = self.settings
        conv = self.store.get(self.conv_id) if self.store and self.conv_id else None
        t = Text(conv.title if conv else "", "bold")
        t.append("  ")
        t.append(f"{s.model} · {s.mode} · T {s.temperature:g} · top_p {s.top_p:g} · "
                 f"max {s.max_tokens} · {s.priority}", "dim")
        self.query_one("#chat-info", Static).update(t)

    def action_new(self) -> None:
        if not self.generating:
            self.new_conversation()

    def action_conversations(self) -> None:
        assert self.store is not None

        def done(result: tuple[str, int] | None) -> None:
            if result is None:
                return
            action, conv_id = result
            if action == "open" and not self.generating:
                self.open_conversation(conv_id)
            elif action == "rename":
                self.rename(conv_id)
            elif action == "delete":
                self.delete(conv_id)
            elif action == "export":
                self.export(conv_id)

        self.app.push_screen(ConversationsDialog(self.store.conversations(), self.conv_id), done)

    def rename(self, conv_id: int) -> None:
        assert self.store is not None
        conv = self.store.get(conv_id)

        def done(title: str | None) -> None:
            if title and self.store is not None:
                self.store.rename(conv_id, title)
                self._render_info()

        self.app.push_screen(AskText("New title:", conv.title if conv else ""), done)

    def delete(self, conv_id: int) -> None:
        def done(yes: bool | None) -> None:
            if not yes or self.store is None or (self.generating and conv_id == self.conv_id):
                return
            self.store.delete(conv_id)
            if conv_id == self.conv_id:
                convs = self.store.conversations()
                if convs:
                    self.open_conversation(convs[0].id)
                else:
                    self.new_conversation()

        self.app.push_screen(Confirm("Delete this conversation?"), done)

    def export(self, conv_id: int) -> None:
        assert self.store is not None
        conv = self.store.get(conv_id)
        default = self.store.path.parent / "exports" / f"{slug(conv.title if conv else '')}.md"

        def done(path: str | None) -> None:
            if not path or self.store is None:
                return
            target = Path(path).expanduser()
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(self.store.export_markdown(conv_id))
            except OSError as e:
                self.notify_error(e, "exporting the conversation")
                return
            self.notify(f"exported to {target}", timeout=5)

        self.app.push_screen(AskText("Export as Markdown to:", str(default)), done)

    def action_settings(self) -> None:
        names = [m.name for m in self.inferno.snapshot.models if m.kind in (None, "gguf")]

        def done(settings: ChatSettings | None) -> None:
            if settings is not None and self.store is not None and self.conv_id is not None:
                self.settings = settings
                self.store.save_settings(self.conv_id, settings)
                self._render_info()

        self.app.push_screen(SettingsDialog(self.settings, names), done)

    def action_focus_input(self) -> None:
        self.query_one("#chat-input", Input).focus()

    # -- generation -------------------------------------------------------------------------
    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value
        if not text.strip() or self.generating or self.inferno.readonly:
            return
        event.input.value = ""
        self.send(text)

    def send(self, text: str) -> None:
        assert self.store is not None and self.conv_id is not None
        msg = self.store.add_message(self.conv_id, "user", text)
        self.history.append(msg)
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(MessageView("user", text))
        self.start_generation()

    def start_generation(self) -> None:
        self.generating = True
        self._pending = MessageView("assistant")
        self._pending.set_status("sending...")
        self.refresh_bindings()
        self.generate(self._pending, self.settings, list(self.history))

    def request_body(self, settings: ChatSettings, history: list[ChatMessage]) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": settings.temperature, "top_p": settings.top_p,
                                  "max_tokens": settings.max_tokens,
                                  "priority": settings.priority}
        if settings.mode == "completion":
            params["prompt"] = "".join(m.content for m in history)
        else:
            msgs = [{"role": "system", "content": settings.system}] if settings.system else []
            msgs += [{"role": m.role, "content": m.content} for m in history
                     if m.role in ("user", "assistant")]
            params["messages"] = msgs
        return params

    @work(exclusive=True, group="generation", exit_on_error=False)
    async def generate(self, view: MessageView, settings: ChatSettings,
                       history: list[ChatMessage]) -> None:
        client = self.inferno.connection.client
        conv_id = self.conv_id
        parts: list[str] = []
        stats: dict[str, Any] = {}
        t0 = time.monotonic()
        log = self.query_one("#chat-log", VerticalScroll)
        await log.mount(view)
        log.scroll_end(animate=False)
        # up to the log's height under this message's header line
        live = await view.start_streaming(reserve=max(4, log.size.height // 2),
                                          max_height=log.size.height - 1)
        bottom = log.max_scroll_y
        try:
            if client is None:
                raise ConnectionError("not connected to the daemon")
            body = self.request_body(settings, history)
            self._stream = stream = await client.generate(settings.model, **body)
            view.set_status("queued")
            first: float | None = None
            async for text in stream:
                if first is None:
                    first = time.monotonic()
                    view.set_status("generating...")
                parts.append(text)
                live.append(text)
                if log.max_scroll_y != bottom:  # the text grew by a step: follow it if
                    if log.scroll_y >= bottom - 1:  # the reader had not scrolled away
                        log.scroll_end(animate=False)
                    bottom = log.max_scroll_y
            stats = dict(stream.stats or {})
            if stats.get("ttft_ms") is None and first is not None:
                stats["ttft_ms"] = (first - t0) * 1000
            stats.setdefault("completion_tokens", len(parts))
        except Exception as e:
            words = self.notify_error(e, "the reply")
            stats = {"finish_reason": f"error: {words.short}"}
        finally:
            await view.finish_streaming(live, "".join(parts))
            self._stream = None
            self.generating = False
            self.refresh_bindings()
        view.set_stats(stats)
        self.inferno.record_local_profile(stats)
        content = "".join(parts)
        if self.store is not None and conv_id is not None and (content or stats):
            msg = self.store.add_message(conv_id, "assistant", content, stats)
            if conv_id == self.conv_id:
                self.history.append(msg)
        log.scroll_end(animate=False)

    def render_snapshot(self, snap: Snapshot) -> None:
        """While waiting for the first token, show the request's place in the queue."""
        stream, view = self._stream, self._pending
        if stream is None or view is None or stream.state.next_seq > 0 and stream.state.text:
            return
        queued = getattr(stream.state, "queued", None) or {}
        row = next((r for r in snap.queue.rows if r.request_id == stream.request_id), None)
        position = queued.get("position") if isinstance(queued, dict) else None
        eta = queued.get("eta_s") if isinstance(queued, dict) else None
        if row is not None and row.state == "running":
            view.set_status("prefilling...")
        elif position is not None or (row is not None and row.position is not None):
            pos = position if position is not None else row.position  # type: ignore[union-attr]
            view.set_status(f"queued #{pos}" + (f" eta {fmt.secs(eta)}" if eta else ""))
        elif row is not None:
            view.set_status(f"queued ({sum(r.state != 'running' for r in snap.queue.rows)} "
                            "waiting)")

    def action_stop(self) -> None:
        if self.generating:
            self.cancel_generation()
        self.query_one("#chat-log").focus()

    @work(exclusive=True, group="cancel", exit_on_error=False)
    async def cancel_generation(self) -> None:
        stream = self._stream
        if stream is None:
            self.workers.cancel_group(self, "generation")
            return
        try:
            await stream.cancel()
        except Exception as e:
            self.notify_error(e, "stopping the reply")
            self.workers.cancel_group(self, "generation")

    def action_ab(self) -> None:
        """One prompt (the input line, else the last message sent) to two models or two
        settings, side by side."""
        prompt = self.query_one("#chat-input", Input).value.strip() or next(
            (m.content for m in reversed(self.history) if m.role == "user"), "")
        client = self.inferno.connection.client
        if not prompt or client is None:
            self.notify("type a prompt first (and be connected)", timeout=4)
            return
        s = self.settings

        def done(text: str | None) -> None:
            if not text:
                return
            try:
                sides = parse_sides(text, s.model or DEFAULT_MODEL)
            except ValueError as e:
                self.notify_error(e, "A/B")
                return
            base = {"temperature": s.temperature, "top_p": s.top_p,
                    "max_tokens": s.max_tokens, "priority": s.priority}
            self.app.push_screen(ABScreen(client, prompt, sides, base, s.mode == "completion"))

        self.app.push_screen(AskText("A/B: two models, or two settings of one "
                                     "(model k=v ... | model k=v ...):",
                                     f"{s.model or DEFAULT_MODEL} temperature=0 | "
                                     f"{s.model or DEFAULT_MODEL} temperature=1"), done)

    def action_regenerate(self) -> None:
        if self.generating or self.store is None or not self.history:
            return
        log = self.query_one("#chat-log", VerticalScroll)
        if self.history[-1].role == "assistant":
            last = self.history.pop()
            self.store.delete_message(last.id)
            views = list(log.query(MessageView))
            if views:
                views[-1].remove()
        if self.history and self.history[-1].role == "user":
            self.start_generation()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        allowed = super().check_action(action, parameters)
        if action == "regenerate" and allowed and self.generating:
            return None
        return allowed
