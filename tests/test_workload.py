import json
import re

import pytest

from xbench.errors import DataError
from xbench.workload import load_jsonl, synthetic


def test_synthetic_is_deterministic_and_msmarco_shaped():
    a, b = synthetic(512, seed=3), synthetic(512, seed=3)
    assert a.request(7, 16) == b.request(7, 16)
    assert synthetic(512, seed=4).request(7, 16) != a.request(7, 16)
    qlens = [len(q.split()) for q in a.queries]
    dlens = [len(d.split()) for docs in a.documents for d in docs]
    assert 4 <= min(qlens) and max(qlens) <= 10
    assert 10 <= min(dlens) and max(dlens) <= 200
    assert 50 < sum(dlens) / len(dlens) < 62


def test_request_has_batch_distinct_documents():
    req = synthetic(1024).request(0, 128)
    assert len(req.documents) == 128 and len(set(req.documents)) == 128


def test_jsonl_pairs_group_by_query_and_documents_lines(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        {"query": "q1", "document": "a"}, {"query": "q1", "document": "b"},
        {"query": "q2", "documents": ["c", {"text": "d"}]},
    ]))
    w = load_jsonl(f)
    assert w.queries == ["q1", "q2"]
    assert w.documents == [["a", "b"], ["c", "d"]]
    assert w.request(1, 2).pairs == [("q2", "c"), ("q2", "d")]


@pytest.mark.parametrize("line,fragment", [
    ("{not json", "not valid JSON"),
    ('{"document": "x"}', 'string "query"'),
    ('{"query": "q", "documents": []}', "non-empty list"),
    ('{"query": "q", "documents": [3]}', "documents[0]"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, fragment):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"query": "q", "document": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(fragment)) as err:
        load_jsonl(f)
    assert "bad.jsonl:2" in str(err.value)


def test_missing_data_file():
    with pytest.raises(DataError, match="no such file"):
        load_jsonl("/nonexistent/pairs.jsonl")


def test_a_data_file_is_named_by_its_hash(tmp_path):
    import hashlib

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q", "document": "d"}\n')
    assert load_jsonl(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text('{"query": "q", "document": "e"}\n')
    assert load_jsonl(path).sha256 != hashlib.sha256(b'{"query": "q", "document": "d"}\n').hexdigest()
