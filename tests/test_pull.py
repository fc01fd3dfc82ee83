"""``inferno pull``: the daemon downloads a model over real HTTP (a local server on
127.0.0.1 with Range support), resumes, verifies the sha256 and the header, and leaves
nothing in the model directory when anything goes wrong."""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import wait_for
from pull_server import FileServer, HubFile, Plan, sha256_of
from test_registry import write_gguf

from infernod.cli import app as cli
from infernod.client import Event
from infernod.daemon.pullsource import parse, pick_file
from infernod.protocol.errors import InfernoError


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture
def tiny(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "tiny.gguf", n_vocab=20000).read_bytes()


def _entries(d: Any) -> list[str]:
    """What a model directory holds, hidden partial downloads included."""
    models = d.state / "models"
    out = sorted(p.name for p in models.iterdir() if p.name != ".pulls")
    pulls = models / ".pulls"
    return out + sorted(f".pulls/{p.name}" for p in pulls.iterdir()) if pulls.is_dir() else out


def _pull_state(c: Any, pull_id: str) -> dict:
    return next(p for p in c.pulls() if p["pull_id"] == pull_id)


def _wait_end(c: Any, pull_id: str, timeout: float = 60.0) -> dict:
    return wait_for(lambda: (s := _pull_state(c, pull_id))["state"] in
                    ("done", "failed", "cancelled") and s, timeout, f"pull {pull_id} to end")


# ---------------------------------------------------------------- the whole way


def test_pull_by_url_then_load(daemon_factory, server, default_model_path: Path,
                               capsys) -> None:
    d = daemon_factory()
    url = server.add("/files/Gemma-3-270m-Q4_K_M.gguf", default_model_path)
    want = sha256_of(default_model_path)
    with d.client(topics=("models",)) as c:
        c.wait_welcome()
        assert cli.main(["--endpoint", d.endpoint, "pull", url, "--name", "pulled",
                         "--sha256", want]) == 0
        out = capsys.readouterr().out
        assert "pulled pulled" in out and want in out
        progress = [e.body for e in c.event_batch(1.0) if isinstance(e, Event)
                    and e.type == "progress" and e.body.get("model") == "pulled"]
        assert progress and all("rate_bytes_s" in p and p["total_bytes"] ==
                                default_model_path.stat().st_size for p in progress)
        assert {m["name"] for m in c.models()} >= {"pulled", "gemma3-270m"}
        r = c.load("pulled", timeout=120)
        assert r["state"] == "loaded"
    assert _entries(d) == ["pulled.gguf"]
    assert hashlib.sha256((d.state / "models" / "pulled.gguf").read_bytes()).hexdigest() == want
    assert len(server.gets("/files/Gemma-3-270m-Q4_K_M.gguf")) == 1


def test_a_dropped_connection_resumes_with_range(daemon_factory, server,
                                                 default_model_path: Path) -> None:
    size = default_model_path.stat().st_size
    cut = size // 3
    path = "/m/gemma.gguf"
    url = server.add(path, default_model_path, Plan(drop_after=cut))
    d = daemon_factory()
    with d.client() as c:
        r = c.pull(url, sha256=sha256_of(default_model_path), timeout=120)
        assert r["model"] == "gemma" and not r["joined"]
        end = _wait_end(c, r["pull_id"], 120)
        assert end["state"] == "done", end
    first, second = server.gets(path)
    assert "range" not in first.headers and first.sent == cut
    assert second.headers["range"] == f"bytes={cut}-"
    assert first.sent + second.sent == size  # every byte crossed the wire once
    assert _entries(d) == ["gemma.gguf"]


def test_a_daemon_restart_resumes_the_partial_download(daemon_factory, server,
                                                      tiny: bytes) -> None:
    path = "/tiny.gguf"
    url = server.add(path, tiny, Plan(rate=200_000))
    d = daemon_factory()
    with d.client() as c:
        r = c.request("models.pull", {"source": url}, timeout=60)
        wait_for(lambda: _pull_state(c, r["pull_id"])["done_bytes"] > 100_000, 30,
                 "some bytes")
    d.stop(signal.SIGKILL)
    assert "tiny.gguf" not in _entries(d)  # only the hidden partial file
    part, = (d.state / "models" / ".pulls").glob("*.part")
    kept = part.stat().st_size
    assert kept >= 100_000 and tiny.startswith(part.read_bytes())
    d.start()
    with d.client() as c:
        r = c.request("models.pull", {"source": url}, timeout=60)
        assert _wait_end(c, r["pull_id"])["state"] == "done"
    first, second = server.gets(path)
    start = int(second.headers["range"].split("=")[1].rstrip("-"))
    assert start == kept and start + second.sent == len(tiny)  # the rest, and only the rest
    assert (d.state / "models" / "tiny.gguf").read_bytes() == tiny
    assert _entries(d) == ["tiny.gguf"]


