"""Registry: GGUF metadata, scan/import/remove safety, default model, memory planning."""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
from onnx_graphs import generic_graph, tiny_encoder

from infernod.backends.gguf_meta import ModelInfo, read_gguf_info
from infernod.cli import app as cli
from infernod.daemon.memory import LoadedModel, estimate_memory, plan_load
from infernod.daemon.registry import DEFAULT_MODEL_PACKAGE, Registry
from infernod.protocol.errors import InfernoError

MiB = 1 << 20


def write_gguf(
    path: Path,
    arch: str = "llama",
    ctx: int = 2048,
    template: str | None = None,
    n_vocab: int = 100,
    sliding_window: int | None = None,
) -> Path:
    """A tiny but real GGUF: hyperparameters, a tokenizer long enough to be skipped, 2 tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("Tiny Test")
    w.add_context_length(ctx)
    w.add_embedding_length(64)
    w.add_block_count(4)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(n_vocab)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((n_vocab, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    models = tmp_path / "models"
    models.mkdir()
    return models, tmp_path / "state"


# ---------------------------------------------------------------- metadata


def test_tiny_gguf_metadata_matches_gguf_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", template="{{ messages }}")
    info = read_gguf_info("tiny", path)
    reader = gguf.GGUFReader(path)
    assert info.architecture == "llama"
    assert info.param_count == sum(int(t.n_elements) for t in reader.tensors) == 100 * 64 + 64
    assert info.weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert info.context_length == 2048
    assert (info.n_layer, info.n_head, info.n_head_kv, info.embedding_length) == (4, 4, 2, 64)
    assert info.key_length == info.value_length == 16  # embedding / heads when not given
    assert info.quantization == "Q8_0"
    assert info.vocab_size == 100
    assert (info.bos_token, info.eos_token) == ("<t1>", "<t2>")
    assert info.chat_template == "{{ messages }}" and info.has_chat_template
    assert info.metadata["tokenizer.ggml.tokens"] == "<array: 100 x string>"
    assert "tokenizer.chat_template" not in info.metadata
    assert info.to_dict()["has_chat_template"] is True
    assert "chat_template" not in info.to_dict()


def test_non_gguf_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(InfernoError) as e:
        read_gguf_info("bad", bad)
    assert e.value.code == "bad_request"
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(write_gguf(tmp_path / "x.gguf").read_bytes()[:200])
    with pytest.raises(InfernoError, match="not a valid GGUF"):
        read_gguf_info("trunc", truncated)


def test_scan_names_kinds_cache_and_broken_files(dirs: tuple[Path, Path]) -> None:
    models, state = dirs
    write_gguf(models / "Tiny-Model.GGUF")
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    generic_graph(models / "net.onnx")
    tiny_encoder(models / "vision")
    (models / "junk.onnx").write_bytes(b"\x08\x07")  # ir_version, then nothing: not a model
    (models / "notes.txt").write_text("not a model")
    (models / ".hidden.gguf.partial").write_bytes(b"GGUF")
    reg = Registry([models], state)
    names = {m.name: m for m in reg.scan()}
    assert set(names) == {"tiny-model", "net", "vision"}
    assert names["tiny-model"].kind == "gguf" and names["net"].kind == "onnx"
    assert names["vision"].kind == "onnx"
    assert names["net"].onnx["kind"] == "generic" and names["vision"].onnx["kind"] == "embedding"
    assert [i["name"] for i in names["net"].onnx["inputs"]] == ["X", "Y"]
    assert names["net"].onnx["opset"] == 17 and names["tiny-model"].onnx is None
    assert names["net"].size_bytes == (models / "net.onnx").stat().st_size
    assert any("broken.gguf" in p for p in reg.errors)
    assert any("junk.onnx" in p for p in reg.errors)
    first = reg.get("tiny-model")
    reg.scan()
    assert reg.get("tiny-model") == first
    assert len(reg._cache) == 3  # rescans reuse the cached metadata
    write_gguf(models / "Tiny-Model.GGUF", ctx=4096)  # changed file: re-read
    os.utime(models / "Tiny-Model.GGUF", ns=(1, 10**18))
    reg.scan()
    assert reg.get("tiny-model").context_length == 4096


def _set_tensor_type(path: Path, tensor: str, ttype: int) -> None:
    """Rewrite one tensor's ggml type in a GGUF header (1-D tensors: n_dims, dim, type)."""
    data = bytearray(path.read_bytes())
    at = data.index(tensor.encode()) + len(tensor)
    assert struct.unpack_from("<I", data, at)[0] == 1  # n_dims
    struct.pack_into("<I", data, at + 4 + 8, ttype)
    path.write_bytes(bytes(data))


