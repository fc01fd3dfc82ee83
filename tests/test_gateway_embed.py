"""/v1/embeddings through the real gateway: MiniLM (ONNX) served by the real daemon, called
with the real `openai` package (which asks for base64 unless told otherwise) and as floats."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from daemon_harness import DaemonProcess
from gateway_harness import GatewayProcess, daemon_and_gateway
from test_onnx import _minilm_dir

ONNX_CONFIG = {"onnx": {"intra_op_threads": 1, "inter_op_threads": 1, "providers": ["CPU"]}}


@pytest.fixture(scope="module")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[DaemonProcess, GatewayProcess, Path]]:
    onnx_dir = tmp_path_factory.mktemp("onnx-models")
    os.symlink(_minilm_dir(), onnx_dir / "minilm")
    with daemon_and_gateway({"models": {"dirs": [str(models_dir), str(onnx_dir)]},
                            **ONNX_CONFIG}, tmp_path_factory.mktemp("gw")) as (daemon, gateway):
        yield daemon, gateway, onnx_dir / "minilm"


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_minilm_embeddings_match_the_reference(stack) -> None:
    _, gw, minilm = stack
    ref = json.loads((minilm / "reference.json").read_text())
    want = _unit(np.array(ref["vectors"], dtype=np.float32))
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", timeout=120,
                        max_retries=0)
    assert "minilm" in [m.id for m in oai.models.list()]
    for fmt in ("base64", "float"):
        raw = oai.embeddings.with_raw_response.create(model="minilm", input=ref["sentences"],
                                                      encoding_format=fmt)
        assert raw.headers["x-request-id"]
        got = raw.parse()
        assert got.object == "list" and got.model == "minilm"
        assert [d.index for d in got.data] == list(range(len(ref["sentences"])))
        if fmt == "base64":  # asked for explicitly: the SDK hands the strings back as sent
            vectors = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
                                for d in got.data])
        else:
            vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
        assert vectors.shape == (len(ref["sentences"]), 384)
        assert ((vectors * want).sum(axis=1) >= 0.999).all()
        assert got.usage.prompt_tokens > len(ref["sentences"]) * 2
    one = oai.embeddings.create(model="minilm", input=ref["sentences"][0])  # SDK's default
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert np.dot(np.array(one.data[0].embedding), want[0]) >= 0.999


def test_embedding_errors(stack) -> None:
    gw = stack[1]
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", timeout=60,
                        max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="minilm", input=[[1, 2, 3]])  # token arrays
    assert e.value.body["param"] == "input"  # type: ignore[index]
