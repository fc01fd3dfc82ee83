"""Chat dialogs: the conversation list and the generation settings."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Select, Switch
from textual.widgets.option_list import Option

from inferno_tui.store import ChatSettings, Conversation
from infernod.protocol.vocabulary import PRIORITIES


class ConversationsDialog(ModalScreen[tuple[str, int] | None]):
    """Pick a conversation; returns (action, id) with action open|rename|delete|export."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("r", "pick('rename')", "Rename"),
        Binding("d", "pick('delete')", "Delete"),
        Binding("e", "pick('export')", "Export"),
    ]

    def __init__(self, conversations: list[Conversation], current: int | None) -> None:
        super().__init__()
        self.conversations = conversations
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("[b]Conversations[/]  enter: open · r: rename · d: delete · "
                        "e: export · esc")
            options = [Option(f"{c.title}  [dim]{c.settings.model}[/]", id=str(c.id))
                       for c in self.conversations]
            ol = OptionList(*options, id="conversations")
            yield ol

    def on_mount(self) -> None:
        ol = self.query_one(OptionList)
        ids = [c.id for c in self.conversations]
        if self.current in ids:
            ol.highlighted = ids.index(self.current)
        elif ids:
            ol.highlighted = 0

    def _current_id(self) -> int | None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None:
            return None
        return self.conversations[ol.highlighted].id

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(("open", int(event.option.id or 0)))

    def action_pick(self, action: str) -> None:
        conv_id = self._current_id()
        if conv_id is not None:
            self.dismiss((action, conv_id))


class SettingsDialog(ModalScreen[ChatSettings | None]):
    """Model, mode, system prompt and sampling parameters of the current conversation."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"),
                Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, settings: ChatSettings, models: list[str]) -> None:
        super().__init__()
        self.settings = settings
        self.models = models if settings.model in models or not settings.model \
            else [settings.model, *models]

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(classes="dialog", id="settings"):
            yield Label("[b]Chat settings[/]  ctrl+s: save · esc: cancel")
            with Grid(id="settings-grid"):
                yield Label("model")
                yield Select([(m, m) for m in self.models], value=s.model or Select.BLANK,
                             allow_blank=not self.models, id="set-model")
                yield Label("completion")
                yield Switch(s.mode == "completion", id="set-mode")
                yield Label("system")
                yield Input(s.system, placeholder="system prompt (chat mode)", id="set-system")
                yield Label("temperature")
                yield Input(str(s.temperature), type="number", id="set-temperature")
                yield Label("top_p")
                yield Input(str(s.top_p), type="number", id="set-top-p")
                yield Label("max tokens")
                yield Input(str(s.max_tokens), type="integer", id="set-max-tokens")
                yield Label("priority")
                yield Select([(p, p) for p in PRIORITIES], value=s.priority,
                             allow_blank=False, id="set-priority")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def action_save(self) -> None:
        def num(widget_id: str, default: float) -> float:
            try:
                return float(self.query_one(widget_id, Input).value)
            except ValueError:
                return default

        s = self.settings
        model = self.query_one("#set-model", Select).value
        self.dismiss(ChatSettings(
            model=str(model) if isinstance(model, str) else s.model,
            mode="completion" if self.query_one("#set-mode", Switch).value else "chat",
            system=self.query_one("#set-system", Input).value,
            temperature=min(5.0, max(0.0, num("#set-temperature", s.temperature))),
            top_p=min(1.0, max(0.0, num("#set-top-p", s.top_p))),
            max_tokens=int(min(131072, max(1, num("#set-max-tokens", s.max_tokens)))),
            priority=str(self.query_one("#set-priority", Select).value),
        ))
