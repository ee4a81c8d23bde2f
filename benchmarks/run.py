"""The benchmark suite (the README's main job): pyops against torch on this machine.

    python benchmarks/run.py [--device cpu|cuda] [--full] [--threads N] [--out DIR] [--only SUITE]
    python benchmarks/run.py --compare OLD NEW      # change per case between two result folders/files

On a CUDA machine the Triton kernels are measured against cuDNN / torch's CUDA kernels;
else the C++ kernels against ATen/oneDNN on the CPU. First measures the device's copy
bandwidth and GEMM rate (the roofline ceilings; datasheet peaks for known GPUs), then
runs every suite: a whole ResNet-style model, conv, batch norm, pooling, elementwise.
Prints a table per suite and writes, under benchmarks/results/<device>/, JSON rows
(device, dtype, shapes, versions, commit, % of peak), report.md and PNG plots.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
import bench_batchnorm  # noqa: E402
import bench_conv  # noqa: E402
import bench_elementwise  # noqa: E402
import bench_model  # noqa: E402
import bench_pooling  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
import roofline  # noqa: E402

SUITES = {"model": bench_model, "conv": bench_conv, "batchnorm": bench_batchnorm, "pooling": bench_pooling,
          "elementwise": bench_elementwise}


def _progress():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda **kw: tqdm(file=sys.stderr, leave=False, **kw)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="the long run: more shapes and dtypes")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--only", choices=sorted(SUITES), action="append", help="run only these suites")
    parser.add_argument("--glibc-malloc-defaults", action="store_true", help=harness.MALLOC_HELP)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                        help="print the change per case between two result folders (or JSON files) and exit")
    args = parser.parse_args(argv)
    if args.compare:
        print(report.compare(*args.compare))
        return 0

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # Stated and matched for every baseline (conv suites rely on it).
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    env = harness.prepare(device, args.glibc_malloc_defaults)
    out_dir = args.out or harness.default_out_dir(device)
    print(f"pyops benchmarks on {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    env["peaks"] = roofline.device_peaks(device, env["device"])
    print(roofline.describe(env["peaks"]))
    failed = 0
    for name in args.only or list(SUITES):
        rows = roofline.annotate(SUITES[name].run(device, args.full, progress=_progress()), env["peaks"])
        print(f"\n== {name} ==")
        print(harness.format_table(rows))
        path = harness.write_rows(rows, env, out_dir, name)
        print(f"rows written to {path}")
        failed += sum(not r["correct"] for r in rows)
    for path in report.write_report(out_dir):
        print(f"written {path}")
    if failed:
        print(f"\n{failed} case(s) failed the correctness check: their times are not results", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
