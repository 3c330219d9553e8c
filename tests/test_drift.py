"""brewslm_helpers.drift: request streams, features, the endpoint client (against a stub server),
the damaged GGUF and package versions. PSI, KS, the bootstrap and the verdict are the lesson's
exercises and are not here."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from brewslm_helpers import drift


def test_traffic_streams_are_seeded_and_differ():
    a, b = drift.traffic("normal", 20, seed=1), drift.traffic("normal", 20, seed=1)
    assert a == b and len({r["text"] for r in a}) == 20
    s = drift.traffic("shifted", 50, seed=2)
    assert s == drift.traffic("shifted", 50, seed=2) and {r["label"] for r in s} == {"positive", "negative"}
    with pytest.raises(ValueError):
        drift.traffic("weird", 3, seed=0)


def test_input_features_see_the_shift():
    vocab = drift.training_vocabulary()
    normal = drift.input_features([r["text"] for r in drift.traffic("normal", 100, 0)], vocab)
    shifted = drift.input_features([r["text"] for r in drift.traffic("shifted", 100, 0)], vocab)
    assert set(normal) == set(drift.INPUT_FEATURES)
    assert normal["oov_rate"].max() == 0.0                  # training reviews: no unknown words
    assert shifted["oov_rate"].mean() > 0.3
    assert shifted["n_words"].mean() > normal["n_words"].mean()
    assert shifted["non_ascii"].mean() > normal["non_ascii"].mean()
    f = drift.input_features(["Café!", ""], {"café"})
    assert f["n_words"].tolist() == [1, 0] and f["oov_rate"].tolist() == [0.0, 0.0]
    assert f["non_ascii"][0] == pytest.approx(1 / 5)


class _Stub(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["max_tokens"] == 1 and body["logprobs"] >= 2 and body["temperature"] == 0.0
        if "FAIL" in body["prompt"]:
            self.send_response(500)
            self.end_headers()
            return
        tops = {" positive": np.log(0.6), " negative": np.log(0.2), " neutral": np.log(0.1)}
        if "ONLYPOS" in body["prompt"]:
            tops = {" positive": np.log(0.9), " The": np.log(0.05)}
        out = {"choices": [{"text": " positive", "logprobs": {"top_logprobs": [tops]}}],
               "usage": {"total_tokens": 42}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _Tok:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<user>" + messages[0]["content"] + "<assistant>"


@pytest.fixture()
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_score_requests_against_a_stub(stub_url):
    rows = [{"text": "nice", "label": "positive"}, {"text": "FAIL", "label": "positive"},
            {"text": "ONLYPOS", "label": "negative"}]
    out = drift.score_requests(stub_url, _Tok(), rows, concurrency=2)
    assert out["p_positive"][0] == pytest.approx(0.75)
    assert np.isnan(out["p_positive"][1]) and out["error"].tolist() == [False, True, False]
    assert out["p_positive"][2] == pytest.approx(0.9 / (0.9 + 0.05))   # missing label: the floor
    assert out["predicted"].tolist() == ["positive", "error", "positive"]
    assert out["correct"].tolist() == [1.0, 0.0, 0.0] and out["tokens"].tolist() == [42, 0, 42]
    assert drift.answer_prompt(_Tok(), "x").endswith("<assistant>This review is")


def test_package_versions():
    v = drift.package_versions(("numpy", "surely-not-a-package-xyz"))
    assert v == {"numpy": np.__version__, "surely-not-a-package-xyz": "not installed"}


def test_damaged_gguf_loads_with_zeroed_pages():
    import gguf

    path = drift.damaged_gguf(fraction=0.2)
    assert path.exists() and path == drift.damaged_gguf(fraction=0.2)          # cached
    reader = gguf.GGUFReader(str(path))
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q3_K" in types or "Q2_K" in types
    mats = [t for t in reader.tensors if len(t.shape) == 2]
    zero_pages = sum(int((np.asarray(t.data).view(np.uint8).reshape(-1)[: t.n_bytes // 4096 * 4096]
                          .reshape(-1, 4096) == 0).all(axis=1).sum()) for t in mats)
    total = sum(t.n_bytes // 4096 for t in mats)
    assert 0.15 < zero_pages / total < 0.25
