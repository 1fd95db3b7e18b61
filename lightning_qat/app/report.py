"""Turn a sweep into a comparison: ``python -m lightning_qat.app.report <multirun dir>``.

Reads every run's ``results.json`` (and its CSV metrics) below the directory and writes
``report.md`` (one row per variant, like the reference table of DESIGN.md section 4),
``accuracy.png`` (test accuracy per variant), ``curves.png`` (validation accuracy per
epoch, the QAT start and the freezes marked) and, where runs differ in bit width,
``bits.png`` (accuracy against bit width, one line per method: PTQ, QAT with observed
ranges, QAT with learned step sizes). Where a variant ran more than once (other seeds),
a second table gives each variant's mean, standard deviation and range.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt

MARKERS = (
    ("start_epoch", "QAT start", "-"),
    ("freeze_bn_epoch", "BN frozen", "--"),
    ("freeze_observer_epoch", "ranges frozen", ":"),
)


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """``results.json`` of every run below ``sweep_dir``, each with its validation curve."""
    runs = []
    for path in sorted(sweep_dir.rglob("results.json")):
        result = json.loads(path.read_text())
        result["run_dir"] = str(path.parent)
        result["curve"] = _val_curve(path.parent)
        runs.append(result)
    if not runs:
        raise FileNotFoundError(f"no results.json below {sweep_dir}: is it a train.py run?")
    return runs


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, val_acc) from the run's CSVLogger metrics, if it has them."""
    metrics = next(iter(sorted(run_dir.rglob("metrics.csv"))), None)
    if metrics is None:
        return []
    curve = {}
    with open(metrics) as f:
        for row in csv.DictReader(f):
            if row.get("val_acc") and row.get("epoch"):
                curve[int(float(row["epoch"]))] = float(row["val_acc"])
    return sorted(curve.items())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _deployed_cell(run: dict[str, Any], prefix: str, key: str) -> str:
    """A deployed model's ``{prefix}_{key}`` in percent, with its image count where it
    was measured on part of the test set."""
    key = f"{prefix}_{key}"
    if key not in run:
        return "-"
    images = run.get(f"{prefix}_test_images")
    return _pct(run[key]) + (
        f" ({images} img)" if images and images != run.get("test_images") else ""
    )


def bit_width(run: dict[str, Any]) -> str:
    """``W4A4`` and what ``layer_bits``, ``residual_bits``, a full weight grid
    (``weight_narrow_range=False``) and undamped LSQ steps (``high_bits_damping=False``,
    or ``"weights"``: only weight steps damped) set apart (``W4A4 (@first 8-bit, @last
    8-bit, residual 8-bit, full weight grid)``), ``FP32`` for a float run."""
    quant = run.get("quant")
    if quant is None:
        return "FP32"
    label = f"W{quant['weight_bits']}A{quant['activation_bits']}"
    kept = [f"{pattern} {_bits(bits)}" for pattern, bits in (quant.get("layer_bits") or {}).items()]
    if quant.get("residual_bits") is not None:
        kept.append(f"residual {quant['residual_bits']}-bit")
    if quant.get("weight_narrow_range") is False and quant.get("symmetric", True):
        kept.append("full weight grid")
    if quant.get("learn_scale") and quant.get("high_bits_damping") is False:
        kept.append("LSQ undamped above 4 bits")
    if quant.get("learn_scale") and quant.get("high_bits_damping") == "weights":
        kept.append("LSQ damping weight steps only")
    return label + (f" ({', '.join(kept)})" if kept else "")


def _bits(bits: Any) -> str:
    if isinstance(bits, dict):
        return "".join(f"{k[0].upper()}{v}" for k, v in bits.items())
    return f"{bits}-bit"


