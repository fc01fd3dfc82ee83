"""A/B in chat: one prompt to two models (or two settings of one), side by side, with TTFT,
tok/s and tokens for each.

Both requests go out at once; each side's text and figures are repainted at most four
times a second, and only when they changed (the bytes-on-the-wire rule of the console).
Leaving (Escape or otherwise) cancels what still runs on the daemon: nobody would read it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from inferno_tui import fmt
from inferno_tui.errors import in_words
from inferno_tui.widgets.status import update_if_changed
from inferno_tui.workers import start as start_worker

if TYPE_CHECKING:
    from infernod.client import AsyncClient, AsyncStream


@dataclass
class Side:
    """One half of an A/B: what it asks and what came back."""

    model: str
    params: dict[str, Any]
    parts: list[str] = field(default_factory=list)
    ttft_ms: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    done: bool = False
    error: str = ""

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.model} {extra}".strip()

    def figures(self) -> str:
        state = "done" if self.done else "..."
        if self.error:
            state = self.error
        return (f"TTFT {fmt.ms(self.ttft_ms)} · {fmt.fixed(self.tokens_per_s)} tok/s · "
                f"{fmt.text(self.tokens)} tok · {state}")


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_sides(text: str, default_model: str) -> list[Side]:
    """``"modelA k=v ... | modelB k=v ..."``: each side a model (or, when it starts with
    ``k=v``, the chat's model) and the settings that differ. Raises ValueError."""
    sides = []
    for chunk in text.split("|"):
        words = chunk.split()
        model = default_model
        if words and "=" not in words[0]:
            model, words = words[0], words[1:]
        params: dict[str, Any] = {}
        for w in words:
            key, sep, value = w.partition("=")
            if not sep or not key:
                raise ValueError(f"write key=value, not {w!r}")
            params[key] = _value(value)
        sides.append(Side(model, params))
    if len(sides) != 2 or not all(s.model for s in sides):
        raise ValueError("give two sides separated by '|', e.g. 'modelA | modelB temperature=0'")
    return sides


async def _cancel(stream: AsyncStream) -> None:
    try:
        await stream.cancel()
    except Exception:  # noqa: BLE001 - it ended meanwhile, or the daemon is gone: nothing runs
        pass


class ABScreen(ModalScreen[None]):
    """Escape closes (and stops what still runs)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]
    DEFAULT_CSS = """
    ABScreen { align: center middle; }
    #ab { width: 80; height: 22; border: round $primary; background: $surface; }
    #ab Horizontal { height: 1fr; }
    .ab-side { width: 1fr; padding: 0 1; }
    .ab-text { height: 1fr; }
    .ab-head, .ab-figures { height: auto; }
    """

    def __init__(self, client: AsyncClient, prompt: str, sides: list[Side],
                 base: dict[str, Any], completion: bool) -> None:
        super().__init__()
        self.client, self.prompt, self.sides = client, prompt, sides
        self.base, self.completion = base, completion
        self._submits: list[asyncio.Future[AsyncStream]] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="ab"):
            yield Label(Text(f"A/B: {self.prompt}"[:76], "bold"))
            with Horizontal():
                for i, side in enumerate(self.sides):
                    with Vertical(classes="ab-side"):
                        yield Static(Text(f"{'AB'[i]}: {side.label}", "bold cyan"),
                                     classes="ab-head")
                        yield Static("", classes="ab-figures", id=f"ab-figures-{i}")
                        yield Static("", classes="ab-text", id=f"ab-text-{i}")

    def on_mount(self) -> None:
        for i in range(len(self.sides)):
            start_worker(self, partial(self._run, self.sides[i]), f"ab-{i}")
        self.set_interval(0.25, self._paint)

    def on_unmount(self) -> None:
        """Cancel both requests on the daemon unless they ended: the workers reading them
        stop with this screen, the daemon's generation would not. A request still being
        submitted is cancelled as soon as its stream is known."""
        for submit in self._submits:
            if submit.done():
                self._cancel_unless_ended(submit)
            else:
                submit.add_done_callback(self._cancel_unless_ended)

    def _cancel_unless_ended(self, submit: asyncio.Future[AsyncStream]) -> None:
        if submit.cancelled() or submit.exception() is not None:
            return
        stream = submit.result()
        if not stream.state.done:
            start_worker(self.app, partial(_cancel, stream), "ab-cancel")

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.sides)

    async def _run(self, side: Side) -> None:
        body = {**self.base, **side.params}
        if self.completion:
            body["prompt"] = self.prompt
        else:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        t0 = time.monotonic()
        # shielded: leaving while it is submitted must not lose the request's id (see
        # on_unmount)
        submit = asyncio.ensure_future(self.client.generate(side.model, **body))
        self._submits.append(submit)
        try:
            stream = await asyncio.shield(submit)
            async for text in stream:
                if side.ttft_ms is None:
                    side.ttft_ms = (time.monotonic() - t0) * 1000
                side.parts.append(text)
            stats = stream.stats or {}
            side.tokens = stats.get("completion_tokens", len(side.parts))
            side.tokens_per_s = stats.get("tokens_per_s")
            side.ttft_ms = stats.get("ttft_ms", side.ttft_ms)
        except Exception as e:
            words = in_words(e, f"side {side.label}")
            side.error = f"error: {words.short}"
            side.parts.append(f"\n[{words.why}; {words.todo}]")
        finally:
            side.done = True
            if self.is_mounted:
                self._paint()

    def _paint(self) -> None:
        for i, side in enumerate(self.sides):
            update_if_changed(self.query_one(f"#ab-figures-{i}", Static),
                              Text(side.figures(), "dim"))
            text = "".join(side.parts)
            update_if_changed(self.query_one(f"#ab-text-{i}", Static), Text(text[-1200:]))
