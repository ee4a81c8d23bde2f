"""The benchmark harness works end to end on tiny cases (no timing is asserted)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_elementwise  # noqa: E402
import harness  # noqa: E402


def test_compare_interleaves_and_reports_spread():
    calls = []
    t = harness.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                        torch.device("cpu"), rounds=3, min_sample_ms=0.01)
    assert set(t) == {"a", "b"}
    assert all(v.samples == 3 and v.p20_ms <= v.median_ms <= v.p80_ms for v in t.values())
    assert calls.count("a") >= 3 and calls.count("b") >= 3
    # interleaved: after warm-up, neither provider runs all its samples in one block
    timed = calls[6:]
    assert timed[0] != timed[-1]


def test_elementwise_rows_and_json(tmp_path):
    rows = []
    for op in ("sigmoid", "dropout"):
        rows += bench_elementwise.run_case(op, (3, 8, 5, 7), torch.float32, torch.channels_last, torch.device("cpu"))
    assert len(rows) == 6 and all(r["correct"] for r in rows)
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    env = harness.environment(torch.device("cpu"))
    path = harness.write_rows(rows, env, tmp_path, "elementwise")
    data = json.loads(path.read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert data["rows"][0]["bytes"] == 2 * 3 * 8 * 5 * 7 * 4
    assert "speedup" in harness.format_table(rows)


def test_correctness_check_can_fail():
    x = torch.rand(1000) + 0.5
    assert not bench_elementwise._correct("sigmoid", x, torch.sigmoid(x) + 0.01, torch.sigmoid(x))
    assert not bench_elementwise._correct("dropout", x, x.clone(), x)  # nothing dropped