def method(run: dict[str, Any]) -> str:
    """How the grid was found: ``PTQ (<method>)``, ``QAT, LSQ`` (``+ dampening λ`` with
    oscillation dampening, ``+ freezing f_th`` with iterative weight freezing) or ``QAT,
    observers``, with ``+ KD`` where a teacher distilled into the run (``FP32 + KD``
    unquantized)."""
    distilled = " + KD" if run.get("distillation") else ""
    if run.get("quant") is None:
        return "FP32" + distilled
    if run.get("ptq"):
        return f"PTQ ({run['ptq']['method']})"
    if not run["quant"].get("learn_scale"):
        return "QAT, observers" + distilled
    dampening = run["quant"].get("oscillation_dampening") or 0
    freezing = run["quant"].get("oscillation_freezing") or 0
    return (
        "QAT, LSQ"
        + (f" + dampening {dampening:g}" if dampening else "")
        + (f" + freezing {freezing:g}" if freezing else "")
        + distilled
    )


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One row per run: accuracies in percent, FP32 rows first, then by variant."""
    runs = sorted(runs, key=lambda r: (r.get("quant") is not None, r["variant"]))
    fp32 = [r["test_acc"] for r in runs if r.get("quant") is None]
    baseline = max(fp32) if fp32 else None
    lines = [
        "| recipe | variant | bits | method | test acc (%) | vs FP32 | fake-quant (%) "
        "| same weights in float (%) "
        "| integer-only (%) | int = fake-quant top-1 (%) | ONNX int8 (%) "
        "| ONNX = fake-quant top-1 (%) | params | MACs | size FP32 (KB) | size int (KB) "
        "| time (s) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        delta = "-" if baseline is None else f"{100 * (r['test_acc'] - baseline):+.2f}"
        size_int = r.get("size_int_bytes")
        lines.append(
            f"| {r['recipe']} | {r['variant']} | {bit_width(r)} | {method(r)} "
            f"| {_pct(r['test_acc'])} | {delta} "
            f"| {_pct(r.get('fake_quant_test_acc'))} | {_pct(r.get('float_test_acc'))} "
            f"| {_deployed_cell(r, 'integer', 'test_acc')} "
            f"| {_deployed_cell(r, 'integer', 'agreement')} "
            f"| {_deployed_cell(r, 'onnx', 'test_acc')} | {_deployed_cell(r, 'onnx', 'agreement')} "
            f"| {r['params']:,} | {r['macs']:,} | {r['size_fp32_bytes'] / 1024:.1f} "
            f"| {'-' if size_int is None else f'{size_int / 1024:.1f}'} "
            f"| {r['wall_time_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _seed(run: dict[str, Any]) -> Any:
    """The run's seed: in its results, or (runs from before it was recorded there) in
    its resolved config."""
    if "seed" in run:
        return run["seed"]
    config = Path(run["run_dir"]) / "config_resolved.yaml"
    if config.exists():
        return (yaml.safe_load(config.read_text()) or {}).get("seed")
    return None


def repeat_groups(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The runs grouped by what the table says they are (recipe, variant, bits, method,
    epochs, schedule): repeats of one variant, with other seeds, are one group."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        key = (r["recipe"], r["variant"], bit_width(r), method(r), r.get("epochs"))
        key += (json.dumps(r.get("schedule"), sort_keys=True),)
        groups.setdefault(key, []).append(r)
    return sorted(groups.values(), key=lambda g: (g[0].get("quant") is not None, g[0]["variant"]))


def repeats_table(runs: list[dict[str, Any]]) -> str | None:
    """Mean, sample standard deviation and range of each group of `repeat_groups`, and
    the mean against the best FP32 group's mean; None where no variant ran twice."""
    groups = repeat_groups(runs)
    if all(len(g) == 1 for g in groups):
        return None
    means = [statistics.fmean(r["test_acc"] for r in g) for g in groups]
    fp32 = [m for g, m in zip(groups, means, strict=True) if g[0].get("quant") is None]
    baseline = max(fp32) if fp32 else None
    lines = [
        "| recipe | variant | bits | method | runs | seeds | mean test acc (%) | std | "
        "min - max (%) | mean vs FP32 mean |",
        "|---|---|---|---|---:|---|---:|---:|---|---:|",
    ]
    for g, mean in zip(groups, means, strict=True):
        accs = [r["test_acc"] for r in g]
        std = f"{100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
        delta = "-" if baseline is None else f"{100 * (mean - baseline):+.2f}"
        seeds = ", ".join(str(_seed(r)) for r in g)
        r = g[0]
        lines.append(
            f"| {r['recipe']} | {r['variant']} | {bit_width(r)} | {method(r)} | {len(g)} "
            f"| {seeds} | {_pct(mean)} | {std} | {_pct(min(accs))} - {_pct(max(accs))} "
            f"| {delta} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(runs: list[dict[str, Any]], path: Path) -> None:
    labels = [f"{r['variant']}\n({Path(r['run_dir']).name})" for r in runs]
    values = [100 * r["test_acc"] for r in runs]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs)), 3.5))
    bars = ax.bar(labels, values, color=["grey" if r.get("quant") is None else "C0" for r in runs])
    ax.bar_label(bars, fmt="%.2f")
    low = min(values)
    ax.set_ylim(max(0, low - 5), min(100, max(values) + 2))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{runs[0]['recipe']}: test accuracy per variant")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bits(runs: list[dict[str, Any]], path: Path) -> bool:
    """Test accuracy against bit width, one line per method, FP32 as a horizontal line;
    False (nothing written) where every quantized run has the same widths."""
    quantized = [r for r in runs if r.get("quant") is not None]
    widths = {(r["quant"]["weight_bits"], r["quant"]["activation_bits"]) for r in quantized}
    if len(widths) < 2:
        return False
    order = sorted(widths, key=lambda w: (-w[0] - w[1], -w[0]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(sorted({method(r) for r in quantized})):
        points = {}
        for r in quantized:
            if method(r) == name:
                key = (r["quant"]["weight_bits"], r["quant"]["activation_bits"])
                points[order.index(key)] = max(points.get(order.index(key), 0), r["test_acc"])
        xs = sorted(points)
        ax.plot(xs, [100 * points[x] for x in xs], marker="o", color=f"C{i}", label=name)
    for r in runs:
        if r.get("quant") is None:
            ax.axhline(100 * r["test_acc"], color="grey", linestyle="--", label="FP32")
            break
    ax.set_xticks(range(len(order)), [f"W{w}A{a}" for w, a in order])
    ax.set_xlabel("bit width (weights, activations)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{runs[0]['recipe']}: accuracy against bit width")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(runs):
        if not r["curve"]:
            continue
        epochs, acc = zip(*r["curve"], strict=True)
        color = f"C{i % 10}"
        ax.plot(
            epochs,
            [100 * a for a in acc],
            marker="o",
            ms=3,
            color=color,
            label=f"{r['variant']} ({Path(r['run_dir']).name})",
        )
        for key, _, style in MARKERS:
            epoch = (r.get("schedule") or {}).get(key)
            if epoch is not None:
                ax.axvline(epoch - 0.5, color=color, linestyle=style, alpha=0.5)
    handles, labels = ax.get_legend_handles_labels()
    for _, name, style in MARKERS:  # legend entries for the schedule lines
        handles.append(plt.Line2D([], [], color="black", linestyle=style, alpha=0.5))
        labels.append(name)
    ax.legend(handles, labels, fontsize=7, loc="lower right")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("training curves (vertical lines: QAT schedule, at the epoch's start)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md, accuracy.png and curves.png; returns the report's path."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = load_runs(sweep_dir)
    plot_accuracy(runs, out_dir / "accuracy.png")
    plot_curves(runs, out_dir / "curves.png")
    bits = plot_bits(runs, out_dir / "bits.png")
    report = out_dir / "report.md"
    report.write_text(
        f"# {sweep_dir}\n\n{markdown_table(runs)}\n"
        "test acc: the model as trained (fake-quant for QAT variants); same weights in "
        "float: fake quantization switched off; integer-only: the exported integer model "
        "(lightning_qat.export.to_integer), on the test images shown where not all; ONNX "
        "int8: the QDQ export (lightning_qat.export.to_onnx) in onnxruntime. vs FP32: "
        "points against the best FP32 row of this sweep.\n\n"
        "![accuracy](accuracy.png)\n\n![curves](curves.png)\n"
        + ("\n![accuracy against bit width](bits.png)\n" if bits else "")
        + (
            f"\n## Repeated runs\n\n{repeats}\nRuns the table above describes alike "
            "(recipe, variant, bits, method, epochs) are repeats, e.g. other seeds: their "
            "mean, sample standard deviation and range; vs FP32: against the best FP32 "
            "mean.\n"
            if (repeats := repeats_table(runs))
            else ""
        )
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun (or run) directory of train.py")
    parser.add_argument("--out", help="where to write (default: the sweep directory)")
    args = parser.parse_args(argv)
    report = write_report(args.sweep_dir, args.out)
    print(report.read_text())
    print(
        f"written: {report}, {report.with_name('accuracy.png')}, {report.with_name('curves.png')}"
    )


if __name__ == "__main__":
    main()
