"""The daemon connection: connect, resync, pump events into messages, reconnect forever.

Runs as one async worker on Textual's loop (zmq.asyncio needs that loop). It never raises
out of ``run()``: every failure becomes a ``ConnectionChanged("disconnected", why)`` and a
retry with backoff. A daemon restart (new ``boot_id``) also reconnects, which resyncs all
state from the welcome snapshot and ``models.list``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from textual.message import Message

from inferno_tui import messages as m
from infernod.client import AsyncClient, CurveKeys, Event, Notice
from infernod.protocol.errors import DaemonUnavailable, InfernoError

log = logging.getLogger("inferno_tui")

TOPICS = ("metrics", "models", "queue", "stats", "profiles")
COALESCED = ("metrics", "queue", "stats")  # only the newest of a batch is delivered


@dataclass(frozen=True)
class Settings:
    endpoint: str | None = None
    server_key: str | None = None
    client_key: str | None = None
    readonly: bool = False
    timeout_s: float = 5.0
    data_dir: str | None = None  # chat history; None = platformdirs user_data_dir

    def curve(self) -> CurveKeys | None:
        if self.server_key and self.client_key:
            return CurveKeys.from_files(self.server_key, self.client_key)
        return None


def event_messages(events: list[Event]) -> list[Message]:
    """Turn a batch of events into messages, keeping only the newest of coalesced topics."""
    out: list[Message] = []
    newest: dict[str, int] = {}
    for i, ev in enumerate(events):
        if ev.topic in COALESCED and not (ev.topic == "queue" and ev.type == "backpressure"):
            newest[ev.topic] = i
    for i, ev in enumerate(events):
        body = ev.body if isinstance(ev.body, dict) else {}
        if ev.topic == "metrics" and newest.get("metrics") == i:
            out.append(m.MetricsSampled(body))
        elif ev.topic == "queue" and ev.type == "backpressure":
            out.append(m.BackpressureChanged(body))
        elif ev.topic == "queue" and newest.get("queue") == i:
            out.append(m.QueueUpdated(body))
        elif ev.topic == "stats" and newest.get("stats") == i:
            out.append(m.StatsUpdated(body))
        elif ev.topic == "models":
            out.append(m.ModelsEventReceived(ev.type, body))
        elif ev.topic == "profiles":
            out.append(m.ProfileReceived(body))
    return out


def welcome_events(welcome: dict[str, Any]) -> list[Event]:
    """The last value of each state topic, carried by the welcome, as events."""
    out = []
    raw_state = welcome.get("state")
    state: dict[str, Any] = raw_state if isinstance(raw_state, dict) else {}
    for topic, entry in state.items():
        if not isinstance(entry, dict):
            continue
        raw_header = entry.get("header")
        header: dict[str, Any] = raw_header if isinstance(raw_header, dict) else {}
        out.append(Event(str(topic), str(header.get("type", topic)), int(header.get("seq", 0)),
                         str(header.get("boot_id", "")), entry.get("body") or {}))
    return out


class Connection:
    """Owns the AsyncClient; ``client`` is None whenever the daemon is not reachable."""

    def __init__(self, settings: Settings, post: Callable[[Message], Any]) -> None:
        self.settings = settings
        self.post = post
        self.client: AsyncClient | None = None
        self.hello: dict[str, Any] = {}
        self.lost = False

    async def run(self) -> None:
        backoff = 0.25
        while True:
            try:
                await self._session()
                detail = "connection ended"
            except asyncio.CancelledError:
                self._close()
                raise
            except InfernoError as e:  # the client's own words ("no daemon socket at ...")
                detail = e.message
            except (OSError, zmq.ZMQError):  # libzmq's strings mean nothing to a user
                log.exception("connection error")
                detail = "the connection to the daemon broke"
            except Exception:  # never crash the console over one bad reply
                log.exception("connection error")
                detail = "the daemon sent something this console cannot read"
            if self.client is not None:
                backoff = 0.25  # we had been connected: retry quickly
            self._close()
            self.lost = True
            self.post(m.ConnectionChanged("disconnected", f"{detail} (retrying)"))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    async def _session(self) -> None:
        s = self.settings
        if not self.lost:  # once lost, stay "disconnected" (with why) until connected again
            self.post(m.ConnectionChanged("connecting", s.endpoint or "default endpoint"))
        client = AsyncClient(s.endpoint, timeout=s.timeout_s, name="inferno-tui",
                             curve=s.curve(), topics=TOPICS)
        try:
            self.hello = await client.hello()
            welcome = await client.wait_welcome(s.timeout_s)
        except BaseException:
            client.close()
            raise
        self.client = client
        self.lost = False
        self.post(m.ConnectionChanged("connected", client.endpoints.control, dict(self.hello)))
        for msg in event_messages(welcome_events(welcome)):
            self.post(msg)
        client.take_events()  # the welcome already carried their latest values
        await self.resync()
        while True:
            batch = await client.event_batch(0.25)
            for msg in event_messages([ev for ev in batch if isinstance(ev, Event)]):
                self.post(msg)
            if client.restarted or any(isinstance(ev, Notice) and ev.kind == "daemon_restarted"
                                       for ev in batch):
                raise DaemonUnavailable("the daemon restarted", "reconnecting")

    async def resync(self) -> None:
        """Fetch what no topic carries: the model list, and stats/queue where supported."""
        client = self.client
        if client is None:
            return
        self.post(m.ModelsListed(await client.models()))
        caps = set(self.hello.get("capabilities") or [])
        if "stats" in caps:
            self.post(m.StatsUpdated(await client.request("stats")))
        if "queue.list" in caps:
            reply = await client.request("queue.list")
            if isinstance(reply.get("items"), list):
                self.post(m.QueueUpdated(reply))

    async def upload_model(self, path: str, progress: Any = None) -> dict[str, Any]:
        """Send a local model file to the daemon (see ``AsyncClient.upload_model``)."""
        client = self.client
        if client is None:
            raise DaemonUnavailable("not connected to the daemon", "wait for it to reconnect")
        return await client.upload_model(path, progress=progress)

    async def request(self, type_: str, body: dict[str, Any] | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
        client = self.client
        if client is None:
            raise DaemonUnavailable("not connected to the daemon", "wait for it to reconnect")
        return await client.request(type_, body, timeout=timeout)
