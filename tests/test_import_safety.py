"""Issue 12, item 6: importing a model must not read files with the daemon's rights.

* ONNX external data is checked at scan and at every load: a graph whose weights file is a
  symlink to the daemon's secret key must not hand the key out through ``infer``.
* ``models.import`` by path only from ``models.import_dirs``, never through a symlink, a
  hard link or ``..``, with the whole header validated and nothing left behind on failure.
* ``inferno import FILE`` streams the file from the client (sha256 checked at the end).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import OPSET, generic_graph, tiny_encoder
from test_registry import write_gguf

from infernod.cli import app as cli
from infernod.client import AsyncClient
from infernod.daemon.registry import Registry
from infernod.protocol.errors import InfernoError

SECRET = b"-----CURVE SECRET KEY----- " + bytes(range(37))  # 64 bytes


def leaky_graph(model_dir: Path, secret: Path, how: str = "symlink") -> Path:
    """``out = Identity(blob)``, blob a uint8 [64] initializer kept in external data
    ``weights.bin``, which is then replaced by a symlink (or a hard link) to ``secret``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    blob = numpy_helper.from_array(np.zeros(len(SECRET), dtype=np.uint8), name="blob")
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("out", TensorProto.UINT8, [len(SECRET)])
    echo = helper.make_tensor_value_info("echo", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["blob"], ["out"]),
                               helper.make_node("Identity", ["X"], ["echo"])],
                              "leak", [x], [out, echo], initializer=[blob])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.save_model(model, str(model_dir / "model.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0, all_tensors_to_one_file=True)
    (model_dir / "weights.bin").unlink()
    if how == "symlink":
        os.symlink(secret, model_dir / "weights.bin")
    else:
        os.link(secret, model_dir / "weights.bin")
    return model_dir


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    keys = tmp_path / "state" / "keys"
    keys.mkdir(parents=True)
    path = keys / "server.key_secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------- the key leak, at load


@pytest.mark.parametrize("how, why", [("symlink", "symlink"), ("hardlink", "hard links")])
def test_onnx_external_data_linked_to_secret_is_refused_at_load(tmp_path: Path, secret: Path,
                                                                how: str, why: str) -> None:
    """Recent onnxruntime refuses the symlink itself (``not_supported``), not the hard link:
    on main the hard-linked graph returns the secret key from ``infer``."""
    from infernod.backends.onnx import OnnxModel

    leak = leaky_graph(tmp_path / "models" / "leak", secret, how)
    try:
        model = OnnxModel(leak, providers_pref=("CPU",))
        got = model.infer({"X": {"dtype": "float32", "shape": [1], "data": b"\0\0\0\0"}})
    except InfernoError as e:
        assert e.code == "unsafe_path" and why in e.message, e
        assert e.hint
    else:
        pytest.fail(f"the graph loaded and returned {got['out']['data']!r}")
    # the scan lists the reason instead of the model
    reg = Registry([tmp_path / "models"], tmp_path / "state")
    assert "leak" not in {m.name for m in reg.scan()}
    assert why in reg.errors[str(tmp_path / "models" / "leak")]


def test_external_data_is_checked_where_onnxruntime_opens_it(tmp_path: Path,
                                                             secret: Path) -> None:
    """A graph entry that is a symlink: onnxruntime joins the location to the directory of
    the path it was given (the model directory), not the link target's."""
    from infernod.backends.onnx import OnnxModel

    real = leaky_graph(tmp_path / "elsewhere", tmp_path / "innocent", "symlink")
    (real / "weights.bin").unlink()
    (real / "weights.bin").write_bytes(b"\0" * len(SECRET))  # what a check of the target sees
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(real / "model.onnx", models / "graph.onnx")
    os.link(secret, models / "weights.bin")  # what onnxruntime opens
    try:
        model = OnnxModel(models / "graph.onnx", providers_pref=("CPU",))
        got = model.infer({"X": {"dtype": "float32", "shape": [1], "data": b"\0\0\0\0"}})
    except InfernoError as e:
        assert e.code == "unsafe_path" and "hard links" in e.message, e
    else:
        pytest.fail(f"the graph loaded and returned {got['out']['data']!r}")


@pytest.mark.parametrize("location", ["../keys/server.key_secret", "/etc/passwd",
                                      "sub/../../x"])
def test_onnx_external_data_leaving_the_directory_is_refused(tmp_path: Path,
                                                            location: str) -> None:
    from infernod.backends.onnx_inspect import inspect_onnx

    d = tmp_path / "m"
    leaky_graph(d, tmp_path / "nothing")
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, str(d / "model.onnx"))
    with pytest.raises(InfernoError) as e:
        inspect_onnx(d)
    assert e.value.code == "unsafe_path"


def test_leak_through_the_daemon_is_refused(daemon_factory, tmp_path: Path) -> None:
    """The real path: the daemon's own secret key, a graph in a model dir, ``infer``."""
    base = Path(tempfile.mkdtemp(prefix="inf-", dir="/tmp"))
    key = base / "state" / "keys" / "server.key_secret"
    key.parent.mkdir(parents=True)
    key.write_bytes(SECRET)
    models = tmp_path / "onnx-models"
    leaky_graph(models / "leak", key, "hardlink")
    leaky_graph(models / "leak2", key, "symlink")
    generic_graph(models / "generic.onnx")
    d = daemon_factory({"models": {"dirs": [str(models)]},
                        "onnx": {"intra_op_threads": 1, "providers": ["CPU"]}}, base=base)
    with d.client(timeout=60) as c:
        names = {m["name"] for m in c.models()}
        assert "generic" in names
        for name in ("leak", "leak2"):
            try:
                out, _ = c.infer(name, {"X": np.zeros(1, dtype=np.float32)})
            except InfernoError as e:
                # skipped by the scan; loading it by name says why
                assert e.code == "not_supported" and "external data" in e.message, e
            else:
                pytest.fail(f"the daemon returned its secret key: {out['out'].tobytes()!r}")
        # the model next to it still serves
        out, _ = c.infer("generic", {"X": np.ones((1, 3), np.float32),
                                     "Y": np.ones((1, 3), np.float32)})
        assert out["S"].tolist() == [[2.0, 2.0, 2.0]]


# ---------------------------------------------------------------- import by path


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    (tmp_path / "models").mkdir()
    (tmp_path / "allowed").mkdir()
    return Registry([tmp_path / "models"], tmp_path / "state",
                    import_dirs=[tmp_path / "allowed"])


def _left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "models").iterdir())


