"""Small modal dialogs: ask for a line of text, confirm, a model's settings form."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class AskText(ModalScreen[str | None]):
    """Enter submits, Escape cancels."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, prompt: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.prompt, self.value, self.placeholder = prompt, value, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.prompt)
            yield Input(self.value, placeholder=self.placeholder, id="answer")
            yield Label("[dim]enter: ok · esc: cancel[/]")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip() or None)


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "dismiss(True)", "Yes"), Binding("n,escape", "dismiss(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question)
            yield Label("[b]y[/]: yes · [b]n[/]/esc: no")


class ModelSettingsForm(ModalScreen[tuple[dict[str, str], list[str]] | None]):
    """A model's settings as ``models.show`` lists them, one field each: a field holds the
    model's own value (empty: it follows the config, whose value is the placeholder).
    Ctrl+S (or Enter) returns (values to set, keys to unset); Escape cancels."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"),
                Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, model: str, settings: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.settings = {k: v for k, v in settings.items() if isinstance(v, dict)}

    @staticmethod
    def shown(value: object) -> str:
        if value is None:
            return ""
        if isinstance(value, list):
            return ",".join(map(str, value))
        return str(value).lower() if isinstance(value, bool) else str(value)

    def own(self, key: str) -> str:
        s = self.settings[key]
        return self.shown(s.get("value")) if s.get("source") == "model" else ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="model-settings"):
            yield Label(f"[b]{self.model}[/]: its own settings (empty = the config's) · "
                        "ctrl+s: save · esc")
            with VerticalScroll(id="model-settings-list"), Grid(id="settings-grid"):
                for key, s in self.settings.items():
                    yield Label(key)
                    yield Input(self.own(key), id=f"ms-{key}",
                                placeholder=f"{self.shown(s.get('value'))} "
                                            f"({s.get('source', 'default')})")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def action_save(self) -> None:
        values: dict[str, str] = {}
        unset: list[str] = []
        for key in self.settings:
            typed = self.query_one(f"#ms-{key}", Input).value.strip()
            if typed == self.own(key):
                continue
            if typed:
                values[key] = typed
            else:
                unset.append(key)
        self.dismiss((values, unset))