# ---------------------------------------------------------------- refusals


def _pull_error(d: Any, body: dict, timeout: float = 60.0) -> InfernoError:
    """The error a pull ends with: in the reply, or in its final state."""
    with d.client() as c:
        try:
            r = c.request("models.pull", body, timeout=timeout)
        except InfernoError as e:
            return e
        end = _wait_end(c, r["pull_id"], timeout)
        assert end["state"] == "failed", end
        return InfernoError.from_wire(end["error"])


def test_a_wrong_checksum_is_refused_and_nothing_is_left(daemon_factory, server, tiny,
                                                        capsys) -> None:
    url = server.add("/a/tiny.gguf", tiny)
    d = daemon_factory()
    assert cli.main(["--endpoint", d.endpoint, "pull", url, "--sha256", "0" * 64]) == 1
    assert "checksum_mismatch" in capsys.readouterr().err
    assert _entries(d) == []
    with d.client() as c:
        assert "tiny" not in {m["name"] for m in c.models()}
        # the name is free again: the right checksum goes through
        r = c.request("models.pull", {"source": url, "sha256": hashlib.sha256(tiny)
                                      .hexdigest()}, timeout=60)
        assert _wait_end(c, r["pull_id"])["state"] == "done"
    assert _entries(d) == ["tiny.gguf"]


def test_garbage_from_the_server_is_refused(daemon_factory, server, tiny) -> None:
    url = server.add("/login/model.gguf", tiny, Plan(garbage=True))
    d = daemon_factory()
    e = _pull_error(d, {"source": url})
    assert e.code == "invalid_model" and "text/html" in e.message
    assert _entries(d) == []


def test_a_stalled_server_fails_the_pull_in_bounded_time(daemon_factory, server,
                                                         tiny) -> None:
    url = server.add("/slow/model.gguf", tiny, Plan(stall_after=50_000))
    d = daemon_factory()
    t0 = time.monotonic()
    e = _pull_error(d, {"source": url, "stall_timeout_s": 1}, timeout=30)
    assert e.code == "pull_failed" and "no data" in e.message
    assert time.monotonic() - t0 < 20
    assert [n for n in _entries(d) if not n.startswith(".pulls/")] == []


def test_too_little_disk_space_is_refused_before_downloading(daemon_factory, server,
                                                             tiny) -> None:
    url = server.add("/huge.gguf", tiny, Plan(announce=2**50))
    d = daemon_factory()
    e = _pull_error(d, {"source": url})
    assert e.code == "insufficient_storage" and e.extra["need_bytes"] == 2**50
    assert _entries(d) == []
    assert server.gets("/huge.gguf")[0].sent == 0


def test_a_missing_file_and_a_bad_source(daemon_factory, server) -> None:
    d = daemon_factory()
    e = _pull_error(d, {"source": server.url("/nope.gguf?X-Amz-Signature=s3cret")})
    assert e.code == "source_not_found" and e.extra["http_status"] == 404
    assert "s3cret" not in e.message  # a presigned URL's signature is never shown
    e = _pull_error(d, {"source": "ftp://example.org/x.gguf"})
    assert e.code == "bad_request"
    e = _pull_error(d, {"source": server.url("/x.safetensors")})
    assert e.code == "bad_request" and ".gguf" in e.message
    assert _entries(d) == []


# ---------------------------------------------------------------- sharing, cancelling


def test_two_pulls_of_one_file_share_one_download_and_cancel(daemon_factory, server,
                                                             tiny, capsys) -> None:
    path = "/shared.gguf"
    url = server.add(path, tiny, Plan(rate=100_000))
    d = daemon_factory()
    with d.client() as a, d.client() as b:
        ra = a.request("models.pull", {"source": url}, timeout=30)
        rb = b.request("models.pull", {"source": url}, timeout=30)
        assert rb["pull_id"] == ra["pull_id"] and rb["joined"] and not ra["joined"]
        assert len(server.gets(path)) == 1
        assert cli.main(["--endpoint", d.endpoint, "pull", "--cancel", "shared"]) == 0
        assert "shared: cancelled" in capsys.readouterr().out
        assert _pull_state(a, ra["pull_id"])["error"]["code"] == "cancelled"
    assert _entries(d) == []