def _refused(reg: Registry, src: Path | str, code: str, **kw) -> InfernoError:
    with pytest.raises(InfernoError) as e:
        reg.import_model(src, **kw)
    assert e.value.code == code, e.value
    assert e.value.hint
    return e.value


def test_import_only_from_import_dirs(reg: Registry, tmp_path: Path, secret: Path) -> None:
    outside = write_gguf(tmp_path / "outside.gguf")
    _refused(reg, outside, "path_not_allowed")
    _refused(reg, secret, "path_not_allowed")
    _refused(reg, str(tmp_path / "allowed" / ".." / "outside.gguf"), "unsafe_path")
    _refused(reg, "allowed/x.gguf", "bad_request")
    none = Registry([tmp_path / "models"], tmp_path / "state")  # the default: no import dirs
    e = _refused(none, write_gguf(tmp_path / "allowed" / "ok.gguf"), "path_not_allowed")
    assert "inferno import FILE" in e.hint
    assert _left(tmp_path) == []
    info = reg.import_model(tmp_path / "allowed" / "ok.gguf")
    assert info.path == tmp_path / "models" / "ok.gguf" and not info.linked


def test_import_refuses_symlinks_and_hard_links(reg: Registry, tmp_path: Path,
                                                secret: Path) -> None:
    allowed = tmp_path / "allowed"
    real = write_gguf(tmp_path / "real.gguf")
    os.symlink(secret, allowed / "key.gguf")
    os.symlink(real, allowed / "real-link.gguf")  # even a link to a valid model
    os.symlink(tmp_path, allowed / "up")  # a directory symlink on the way
    os.link(write_gguf(tmp_path / "hard.gguf"), allowed / "hard.gguf")
    for src in ["key.gguf", "real-link.gguf", "up/real.gguf", "up/state/keys/server.key_secret",
                "hard.gguf"]:
        e = _refused(reg, allowed / src, "unsafe_path")
        assert "nothing was imported" in e.message
    e = _refused(reg, allowed / "real-link.gguf", "unsafe_path", link=True)
    # a directory model with a symlink inside (its external data, or any file)
    enc = tiny_encoder(allowed / "enc")
    os.symlink(secret, enc / "vocab.txt")
    _refused(reg, enc, "unsafe_path")
    leaky_graph(allowed / "leak", secret)
    _refused(reg, allowed / "leak", "unsafe_path")
    assert _left(tmp_path) == []  # no partial copies either


