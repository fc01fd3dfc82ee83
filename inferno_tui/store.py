"""Conversations persisted in SQLite in the user's data dir (platformdirs).

Small, synchronous and local: each call is one short transaction, so the UI thread may call
it directly. Messages carry their per-message stats as JSON.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    stats TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


def default_data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("inferno"))


@dataclass(frozen=True)
class ChatSettings:
    model: str = ""
    mode: str = "chat"  # chat | completion (base models have no chat template)
    system: str = ""
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    priority: str = "normal"

    @classmethod
    def from_json(cls, text: str) -> ChatSettings:
        try:
            d = json.loads(text or "{}")
        except ValueError:
            d = {}
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    settings: ChatSettings
    updated: float


@dataclass(frozen=True)
class ChatMessage:
    id: int
    role: str  # system | user | assistant
    content: str
    stats: dict[str, Any] = field(default_factory=dict)


class ChatStore:
    def __init__(self, path: Path) -> None:
        from infernod.paths import private_sqlite

        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private_sqlite(path)  # conversations are private: 0600, and its -wal/-shm with it
        self.path = path
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def conversations(self) -> list[Conversation]:
        rows = self.db.execute(
            "SELECT id, title, settings, updated FROM conversations ORDER BY updated DESC, id DESC")
        return [Conversation(r[0], r[1], ChatSettings.from_json(r[2]), r[3]) for r in rows]

    def get(self, conv_id: int) -> Conversation | None:
        r = self.db.execute("SELECT id, title, settings, updated FROM conversations WHERE id=?",
                            (conv_id,)).fetchone()
        return None if r is None else Conversation(r[0], r[1], ChatSettings.from_json(r[2]), r[3])

    def create(self, title: str, settings: ChatSettings) -> Conversation:
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO conversations (title, settings, created, updated) VALUES (?,?,?,?)",
                (title, settings.to_json(), now, now))
        return Conversation(int(cur.lastrowid or 0), title, settings, now)

    def rename(self, conv_id: int, title: str) -> None:
        with self.db:
            self.db.execute("UPDATE conversations SET title=? WHERE id=?", (title, conv_id))

    def save_settings(self, conv_id: int, settings: ChatSettings) -> None:
        with self.db:
            self.db.execute("UPDATE conversations SET settings=? WHERE id=?",
                            (settings.to_json(), conv_id))

    def delete(self, conv_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM conversations WHERE id=?", (conv_id,))

    def messages(self, conv_id: int) -> list[ChatMessage]:
        rows = self.db.execute("SELECT id, role, content, stats FROM messages "
                               "WHERE conversation_id=? ORDER BY id", (conv_id,))
        return [ChatMessage(r[0], r[1], r[2], json.loads(r[3]) if r[3] else {}) for r in rows]

    def add_message(self, conv_id: int, role: str, content: str,
                    stats: dict[str, Any] | None = None) -> ChatMessage:
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, stats, created) "
                "VALUES (?,?,?,?,?)",
                (conv_id, role, content, json.dumps(stats) if stats else None, now))
            self.db.execute("UPDATE conversations SET updated=? WHERE id=?", (now, conv_id))
        return ChatMessage(int(cur.lastrowid or 0), role, content, stats or {})

    def delete_message(self, message_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM messages WHERE id=?", (message_id,))

    def export_markdown(self, conv_id: int) -> str:
        conv = self.get(conv_id)
        if conv is None:
            raise KeyError(conv_id)
        s = conv.settings
        lines = [f"# {conv.title}", "",
                 f"*model: {s.model or 'n/a'} · mode: {s.mode} · temperature {s.temperature} · "
                 f"top_p {s.top_p} · max tokens {s.max_tokens}*", ""]
        if s.system:
            lines += ["**System:**", "", s.system, ""]
        for msg in self.messages(conv_id):
            lines += [f"## {msg.role.capitalize()}", "", msg.content.rstrip(), ""]
            if msg.stats:
                lines += [f"*{stats_line(msg.stats)}*", ""]
        return "\n".join(lines)


def slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:48] or "conversation"


def stats_line(stats: dict[str, Any]) -> str:
    from inferno_tui import fmt

    parts = [f"{fmt.text(stats.get('completion_tokens'))} tok",
             f"TTFT {fmt.ms(stats.get('ttft_ms'))}",
             f"{fmt.fixed(stats.get('tokens_per_s'))} tok/s"]
    if stats.get("finish_reason"):
        parts.append(str(stats["finish_reason"]))
    return " · ".join(parts)
