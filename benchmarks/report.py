"""Reports of benchmark rows: a Markdown file, PNG plots, and the change between two runs.

    python benchmarks/report.py RESULTS_DIR                 # (re)write report.md and plots there
    python benchmarks/report.py --compare OLD NEW           # change per case (files or folders)

Plots: speedup over torch per case (one panel per suite), and time against problem
size for conv (FLOPs) and batch norm (bytes moved), pyops and torch.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SUITE_ORDER = ["model", "conv", "batchnorm", "pooling", "elementwise"]


def load(path: Path) -> dict[str, dict]:
    """{suite: {"environment", "rows"}} from a results folder or one suite's JSON file."""
    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    out = {}
    for f in files:
        data = json.loads(f.read_text())
        if isinstance(data, dict) and "rows" in data:
            out[f.stem] = data
    return out


def case_key(r: dict) -> tuple:
    return (r["op"], r["mode"], tuple(r["shape"]), r["dtype"], r["format"], r.get("config", ""))


def case_label(r: dict) -> str:
    dtype = r["dtype"].replace("torch.", "")
    fmt = "CL" if r["format"] == "channels_last" else "NCHW"
    cfg = f" {r['config']}" if r.get("config") else ""
    return f"{r['op']}{cfg} {r['mode']} {'x'.join(map(str, r['shape']))} {dtype} {fmt}"