# ---------------------------------------------------------------- Hugging Face


def test_pick_file_as_llama_server_does() -> None:
    files = ["README.md", "model-Q8_0.gguf", "model-Q4_K_M.gguf", "model-IQ4_K_M.gguf",
             "mmproj-model-Q4_K_M.gguf", "big/model-Q4_K_S-00001-of-00002.gguf",
             "big/model-Q4_K_S-00002-of-00002.gguf", "model-Q4_K.gguf"]
    assert pick_file(files, "q4_k_m", "o/r") == "model-Q4_K_M.gguf"
    assert pick_file(files, None, "o/r") == "model-Q4_K_M.gguf"
    assert pick_file(files, "Q4_K", "o/r") == "model-Q4_K.gguf"
    with pytest.raises(InfernoError) as e:
        pick_file(files, "Q4_K_S", "o/r")
    assert e.value.code == "not_supported"
    with pytest.raises(InfernoError) as e:
        pick_file(files, "Q2_K", "o/r")
    assert e.value.code == "source_not_found" and "Q8_0" in e.value.hint
    assert parse("hf.co/org/repo:Q8_0").repo == "org/repo"
    assert parse("hf://org/repo/sub/f.gguf").filename == "sub/f.gguf"


def test_hugging_face_pulls_through_hf_endpoint(daemon_factory, server, tiny,
                                                default_model_path: Path) -> None:
    other = tiny[:-1] + bytes([tiny[-1] ^ 1])
    server.add_repo("org/Gemma-GGUF", [
        HubFile("gemma-Q8_0.gguf", other), HubFile("gemma-Q4_K_M.gguf", tiny),
        HubFile("mmproj-gemma-Q4_K_M.gguf", other),
        HubFile("bad-Q2_K.gguf", tiny, lfs_sha256="1" * 64)])
    d = daemon_factory(env={"HF_ENDPOINT": server.base, "HF_TOKEN": "hf_secret_for_test",
                            "HF_HUB_OFFLINE": "0"})
    with d.client() as c:
        r = c.request("models.pull", {"source": "org/Gemma-GGUF:q4_k_m"}, timeout=60)
        assert r["model"] == "gemma-q4_k_m" and r["sha256"] == hashlib.sha256(tiny).hexdigest()
        assert _wait_end(c, r["pull_id"])["state"] == "done"
        r = c.request("models.pull", {"source": "hf://org/Gemma-GGUF/gemma-Q8_0.gguf"},
                      timeout=60)
        assert _wait_end(c, r["pull_id"])["state"] == "done"
    assert (d.state / "models" / "gemma-q4_k_m.gguf").read_bytes() == tiny
    assert (d.state / "models" / "gemma-q8_0.gguf").read_bytes() == other
    # the hub's sha256 is the one the download is held to
    e = _pull_error(d, {"source": "org/Gemma-GGUF:Q2_K"})
    assert e.code == "checksum_mismatch"
    e = _pull_error(d, {"source": "org/Missing-GGUF:Q4_K_M"})
    assert e.code == "source_not_found"
    e = _pull_error(d, {"source": "org/Gemma-GGUF:Q5_K_M"})
    assert e.code == "source_not_found" and "Q4_K_M" in e.hint
    assert _entries(d) == ["gemma-q4_k_m.gguf", "gemma-q8_0.gguf"]
    auth = {(s.path.split("/")[1], s.headers.get("authorization")) for s in server.seen}
    token = "Bearer hf_secret_for_test"  # HF_TOKEN: on the listing and on every download
    assert {("api", token), ("org", token), ("cdn", token)} <= auth, auth
    assert ("org", None) not in auth and ("cdn", None) not in auth


# ---------------------------------------------------------------- the console


