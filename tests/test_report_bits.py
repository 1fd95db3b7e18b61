"""The report of a low-bit sweep: a bit-width and a method column, and accuracy against
bit width drawn one line per method."""

import json

from lightning_qat.app.report import bit_width, markdown_table, method, write_report


def result(variant, acc, bits=None, learn=False, ptq=None):
    quant = None
    if bits is not None:
        quant = {
            "weight_bits": bits,
            "activation_bits": bits,
            "learn_scale": learn,
            "layer_bits": {"@first": {"weight_bits": 8, "activation_bits": 8}},
        }
    return {
        "recipe": "resnet20_lowbit_cpu",
        "variant": variant,
        "quant": quant,
        "ptq": {"method": ptq} if ptq else None,
        "test_acc": acc,
        "params": 1,
        "macs": 1,
        "size_fp32_bytes": 1024,
        "wall_time_s": 1.0,
    }


def test_low_bit_sweep_reports_bits_methods_and_a_bits_plot(tmp_path):
    runs = [
        result("none", 0.72),
        result("w4a4", 0.70, 4),
        result("w4a4_lsq", 0.715, 4, learn=True),
        result("w2a2_lsq", 0.66, 2, learn=True),
        result("w2a2", 0.40, 2),
        result("ptq_mse/w2a2", 0.10, 2, ptq="mse"),
    ]
    for index, run in enumerate(runs):
        folder = tmp_path / str(index)
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(run))
    assert bit_width(runs[0]) == "FP32" and bit_width(runs[1]).startswith("W4A4 (@first")
    assert [method(r) for r in runs[1:4:2]] == ["QAT, observers", "QAT, LSQ"]
    damped = {**runs[2], "quant": {**runs[2]["quant"], "oscillation_dampening": 0.1}}
    assert method(damped) == "QAT, LSQ + dampening 0.1"
    frozen = {**runs[2], "quant": {**runs[2]["quant"], "oscillation_freezing": 0.01}}
    assert method(frozen) == "QAT, LSQ + freezing 0.01"
    assert method(runs[-1]) == "PTQ (mse)"
    table = markdown_table([{**r, "run_dir": "x"} for r in runs])
    assert "| w2a2_lsq | W2A2 (@first W8A8) | QAT, LSQ |" in table and "| -6.00 |" in table
    report = write_report(tmp_path).read_text()
    assert "bits.png" in report
    assert (tmp_path / "bits.png").read_bytes()[:4] == b"\x89PNG"


def test_a_residual_width_is_named_in_the_bits_column():
    run = result("w4a4_lsq_res8", 0.71, 4, learn=True)
    run["quant"]["residual_bits"] = 8
    assert bit_width(run) == "W4A4 (@first W8A8, residual 8-bit)"


def test_a_full_weight_grid_is_named_in_the_bits_column():
    run = result("w2a2_lsq_res8_full", 0.65, 2, learn=True)
    run["quant"]["weight_narrow_range"] = False
    assert bit_width(run).endswith(", full weight grid)")
    run["quant"]["weight_narrow_range"] = True
    assert "full" not in bit_width(run)


def test_undamped_lsq_steps_are_named_in_the_bits_column():
    run = result("w8a8_lsq", 0.5, 8, learn=True)
    run["quant"]["high_bits_damping"] = False
    assert bit_width(run).endswith(", LSQ undamped above 4 bits)")
    run["quant"]["high_bits_damping"] = "weights"
    assert bit_width(run).endswith(", LSQ damping weight steps only)")
    del run["quant"]["high_bits_damping"]  # results written before the option: as before
    assert "undamped" not in bit_width(run) and "damping" not in bit_width(run)


def test_repeated_runs_get_their_mean_and_spread(tmp_path):
    """Seeds of one variant: one row each in the run table, and a second table with
    their mean, sample standard deviation and range against the FP32 mean; the seed of a
    run from before results recorded it comes from its resolved config."""
    runs = [
        {**result("none", 0.72), "seed": 0},
        {**result("none", 0.70), "seed": 1},
        {**result("w4a4_lsq", 0.69, 4, learn=True), "seed": 0},
        {**result("w4a4_lsq", 0.68, 4, learn=True), "seed": 1},
        result("w4a4_lsq", 0.70, 4, learn=True),
        result("w2a2", 0.40, 2),
    ]
    for index, run in enumerate(runs):
        folder = tmp_path / str(index)
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(run))
    (tmp_path / "4" / "config_resolved.yaml").write_text("seed: 7\nquant: {}\n")
    report = write_report(tmp_path).read_text()
    assert "## Repeated runs" in report
    row = next(
        line
        for line in report.splitlines()
        if line.startswith("| resnet20_lowbit_cpu | w4a4_lsq |") and "| 3 |" in line
    )
    # mean 69.00, sample std 1.00, vs the FP32 mean 71.00: -2.00
    assert "| 3 | 0, 1, 7 | 69.00 | 1.00 | 68.00 - 70.00 | -2.00 |" in row
    assert "| w2a2 | W2A2 (@first W8A8) | QAT, observers | 1 | None | 40.00 | - |" in report


def test_no_repeats_no_second_table(tmp_path):
    folder = tmp_path / "0"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(result("none", 0.72)))
    assert "Repeated runs" not in write_report(tmp_path).read_text()