def write_malformed_models(models: Path, scratch: Path) -> dict[str, str]:
    """One model directory entry per way a file can be broken -> a word its reason names."""
    scratch.mkdir(parents=True, exist_ok=True)
    _set_tensor_type(write_gguf(models / "type999.gguf"), "output_norm.weight", 999)
    whole = write_gguf(scratch / "whole.gguf").read_bytes()
    (models / "cut-data.gguf").write_bytes(whole[:-100])  # header intact, weights cut short
    (models / "cut-header.gguf").write_bytes(whole[:300])
    rng = random.Random(12)
    (models / "random.gguf").write_bytes(rng.randbytes(64 * 1024))
    (models / "random-magic.gguf").write_bytes(b"GGUF\x03\0\0\0" + rng.randbytes(4096))
    (models / "empty.gguf").write_bytes(b"")
    (models / "random.onnx").write_bytes(b"\x08" + rng.randbytes(4096))
    tiny_encoder(models / "list-tokenizer")
    (models / "list-tokenizer" / "tokenizer.json").write_text("[]")
    tiny_encoder(models / "bad-truncation")
    tok = json.loads((models / "bad-truncation" / "tokenizer.json").read_text())
    (models / "bad-truncation" / "tokenizer.json").write_text(json.dumps({**tok, "truncation": 5}))
    return {"type999.gguf": "unknown type 999", "cut-data.gguf": "truncated",
            "cut-header.gguf": "not a valid GGUF", "random.gguf": "not a valid GGUF",
            "random-magic.gguf": "not a valid GGUF", "empty.gguf": "not a valid GGUF",
            "random.onnx": "not a readable ONNX", "list-tokenizer": "tokenizer.json"}


def test_malformed_files_are_skipped_with_their_reason(dirs: tuple[Path, Path], tmp_path) -> None:
    models, state = dirs
    write_gguf(models / "good.gguf")
    expected = write_malformed_models(models, tmp_path / "scratch")
    reg = Registry([models], state)
    names = {m.name for m in reg.scan()}  # never raises, whatever is in the directory
    assert names == {"good", "bad-truncation"}  # a bad truncation entry only loses its max
    assert next(m for m in reg.models() if m.name == "bad-truncation").onnx["max_length"] == 512
    skipped = {Path(s["path"]).name: s["reason"] for s in reg.skipped()}
    assert set(skipped) == set(expected), skipped
    for entry, word in expected.items():
        assert word in skipped[entry], (entry, skipped[entry])
    with pytest.raises(InfernoError) as e:  # loading one by name: its reason, not a crash
        reg.get("type999")
    assert e.value.code == "not_supported" and "unknown type 999" in e.value.message
    assert "inferno models" in e.value.hint
    with pytest.raises(InfernoError) as e:
        read_gguf_info("x", models / "cut-data.gguf")  # import checks the same header
    assert e.value.code == "bad_request" and "truncated" in e.value.message