async def test_pull_from_the_console_shows_progress(daemon_factory, server, tiny,
                                                    tmp_path: Path) -> None:
    from test_tui import _until
    from textual.widgets import DataTable, ProgressBar

    from inferno_tui.app import InfernoApp
    from inferno_tui.connection import Settings

    url = server.add("/console.gguf", tiny, Plan(rate=1_000_000))
    d = daemon_factory()
    app = InfernoApp(Settings(endpoint=d.endpoint, data_dir=str(tmp_path)))
    async with app.run_test(size=(80, 24)) as pilot:
        await _until(pilot, lambda: app.snapshot.connection == "connected"
                     and app.snapshot.models, 30, "connected with a model list")
        await pilot.press("d")
        await pilot.press(*url, "enter")
        bar = app.screen.query_one("#models-bar", ProgressBar)
        await _until(pilot, lambda: bar.display and (bar.progress or 0) > 0, 30,
                     "the pull's progress bar")
        p = app.snapshot.progress["console"]
        assert p.action == "pulling" and p.total_bytes == len(tiny) and "/s" in p.message
        table = app.screen.query_one("#models-table", DataTable)
        await _until(pilot, lambda: "console" in {str(k.value) for k in table.rows}, 60,
                     "the pulled model in the table")
        await _until(pilot, lambda: "console pulled" in app.snapshot.notice, 10, "notice")
        assert not bar.display
    assert (d.state / "models" / "console.gguf").read_bytes() == tiny


# ---------------------------------------------------------------- ONNX directories


def _tar(src: Path, top: str, extra: Any = None) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src, arcname=top)
        if extra is not None:
            tf.addfile(extra)
    return buf.getvalue()


def test_an_onnx_directory_pulled_as_an_archive(daemon_factory, server,
                                               tmp_path: Path) -> None:
    import tarfile
    import zipfile

    from onnx_graphs import tiny_encoder

    model = tiny_encoder(tmp_path / "enc")
    server.add("/enc/tiny-encoder.tar.gz", _tar(model, "tiny-encoder"))
    zpath = tmp_path / "flat.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in model.iterdir():
            zf.write(f, f.name)
    server.add("/enc/flat.zip", zpath.read_bytes())
    link = tarfile.TarInfo("tiny-encoder/secret")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    server.add("/enc/evil.tar.gz", _tar(model, "tiny-encoder", link))
    d = daemon_factory()
    with d.client() as c:
        for path in ("/enc/tiny-encoder.tar.gz", "/enc/flat.zip"):
            r = c.pull(server.url(path))
            assert _wait_end(c, r["pull_id"])["state"] == "done"
        listed = {m["name"]: m for m in c.models()}
        assert listed["tiny-encoder"]["kind"] == "onnx" and "flat" in listed
        vectors, _ = c.embed("tiny-encoder", ["hello world"])
        assert vectors.shape[0] == 1
    assert sorted(p.name for p in (d.state / "models" / "tiny-encoder").iterdir()) == \
        ["model.onnx", "tokenizer.json"]
    e = _pull_error(d, {"source": server.url("/enc/evil.tar.gz"), "name": "evil"})
    assert e.code == "unsafe_path" and "secret" in e.message
    assert _entries(d) == ["flat", "tiny-encoder"]


def test_the_daemons_proxy_and_hub_offline_mode_are_honoured(daemon_factory, server,
                                                             tiny) -> None:
    far = "http://models.example.invalid/p/tiny.gguf"  # resolvable only through the proxy
    server.add(far, tiny)
    d = daemon_factory(env={"HTTP_PROXY": server.base, "http_proxy": server.base,
                            "NO_PROXY": "", "no_proxy": "", "HF_HUB_OFFLINE": "1"})
    with d.client() as c:
        r = c.pull(far)
        assert _wait_end(c, r["pull_id"])["state"] == "done"
    assert [s.path for s in server.seen] == [far]  # the request went to the proxy
    e = _pull_error(d, {"source": "org/repo:Q4_K_M"})
    assert e.code == "pull_failed" and "offline" in e.message
    assert _entries(d) == ["tiny.gguf"]


def test_leftovers_of_a_killed_daemon_are_removed_at_start(tmp_path: Path) -> None:
    import os

    from infernod.daemon.fetch import STALE_S, remove_stale

    d = tmp_path / "models"
    (d / ".pulls").mkdir(parents=True)
    keep = [d / "m.gguf", d / ".pulls" / ("a" * 32 + ".part"), d / ".other-hidden"]
    gone = [d / f".pull-{'b' * 32}.ready", d / ".pulls" / ("c" * 32 + ".part")]
    for p in keep + gone:
        p.write_bytes(b"x")
    (d / ".enc.x1y2z3.unpack" / "sub").mkdir(parents=True)
    old = time.time() - STALE_S - 10
    os.utime(gone[1], (old, old))
    assert remove_stale([d]) == 3
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)
    assert not (d / ".enc.x1y2z3.unpack").exists()