def _geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def markdown(results: dict[str, dict]) -> str:
    """The report: environment, ceilings, a geomean speedup per suite and mode, then every row."""
    suites = [s for s in SUITE_ORDER if s in results] + sorted(set(results) - set(SUITE_ORDER))
    env = results[suites[0]]["environment"] if suites else {}
    lines = ["# pyops benchmark report", ""]
    lines += [f"- device: **{env.get('device')}**; torch {env.get('torch')}, triton {env.get('triton')}, "
              f"Python {env.get('python')}, commit `{env.get('commit')}`"]
    if env.get("device_type") == "cuda":
        lines += [f"- TF32 matmul {env.get('tf32_matmul')}, TF32 cuDNN {env.get('tf32_cudnn')}, "
                  f"cudnn.benchmark {env.get('cudnn_benchmark')}"]
    if env.get("malloc"):
        lines += [f"- malloc: {env['malloc']}"]
    if env.get("peaks"):
        p = env["peaks"]
        lines += [f"- ceilings ({p['source']}): {p['bandwidth_gbs']:.0f} GB/s; TFLOP/s "
                  + ", ".join(f"{k} {v:.1f}" for k, v in p["tflops"].items())]
    lines += ["- speedup = torch time / pyops time (> 1: pyops faster); % peak = pyops' rate over the ceiling",
              "- the bandwidth ceiling is measured on buffers larger than the caches: a case whose tensors fit "
              "in cache (small CPU cases) can pass 100%", ""]
    lines += ["## Summary (geometric mean speedup)", "", "| suite | forward | backward | full | other |",
              "|---|---|---|---|---|"]
    for s in suites:
        rows = [r for r in results[s]["rows"] if r.get("correct", True)]
        cells = []
        for mode in ("forward", "backward", "full"):
            xs = [r["speedup"] for r in rows if r["mode"] == mode]
            cells.append(f"{_geomean(xs):.2f} ({len(xs)})" if xs else "")
        other = [r for r in rows if r["mode"] not in ("forward", "backward", "full")]
        cells.append(", ".join(f"{r['mode']}: {r['speedup']:.2f}" for r in other))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    for s in suites:
        lines += ["", f"## {s}", "", "| case | pyops ms | torch ms | speedup | pyops rate | % peak | ok |",
                  "|---|---|---|---|---|---|---|"]
        for r in results[s]["rows"]:
            if "pyops_images_per_s" in r:
                rate = f"{r['pyops_images_per_s']:.0f} img/s ({r['pyops_tflops']:.2f} TFLOP/s)"
            elif "pyops_tflops" in r:
                rate = f"{r['pyops_tflops']:.2f} TFLOP/s"
            else:
                rate = f"{r['pyops_gbps']:.1f} GB/s"
            pct = f"{r['pct_peak']:.1f}" if "pct_peak" in r else ""
            lines.append(f"| {case_label(r)} | {r['pyops_ms']:.4f} | {r['torch_ms']:.4f} | {r['speedup']:.2f} | "
                         f"{rate} | {pct} | {'yes' if r['correct'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, dict], out_dir: Path) -> list[Path]:
    """speedup.png (per case, per suite) and size_vs_time.png (conv and batch norm); returns the paths."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = [s for s in SUITE_ORDER if s in results] + sorted(set(results) - set(SUITE_ORDER))
    written = []
    if suites:
        heights = [max(2.0, 0.18 * len(results[s]["rows"]) + 1) for s in suites]
        fig, axes = plt.subplots(len(suites), 1, figsize=(11, sum(heights)), squeeze=False,
                                 gridspec_kw={"height_ratios": heights})
        for ax, s in zip(axes[:, 0], suites):
            rows = results[s]["rows"]
            ys = range(len(rows))
            colors = ["tab:green" if r["speedup"] >= 1 else "tab:red" for r in rows]
            ax.barh(list(ys), [r["speedup"] for r in rows], color=colors)
            ax.set_yticks(list(ys), [case_label(r)[:70] for r in rows], fontsize=6)
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.invert_yaxis()
            ax.set_title(f"{s}: speedup over torch (log scale)", fontsize=9)
        fig.tight_layout()
        path = out_dir / "speedup.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    sized = [(s, x) for s, x in (("conv", "flops"), ("batchnorm", "bytes")) if s in results]
    if sized:
        fig, axes = plt.subplots(1, len(sized), figsize=(6 * len(sized), 4.5), squeeze=False)
        for ax, (s, key) in zip(axes[0], sized):
            rows = [r for r in results[s]["rows"] if key in r and r["mode"] == "full"] or \
                [r for r in results[s]["rows"] if key in r]
            for provider, marker in (("pyops", "o"), ("torch", "x")):
                ax.scatter([r[key] for r in rows], [r[f"{provider}_ms"] for r in rows], marker=marker, label=provider)
            ax.set(xscale="log", yscale="log", xlabel="FLOPs" if key == "flops" else "bytes moved",
                   ylabel="ms", title=f"{s}: time vs problem size ({rows[0]['mode'] if rows else ''})")
            ax.legend()
        fig.tight_layout()
        path = out_dir / "size_vs_time.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(out_dir: Path) -> list[Path]:
    results = load(out_dir)
    path = out_dir / "report.md"
    path.write_text(markdown(results))
    return [path, *plots(results, out_dir)]


def compare(old: Path, new: Path) -> str:
    """Per case present in both: old and new pyops time and their ratio (> 1: new is faster)."""
    a, b = load(old), load(new)
    lines = [f"{'case':<80} {'old ms':>9} {'new ms':>9} {'old/new':>8}"]
    ratios = []
    for suite in [s for s in SUITE_ORDER if s in a and s in b] + sorted((set(a) & set(b)) - set(SUITE_ORDER)):
        old_rows = {case_key(r): r for r in a[suite]["rows"]}
        for r in b[suite]["rows"]:
            o = old_rows.get(case_key(r))
            if o is None:
                continue
            ratio = o["pyops_ms"] / r["pyops_ms"]
            ratios.append(ratio)
            flag = "" if o["correct"] and r["correct"] else "  (failed check)"
            lines.append(f"{case_label(r)[:80]:<80} {o['pyops_ms']:9.4f} {r['pyops_ms']:9.4f} {ratio:8.2f}{flag}")
    lines.append(f"{len(ratios)} cases in both; geometric mean old/new {_geomean(ratios):.3f}" if ratios else
                 "no case appears in both")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, help="a results folder to write report.md and plots in")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    if args.results is None:
        parser.error("give a results folder or --compare OLD NEW")
    for path in write_report(args.results):
        print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
