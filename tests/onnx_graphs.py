"""Small ONNX models built in the tests with onnx.helper, so every expected value is known.

Test helpers only (the ``onnx`` package is a dev dependency, not a runtime one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# W for the generic graph: small integers, so float32 results are exact
GENERIC_W = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=np.float32)

TINY_VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5, "c": 6, "d": 7}
TINY_MAX_LENGTH = 8
# row i is the "hidden state" of token i; [PAD] is huge so a pooling that forgets the mask
# cannot pass by accident
TINY_TABLE = np.array(
    [[1000.0, 1000.0, 1000.0]] + [[float(i), float(i * i), float(-i)] for i in range(1, 8)],
    dtype=np.float32,
)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inferno-tests"
    )
    model.ir_version = 8  # what onnxruntime of every supported version reads
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def generic_graph(path: Path) -> Path:
    """``Z = (X + Y) @ W`` and ``S = X + Y``; X, Y float32 ``["batch", 3]``."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 3])
    z = helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch", 2])
    s = helper.make_tensor_value_info("S", TensorProto.FLOAT, ["batch", 3])
    w = numpy_helper.from_array(GENERIC_W, name="W")
    nodes = [
        helper.make_node("Add", ["X", "Y"], ["S"]),
        helper.make_node("MatMul", ["S", "W"], ["Z"]),
    ]
    return _save(helper.make_graph(nodes, "generic", [x, y], [z, s], initializer=[w]), path)


def tiny_encoder(model_dir: Path, *, with_tokenizer: bool = True) -> Path:
    """A BERT-shaped toy: ``last_hidden_state = TINY_TABLE[input_ids]`` (mask only shaped
    in, so pooling must apply it), plus a WordLevel tokenizer.json with [CLS] ... [SEP]."""
    model_dir.mkdir(parents=True, exist_ok=True)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info(
        "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 3]
    )
    table = numpy_helper.from_array(TINY_TABLE, name="table")
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), name="zero")
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), name="axes")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["gathered"]),
        # mask * 0 added: the mask is a real input of the graph but leaves the states as they are
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["mask3", "zero"], ["nothing"]),
        helper.make_node("Add", ["gathered", "nothing"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_encoder", [ids, mask], [out], initializer=[table, zero, axes]
    )
    _save(graph, model_dir / "model.onnx")
    if with_tokenizer:
        _tiny_tokenizer().save(str(model_dir / "tokenizer.json"))
    return model_dir


def _tiny_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(WordLevel(TINY_VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.enable_truncation(TINY_MAX_LENGTH)
    return tok


def tiny_expected(words: list[str]) -> np.ndarray:
    """Mean of the table rows of [CLS] + words + [SEP]: what embed must give unnormalised."""
    ids = [2] + [TINY_VOCAB.get(w, 1) for w in words][: TINY_MAX_LENGTH - 2] + [3]
    return TINY_TABLE[ids].mean(axis=0)


def slow_graph(path: Path, *, depth: int = 400, width: int = 256) -> Path:
    """``Y = X @ W @ W ...`` (``depth`` MatMul nodes, W the identity): X float32
    ``["batch", width]``. The run time grows with the batch, and onnxruntime checks
    ``RunOptions.terminate`` between nodes, so a big batch is a long run that can be stopped."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", width])
    w = numpy_helper.from_array(np.eye(width, dtype=np.float32), name="W")
    names = ["X"] + [f"h{i}" for i in range(1, depth)] + ["Y"]
    nodes = [helper.make_node("MatMul", [a, "W"], [b]) for a, b in zip(names[:-1], names[1:], strict=True)]
    return _save(helper.make_graph(nodes, "slow", [x], [y], initializer=[w]), path)
