"""verify at long context: a tiny model with a 16K window, one 16K-token document per pass (no
padding, so no [T, T] mask), the chunked loss, a progress bar, and the loss-by-position table and
plot — source vs converted on the same documents."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_TEXT, need

from gqa_convert.commands import main

T = 16384


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    from tiny import make_tiny_llama

    from gqa_convert.convert import convert_checkpoint

    text = need(SAMPLE_TEXT).read_text()
    root = tmp_path_factory.mktemp("long")
    src = make_tiny_llama(root / "src", [text], hidden=32, layers=2, heads=4, kv_heads=4, max_pos=T)
    convert_checkpoint(src, root / "kv2", 2, progress=False)
    # Documents far longer than T: the whole sample text, repeated, as one JSONL document each.
    doc = " ".join(text.split()) + " "
    data = root / "long.jsonl"
    data.write_text("".join(json.dumps({"text": doc * 40}) + "\n" for _ in range(2)))
    return src, root / "kv2", data


def test_verify_at_16k_writes_loss_by_position(long_pair, capsys):
    src, kv2, data = long_pair
    rc = main(
        [
            "verify",
            str(kv2),
            "--source",
            str(src),
            "--data",
            str(data),
            "--context",
            "16K",
            "--documents",
            "2",
            "--batch-size",
            "1",
            "--tolerance",
            "100",
            "--no-retrieval",
            "--no-card",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "loss (converted)" in err  # the progress bar's label (stderr)
    ver = json.loads((kv2 / "verification.json").read_text())
    rows = ver["loss"]["by_position"]
    assert ver["context"] == T and ver["data"]["tokens"] == 2 * (T - 1)
    assert [(r["start"], r["end"]) for r in rows] == [
        (0, 1024),
        (1024, 2048),
        (2048, 4096),
        (4096, 8192),
        (8192, 16384),
    ]
    assert sum(r["tokens"] for r in rows) == 2 * (T - 1)
    # The buckets' token-weighted mean is the overall loss: one computation, two views.
    for who in ("source", "converted"):
        mean = sum(r[who] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
        assert mean == pytest.approx(ver["loss"][who], rel=1e-6)
    assert (kv2 / "loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss by position" in out and "8192-16384" in out
