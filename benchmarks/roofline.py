"""What this device can do at best: peak memory bandwidth and matmul rate, for roofline fractions.

Known GPUs take their datasheet peaks (dense, no sparsity) from PEAKS; every device also
gets a measured copy bandwidth and GEMM rate (on the CPU these are the only ceiling:
the machine's own copy and ``torch.mm`` rates, measured at the start of a run). Each
result row then gets ``pct_peak``: its achieved TFLOP/s over the dtype's peak (compute-
bound ops: conv, whole models) or its GB/s over the bandwidth (everything else).
"""
from __future__ import annotations

import time

import torch

# Datasheet peaks: HBM bandwidth in GB/s, dense TFLOP/s per dtype (float32 = the
# non-tensor-core rate, as TF32 is switched off in our runs).
PEAKS = {
    "H100 80GB HBM3": {"bandwidth_gbs": 3350, "tflops": {"float16": 989, "bfloat16": 989, "float32": 67,
                                                         "float64": 67}},      # H100 SXM5
    "H100 PCIe": {"bandwidth_gbs": 2000, "tflops": {"float16": 756, "bfloat16": 756, "float32": 51,
                                                    "float64": 51}},
    "H200": {"bandwidth_gbs": 4800, "tflops": {"float16": 989, "bfloat16": 989, "float32": 67, "float64": 67}},
    "A100": {"bandwidth_gbs": 2039, "tflops": {"float16": 312, "bfloat16": 312, "float32": 19.5,
                                               "float64": 19.5}},           # A100 SXM4 80GB
}


def table_peaks(name: str) -> dict | None:
    """The PEAKS entry whose key occurs in the device name (None for an unknown device)."""
    for key, peaks in PEAKS.items():
        if key.lower() in name.lower():
            return {"source": f"datasheet ({key})", **peaks}
    return None


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps runs."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(device: torch.device) -> dict:
    """This device's copy bandwidth (GB/s, read + write) and GEMM rate (TFLOP/s) per dtype, measured now."""
    big = device.type == "cuda"
    n = (256 if big else 32) << 20  # bytes per copy: well past every cache
    src = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), device, 10)
    rates = {}
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if big else [torch.float32]
    for dtype in dtypes:
        m = 8192 if big else 1024
        a = torch.randn(m, m, device=device).to(dtype)
        b = torch.randn(m, m, device=device).to(dtype)
        rates[str(dtype).replace("torch.", "")] = 2 * m**3 / _time(lambda: torch.mm(a, b), device, 5) / 1e12
    return {"copy_gbs": 2 * n / copy_s / 1e9, "gemm_tflops": rates}


def device_peaks(device: torch.device, name: str) -> dict:
    """The ceilings pct_peak is taken against: the datasheet's if known, else the measured ones."""
    measured = measure(device)
    peaks = table_peaks(name) if device.type == "cuda" else None
    if peaks is None:
        peaks = {"source": "measured (copy_, torch.mm)", "bandwidth_gbs": measured["copy_gbs"],
                 "tflops": dict(measured["gemm_tflops"])}
    peaks["measured"] = measured
    return peaks


def annotate(rows: list[dict], peaks: dict) -> list[dict]:
    """Add ``pct_peak`` (percent of the device's ceiling) to every row, in place; returns rows."""
    for r in rows:
        dtype = r["dtype"].replace("torch.", "")
        if "pyops_tflops" in r:
            peak = peaks["tflops"].get(dtype) or max(peaks["tflops"].values())
            r["pct_peak"] = 100 * r["pyops_tflops"] / peak
            r["peak_kind"] = f"{dtype} TFLOP/s"
        elif "pyops_gbps" in r:
            r["pct_peak"] = 100 * r["pyops_gbps"] / peaks["bandwidth_gbs"]
            r["peak_kind"] = "bandwidth"
    return rows


def describe(peaks: dict) -> str:
    rates = ", ".join(f"{k} {v:.1f}" for k, v in peaks["tflops"].items())
    m = peaks["measured"]
    measured = ", ".join(f"{k} {v:.1f}" for k, v in m["gemm_tflops"].items())
    return (f"ceilings ({peaks['source']}): {peaks['bandwidth_gbs']:.0f} GB/s, TFLOP/s {rates}; "
            f"measured here: copy {m['copy_gbs']:.0f} GB/s, GEMM TFLOP/s {measured}")