def test_daemon_lists_malformed_files_as_skipped_and_keeps_serving(
        daemon_factory, models_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    bad = tmp_path / "bad-models"
    bad.mkdir()
    expected = write_malformed_models(bad, tmp_path / "scratch")
    d = daemon_factory({"models": {"dirs": [str(models_dir), str(bad)]}})  # startup scan
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps at 80 columns otherwise
    assert cli.main(["--endpoint", d.endpoint, "models"]) == 0
    out = capsys.readouterr().out
    assert "gemma3-270m" in out and f"skipped {len(expected)} file(s)" in out, out
    for entry, word in expected.items():
        line = next(ln for ln in out.splitlines() if f"/{entry}:" in ln)
        assert word in line, line
    with d.client() as c:
        for name in ("type999", "cut-data", "random", "list-tokenizer"):
            with pytest.raises(InfernoError) as e:
                c.load(name, timeout=60)
            assert e.value.code == "not_supported", (name, e.value)
        assert "unknown type 999" in c.request("models.list")["skipped"][-1]["reason"]
        (bad / "dropped-later.gguf").write_bytes(b"GGUF\x03\0\0\0" + b"\xff" * 64)
        assert any("dropped-later" in s["path"] for s in c.model_listing()["skipped"])
        assert c.ping()["pong"]
    assert d.proc.poll() is None


def test_get_unknown_suggests_near_matches(dirs: tuple[Path, Path]) -> None:
    models, state = dirs
    write_gguf(models / "gemma3-270m.gguf")
    reg = Registry([models], state)
    reg.scan()
    with pytest.raises(InfernoError) as e:
        reg.get("gemma3-270")
    assert e.value.code == "unknown_model"
    assert "gemma3-270m" in e.value.hint


@pytest.mark.model
def test_real_default_model_metadata(default_model_path: Path) -> None:
    info = read_gguf_info("gemma3-270m", default_model_path)
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.param_count == 268_098_176
    assert info.context_length == 32768
    assert info.chat_template is None and not info.has_chat_template
    assert (info.n_layer, info.n_head_kv, info.key_length, info.value_length) == (18, 1, 256, 256)
    assert info.sliding_window == 512 and info.swa_layers == 15  # 5 local : 1 global
    assert (info.bos_token, info.eos_token, info.vocab_size) == ("<bos>", "<eos>", 262144)
    # KV sizes llama.cpp logs for this model, 8 seqs x 4096 cells: unified cache (what the
    # engine creates) 96 MiB global + 67.5 MiB SWA (4608 cells); 96 + 480 with swa_full;
    # one stream per sequence 96 + 120 MiB.
    assert estimate_memory(info, 4096, 8, swa_full=False).kv_bytes == int(163.5 * MiB)
    assert estimate_memory(info, 4096, 8, swa_full=True).kv_bytes == 576 * MiB
    assert estimate_memory(info, 4096, 8, False, kv_unified=False).kv_bytes == 216 * MiB
    assert estimate_memory(info, 4000, 1, swa_full=False).kv_bytes == 27 * MiB
    # RSS measured around load + context + a 500-token prefill: 493 MiB (8 slots, unified),
    # 916 MiB (swa_full), 340 MiB (1 slot). The estimate stays within 5% before learning.
    for args, measured in [
        ((4096, 8, False), 493),
        ((4096, 8, True), 916),
        ((4000, 1, False), 340),
    ]:
        total = estimate_memory(info, *args).total_bytes / MiB
        assert abs(total - measured) / measured < 0.05, (args, total)


# ---------------------------------------------------------------- default model


def _fake_package(tmp_path: Path, sha: str) -> types.ModuleType:
    chunks = []
    for i in range(3):
        p = tmp_path / f"part{i}"
        p.write_bytes(bytes([i]) * 1000)
        chunks.append(p)
    mod = types.ModuleType(DEFAULT_MODEL_PACKAGE)
    mod.chunk_paths = lambda: chunks  # type: ignore[attr-defined]
    mod.verify_chunks = lambda: None  # type: ignore[attr-defined]
    mod.EXPECTED_SHA256 = sha  # type: ignore[attr-defined]
    return mod


def test_default_model_missing_package(dirs: tuple[Path, Path], monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, DEFAULT_MODEL_PACKAGE, None)
    reg = Registry([dirs[0]], dirs[1])
    with pytest.raises(InfernoError) as e:
        reg.ensure_default_model()
    assert e.value.code == "not_supported"
    assert "inferno[default-model]" in e.value.hint


def test_default_model_bad_checksum_leaves_nothing(dirs: tuple[Path, Path], tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, DEFAULT_MODEL_PACKAGE, _fake_package(tmp_path, "0" * 64))
    reg = Registry([dirs[0]], dirs[1])
    with pytest.raises(InfernoError, match="sha256 mismatch"):
        reg.ensure_default_model()
    assert list((dirs[1] / "models").iterdir()) == []  # no partial file left behind


def test_default_model_skipped_when_models_exist(dirs: tuple[Path, Path]) -> None:
    write_gguf(dirs[0] / "mine.gguf")
    assert Registry([dirs[0]], dirs[1]).ensure_default_model() is None
    assert not (dirs[1] / "models" / "gemma3-270m.gguf").exists()


@pytest.mark.model
@pytest.mark.slow
def test_default_model_assembled_into_state_dir(tmp_path: Path, default_model_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    reg = Registry([], tmp_path / "state")
    info = reg.ensure_default_model(lambda d, t, m: calls.append((d, t, m)))
    assert info is not None and info.name == "gemma3-270m"
    assert info.path == tmp_path / "state" / "models" / "gemma3-270m.gguf"
    assert info.size_bytes == default_model_path.stat().st_size
    assert info.architecture == "gemma3" and info.quantization == "Q4_K_M"
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1] == info.size_bytes
    assert len(calls) > 10  # real progress, not one call at the end
    assert reg.get("gemma3-270m") == info
    assert reg.ensure_default_model() is None  # second start: nothing to do


# ---------------------------------------------------------------- import / remove / safety


def test_import_copy_with_progress_and_conflict(dirs: tuple[Path, Path], tmp_path) -> None:
    src = write_gguf(tmp_path / "Some Model.gguf")
    reg = Registry([dirs[0]], dirs[1], import_dirs=[tmp_path])
    calls: list[tuple[int, int, str]] = []
    info = reg.import_model(src, progress=lambda d, t, m: calls.append((d, t, m)))
    assert info.name == "some-model" and info.path == dirs[0] / "some-model.gguf"
    assert info.path.read_bytes() == src.read_bytes() and not info.linked
    assert calls[-1][:2] == (src.stat().st_size, src.stat().st_size)
    assert [p.name for p in dirs[0].iterdir()] == ["some-model.gguf"]  # temp file renamed away
    with pytest.raises(InfernoError) as e:
        reg.import_model(src, name="some-model")
    assert e.value.code == "conflict"
    assert reg.import_model(src, name="other").name == "other"


def test_import_rejects_non_models_and_bad_names(dirs: tuple[Path, Path], tmp_path) -> None:
    reg = Registry([dirs[0]], dirs[1], import_dirs=[tmp_path])
    fake = tmp_path / "fake.gguf"
    fake.write_text("just text")
    for src, code in [(fake, "invalid_model"), (Path("/etc/passwd"), "path_not_allowed"),
                      (tmp_path / "nope.gguf", "bad_request")]:
        with pytest.raises(InfernoError) as e:
            reg.import_model(src)
        assert e.value.code == code, src
    src = write_gguf(tmp_path / "ok.gguf")
    for bad in ["../../etc/passwd", "/abs", "UPPER", "a/b", "", ".hidden", "x" * 65]:
        with pytest.raises(InfernoError) as e:
            reg.import_model(src, bad)
        assert e.value.code == "bad_request", bad
    assert list(dirs[0].iterdir()) == []


def test_import_link_then_remove_keeps_target(dirs: tuple[Path, Path], tmp_path) -> None:
    src = write_gguf(tmp_path / "outside.gguf")
    reg = Registry([dirs[0]], dirs[1], import_dirs=[tmp_path])
    info = reg.import_model(src, name="linked", link=True)
    assert info.linked and (dirs[0] / "linked.gguf").resolve() == src
    reg.remove("linked", loaded=set())
    assert not (dirs[0] / "linked.gguf").exists() and src.exists()
    with pytest.raises(InfernoError) as e:
        reg.get("linked")
    assert e.value.code == "unknown_model"


def test_remove_refused_while_loaded(dirs: tuple[Path, Path]) -> None:
    write_gguf(dirs[0] / "busy.gguf")
    reg = Registry([dirs[0]], dirs[1])
    reg.scan()
    with pytest.raises(InfernoError) as e:
        reg.remove("busy", loaded={"busy"})
    assert e.value.code == "model_busy"
    assert (dirs[0] / "busy.gguf").exists()
    reg.remove("busy", loaded={"other"})
    assert not (dirs[0] / "busy.gguf").exists()


def test_remove_path_traversal_is_refused(dirs: tuple[Path, Path], tmp_path) -> None:
    victim = write_gguf(tmp_path / "victim.gguf")
    os.symlink(victim, dirs[0] / "escape.gguf")  # placed by hand, not by inferno
    reg = Registry([dirs[0]], dirs[1])
    reg.scan()
    for name in ["../victim", "../../etc/passwd", str(victim), "/etc/passwd", "escape/../x"]:
        with pytest.raises(InfernoError) as e:
            reg.remove(name, loaded=set())
        assert e.value.code == "bad_request", name
    with pytest.raises(InfernoError) as e:
        reg.remove("escape", loaded=set())
    assert e.value.code == "bad_request" and "outside the model directories" in e.value.message
    assert victim.exists() and (dirs[0] / "escape.gguf").is_symlink()


# ---------------------------------------------------------------- memory


def _info(**kw) -> ModelInfo:
    base = dict(name="m", kind="gguf", path=Path("m.gguf"), size_bytes=100 * MiB, mtime=0.0,
                weights_bytes=100 * MiB, n_layer=12, n_head=8, n_head_kv=2, key_length=64,
                value_length=64, embedding_length=512, vocab_size=32000)  # fmt: skip
    base.update(kw)
    return ModelInfo(**base)


def test_kv_estimate_formula_and_sliding_window() -> None:
    full = estimate_memory(_info(), n_ctx=1024, n_slots=4, swa_full=False)
    assert (
        full.kv_bytes == 2 * 12 * (1024 * 4) * 2 * 64 * 2
    )  # 2 x layers x cells x heads x dim x f16
    assert full.total_bytes == full.weights_bytes + full.kv_bytes + full.overhead_bytes
    swa = _info(sliding_window=128, swa_layers=10)
    small = estimate_memory(swa, n_ctx=4096, n_slots=2, swa_full=False, n_ubatch=128)
    big = estimate_memory(swa, n_ctx=4096, n_slots=2, swa_full=True, n_ubatch=128)
    per_cell_layer = 2 * 64 * 2 * 2
    # unified: global layers hold all 8192 cells, SWA layers pad(128 x 2 + 128) = 512 cells
    assert small.kv_bytes == per_cell_layer * (2 * 8192 + 10 * 512)
    assert big.kv_bytes == per_cell_layer * 12 * 8192
    split = estimate_memory(swa, 4096, 2, False, kv_unified=False, n_ubatch=128)
    assert split.kv_bytes == 2 * per_cell_layer * (2 * 4096 + 10 * 256)
    int8 = estimate_memory(swa, 4096, 2, False, kv_type_bytes=1, n_ubatch=128)
    assert int8.kv_bytes == small.kv_bytes // 2


def test_measured_memory_corrects_later_estimates(dirs: tuple[Path, Path]) -> None:
    write_gguf(dirs[0] / "tiny.gguf")
    reg = Registry([dirs[0]], dirs[1])
    reg.scan()
    info = reg.get("tiny")
    first = reg.estimate_memory(info, 512, 2, False)
    reg.record_measured("tiny", first.total_bytes + 50 * MiB)
    assert (dirs[1] / "memory.json").exists()
    again = Registry([dirs[0]], dirs[1])  # a restart: the correction survives
    again.scan()
    second = again.estimate_memory(again.get("tiny"), 512, 2, False)
    assert second.correction_bytes == 50 * MiB
    assert second.total_bytes == first.total_bytes + 50 * MiB
    again.record_measured("tiny", first.total_bytes + 10 * MiB)  # re-learned, not stacked
    assert again.estimate_memory(info, 512, 2, False).total_bytes == first.total_bytes + 10 * MiB


def test_plan_fits_without_eviction() -> None:
    plan = plan_load("new", 100 * MiB, 1000 * MiB, [LoadedModel("a", 500 * MiB)], now=10.0)
    assert plan.evict == [] and "fits" in plan.reason


def test_plan_evicts_least_recently_used_idle_unpinned() -> None:
    loaded = [
        LoadedModel("recent", 300 * MiB, last_used_s=900.0),
        LoadedModel("oldest", 230 * MiB, last_used_s=760.0),
        LoadedModel("pinned", 200 * MiB, pinned=True, last_used_s=0.0),
        LoadedModel("busy", 200 * MiB, busy=True, last_used_s=1.0),
    ]
    plan = plan_load("y", 250 * MiB, 1000 * MiB, loaded, now=1000.0)
    assert plan.evict == ["oldest"]
    assert plan.messages == ["unloaded oldest (idle 4m, 230 MiB) to fit y"]
    plan = plan_load("y", 500 * MiB, 1000 * MiB, loaded, now=1000.0)
    assert plan.evict == ["oldest", "recent"]


def test_plan_refusal_names_the_numbers() -> None:
    loaded = [LoadedModel("p", 600 * MiB, pinned=True), LoadedModel("b", 100 * MiB, busy=True),
              LoadedModel("idle", 100 * MiB)]  # fmt: skip
    with pytest.raises(InfernoError) as e:
        plan_load("big", 400 * MiB, 1000 * MiB, loaded, now=0.0)
    err = e.value
    assert err.code == "insufficient_memory"
    for text in ["big", "needs 400 MiB", "budget 1000 MiB", "800 MiB used", "100 MiB could be freed",
                 "p pinned", "b busy"]:  # fmt: skip
        assert text in err.message, text
    assert err.extra["need_bytes"] == 400 * MiB and err.extra["freeable_bytes"] == 100 * MiB
    with pytest.raises(InfernoError, match="needs 2000 MiB, budget 1000 MiB"):
        plan_load("huge", 2000 * MiB, 1000 * MiB, [], now=0.0)


def test_plan_replacing_a_loaded_model_does_not_count_it() -> None:
    loaded = [LoadedModel("m", 900 * MiB, busy=False)]
    assert plan_load("m", 950 * MiB, 1000 * MiB, loaded, now=0.0).evict == []
