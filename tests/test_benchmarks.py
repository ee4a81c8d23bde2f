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


def test_cpu_runs_record_their_malloc_setting():
    """A CPU run keeps freed memory for reuse (harness.steady_malloc) and says so; the flag
    leaves glibc's defaults. In a subprocess: mallopt changes the process it runs in."""
    import platform
    import subprocess

    code = ("import sys, torch; sys.path.insert(0, {!r}); import harness; "
            "print(harness.prepare(torch.device('cpu'), {})['malloc'])")
    bench = str(Path(harness.__file__).parent)
    steady, default = (subprocess.run([sys.executable, "-c", code.format(bench, flag)], capture_output=True,
                                      text=True, check=True).stdout.strip() for flag in (False, True))
    assert default == "default"
    if platform.libc_ver()[0] == "glibc":
        assert steady.startswith("glibc, freed memory kept"), steady
    else:
        assert steady.startswith("default"), steady


def test_correctness_check_can_fail():
    x = torch.rand(1000) + 0.5
    assert not bench_elementwise._correct("sigmoid", x, torch.sigmoid(x) + 0.01, torch.sigmoid(x))
    assert not bench_elementwise._correct("dropout", x, x.clone(), x)  # nothing dropped


def test_roofline_report_and_compare(tmp_path):
    import bench_batchnorm
    import report
    import roofline

    device = torch.device("cpu")
    rows = bench_batchnorm.run_case((3, 6, 5), True, torch.float32, torch.channels_last, device, 2)
    assert len(rows) == 3 and all(r["correct"] for r in rows)
    peaks = {"source": "test", "bandwidth_gbs": 10.0, "tflops": {"float32": 1.0},
             "measured": {"copy_gbs": 10.0, "gemm_tflops": {"float32": 1.0}}}
    roofline.annotate(rows, peaks)
    assert all(abs(r["pct_peak"] - 10 * r["pyops_gbps"]) < 1e-9 for r in rows)
    env = harness.environment(device)
    env["peaks"] = peaks
    old, new = tmp_path / "old", tmp_path / "new"
    harness.write_rows(rows, env, old, "batchnorm")
    faster = [dict(r, pyops_ms=r["pyops_ms"] / 2) for r in rows]
    harness.write_rows(faster, env, new, "batchnorm")
    written = report.write_report(new)
    text = (new / "report.md").read_text()
    assert "## batchnorm" in text and "% peak" in text and written[0].name == "report.md"
    out = report.compare(old, new)
    assert "3 cases in both; geometric mean old/new 2.000" in out


def test_peaks_table_knows_the_h100():
    import roofline

    assert roofline.table_peaks("NVIDIA H100 80GB HBM3")["bandwidth_gbs"] == 3350
    assert roofline.table_peaks("Some CPU") is None


def test_whole_model_case_runs_and_checks_itself():
    import bench_model

    rows = bench_model.run_case(torch.float32, torch.contiguous_format, torch.device("cpu"),
                                {"batch": 2, "size": 32, "width": 8})
    assert [r["mode"] for r in rows] == ["train step", "inference"]
    assert all(r["correct"] and r["pyops_images_per_s"] > 0 and r["flops"] > 0 for r in rows)