def test_import_validates_the_whole_header_and_leaves_nothing(reg: Registry,
                                                              tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "first-byte.onnx").write_bytes(b"\x08" + os.urandom(4096))
    (allowed / "magic-only.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    (allowed / "truncated.gguf").write_bytes(good[: len(good) - 4096])
    (allowed / "empty.gguf").write_bytes(b"")
    (allowed / "dir-no-graph").mkdir()
    for src in ["first-byte.onnx", "magic-only.gguf", "truncated.gguf", "empty.gguf",
                "dir-no-graph"]:
        _refused(reg, allowed / src, "invalid_model")
    generic_graph(allowed / "generic.onnx")
    tiny_encoder(allowed / "enc")
    assert _left(tmp_path) == []
    assert reg.import_model(allowed / "generic.onnx").kind == "onnx"
    enc = reg.import_model(allowed / "enc", name="enc")
    assert enc.onnx and enc.onnx["kind"] == "embedding"
    linked = reg.import_model(allowed / "enc", name="enc-link", link=True)
    assert linked.linked
    assert _left(tmp_path) == ["enc", "enc-link", "generic.onnx"]


def test_import_over_the_daemon_is_refused_outside_import_dirs(daemon_factory,
                                                              tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "elsewhere.gguf")
    d = daemon_factory()
    with d.client() as c:
        with pytest.raises(InfernoError) as e:
            c.import_path(str(src))
        assert e.value.code == "path_not_allowed"
    assert not any(p.name.startswith("elsewhere") for p in (d.state / "models").iterdir())


# ---------------------------------------------------------------- upload from the client


@pytest.fixture
def small_chunks(daemon_factory):
    """A daemon whose messages are 64 KiB at most, so a 1.3 MB model takes 21 chunks."""
    return daemon_factory({"daemon": {"max_message_bytes": 65536}})


def test_upload_round_trips_with_sha256(small_chunks, tmp_path: Path, capsys) -> None:
    src = write_gguf(tmp_path / "Uploaded Model.gguf", n_vocab=5000)
    data = src.read_bytes()
    seen: list[tuple[int, int]] = []
    with small_chunks.client() as c:
        r = c.upload_model(src, progress=lambda done, total: seen.append((done, total)))
        assert r["model"] == "uploaded-model"
        assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["size"] == len(data)
        listed = {m["name"]: m for m in c.models()}
        assert listed["uploaded-model"]["kind"] == "gguf"
        with pytest.raises(InfernoError) as e:  # the name is taken now
            c.upload_model(src)
        assert e.value.code == "conflict"
    assert len(seen) > 10 and seen[-1] == (len(data), len(data))
    models = small_chunks.state / "models"
    assert (models / "uploaded-model.gguf").read_bytes() == data
    assert [p.name for p in models.iterdir()] == ["uploaded-model.gguf"]
    # the CLI streams too, and says what it did
    other = write_gguf(tmp_path / "cli.gguf")
    assert cli.main(["--endpoint", small_chunks.endpoint, "import", str(other),
                     "--name", "via-cli"]) == 0
    out = capsys.readouterr().out
    assert "imported via-cli" in out and hashlib.sha256(other.read_bytes()).hexdigest() in out


def test_corrupted_upload_is_refused_and_cleaned_up(small_chunks, tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf", n_vocab=2000)
    data = src.read_bytes()
    models = small_chunks.state / "models"
    with small_chunks.client() as c:
        b = c.request("models.upload.begin", {"filename": "m.gguf", "size": len(data)})
        step = b["chunk_bytes"]
        assert step < 65536 and b["offset"] == 0
        assert any(p.name.endswith(".partial") for p in models.iterdir())
        for off in range(0, len(data), step):
            chunk = data[off : off + step]
            if off == step:  # one flipped byte on the way
                chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
            c.request("models.upload.chunk", {"upload_id": b["upload_id"], "offset": off,
                                              "data": chunk})
        with pytest.raises(InfernoError) as e:
            c.request("models.upload.finish", {"upload_id": b["upload_id"],
                                               "sha256": hashlib.sha256(data).hexdigest()})
        assert e.value.code == "checksum_mismatch"
        assert list(models.iterdir()) == []  # partial file gone
        with pytest.raises(InfernoError) as e:
            c.request("models.upload.chunk", {"upload_id": b["upload_id"], "offset": 0,
                                              "data": b"x"})
        assert e.value.code == "unknown_upload"
        assert "m" not in {m["name"] for m in c.models()}
        # a file that only looks like a model: refused at the first chunk
        junk = tmp_path / "junk.gguf"
        junk.write_bytes(os.urandom(10000))
        with pytest.raises(InfernoError) as e:
            c.upload_model(junk)
        assert e.value.code == "invalid_model"
        # right magic, broken header: refused at finish, after the sha256 matched
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(data[:200])
        with pytest.raises(InfernoError) as e:
            c.upload_model(broken)
        assert e.value.code == "invalid_model"
        assert list(models.iterdir()) == []
        # the name is free again: the intact file goes through
        assert c.upload_model(src)["model"] == "m"


def test_interrupted_upload_resumes_or_aborts(small_chunks, tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "resume.gguf", n_vocab=3000)
    data = src.read_bytes()
    models = small_chunks.state / "models"

    def stop_after(n: int):
        def progress(done: int, total: int) -> None:
            if done >= n:
                raise KeyboardInterrupt
        return progress

    with small_chunks.client() as c:  # Ctrl-C: the client aborts, nothing is left
        with pytest.raises(KeyboardInterrupt):
            c.upload_model(src, progress=stop_after(100_000))
        assert list(models.iterdir()) == []
    with small_chunks.client() as c:  # connection lost half-way: the next client resumes
        b = c.request("models.upload.begin", {"filename": "resume.gguf", "size": len(data)})
        c.request("models.upload.chunk", {"upload_id": b["upload_id"], "offset": 0,
                                          "data": data[:50_000]})
    with small_chunks.client() as c:
        begun: list[int] = []
        r = c.upload_model(src, progress=lambda done, total: begun.append(done))
        assert begun[0] == 50_000 and r["sha256"] == hashlib.sha256(data).hexdigest()
    assert (models / "resume.gguf").read_bytes() == data
    assert [p.name for p in models.iterdir()] == ["resume.gguf"]


async def test_async_client_uploads_and_cancel_aborts(small_chunks, tmp_path: Path) -> None:
    """AsyncClient shares the upload steps: the same round trip, and a cancelled task
    aborts its upload (nothing left on the daemon)."""

    src = write_gguf(tmp_path / "async.gguf", n_vocab=3000)
    models = small_chunks.state / "models"
    async with AsyncClient(small_chunks.endpoint, timeout=10) as c:
        reached = asyncio.Event()

        def progress(done: int, total: int) -> None:
            if done > 100_000:
                reached.set()

        task = asyncio.ensure_future(c.upload_model(src, "cancelled", progress=progress))
        await asyncio.wait_for(reached.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        assert list(models.iterdir()) == []
        r = await c.upload_model(src)
        assert r["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert [p.name for p in models.iterdir()] == ["async.gguf"]


def test_partial_uploads_are_removed_at_start_and_stop(daemon_factory) -> None:
    d = daemon_factory(start=False)
    models = d.state / "models"
    models.mkdir(parents=True)
    stale = models / f".upload-{'0' * 32}.partial"
    stale.write_bytes(b"GGUF" + b"\0" * 100)
    keep = models / ".other-hidden-file"
    keep.write_bytes(b"x")
    d.start()
    with d.client() as c:
        c.ping()
        end = time.monotonic() + 10
        while stale.exists() and time.monotonic() < end:
            time.sleep(0.05)
    assert not stale.exists() and keep.exists()
    with d.client() as c:  # a clean stop deletes the uploads in progress
        c.request("models.upload.begin", {"filename": "x.gguf", "size": 1000})
        assert any(p.name.startswith(".upload-") for p in models.iterdir())
    assert d.stop() == 0
    assert not any(p.name.startswith(".upload-") for p in models.iterdir())


async def test_uploads_are_private_ordered_and_bounded(tmp_path: Path) -> None:
    """The upload table without a daemon: another principal cannot see or feed an upload,
    chunks must come in order and fit, and one principal holds at most 2 uploads."""
    from infernod.daemon import uploads as up_mod
    from infernod.daemon.server import Call

    (tmp_path / "models").mkdir()
    reg = Registry([tmp_path / "models"], tmp_path / "state")
    ups = up_mod.Uploads(reg, 65536, lambda *a: None, lambda name: None)

    def req(principal: str, **body) -> Call:
        return Call(b"id", {"id": "1", "type": "x", "session": "s"}, body, "operator",
                       0.0, principal)

    data = write_gguf(tmp_path / "a.gguf", n_vocab=3000).read_bytes()
    assert len(data) > 2 * ups.chunk_bytes
    b = await ups.begin(req("uid:1", filename="a.gguf", size=len(data)))
    uid = b["upload_id"]
    for call in (ups.chunk(req("uid:2", upload_id=uid, offset=0, data=data[:10])),
                 ups.finish(req("uid:2", upload_id=uid, sha256="0" * 64)),
                 ups.abort(req("uid:2", upload_id=uid))):
        with pytest.raises(InfernoError) as e:
            await call
        assert e.value.code == "unknown_upload"
    with pytest.raises(InfernoError) as e:
        await ups.chunk(req("uid:1", upload_id=uid, offset=5, data=data[:10]))
    assert e.value.code == "conflict" and e.value.extra["offset"] == 0
    with pytest.raises(InfernoError) as e:
        await ups.chunk(req("uid:1", upload_id=uid, offset=0, data=data[: ups.chunk_bytes + 1]))
    assert e.value.code == "bad_request"
    with pytest.raises(InfernoError) as e:  # the name is held by the upload in progress
        await ups.begin(req("uid:2", filename="a.gguf", size=len(data)))
    assert e.value.code == "conflict"
    await ups.begin(req("uid:1", filename="b.gguf", size=10))
    with pytest.raises(InfernoError) as e:
        await ups.begin(req("uid:1", filename="c.gguf", size=10))
    assert e.value.code == "conflict" and "too many uploads" in e.value.message
    for bad in ("../x.gguf", "x.txt"):
        with pytest.raises(InfernoError) as e:
            await ups.begin(req("uid:3", filename=bad, size=10))
        assert e.value.code == "bad_request"
    await ups.close()
    assert list((tmp_path / "models").iterdir()) == []
