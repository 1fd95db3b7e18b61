"""The benchmark and the demo run end to end (small settings)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_helpers import script_module
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> str:
    """A benchmark's output in its quickest settings: tiny model, one round, no warm-up."""
    return subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", "--rounds", "1", "--warmup", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _bench_function(name: str):
    """A function of bench/qat_overhead.py."""
    return getattr(script_module("bench", "qat_overhead"), name)


def run_qat_overhead(variants: str, *args: str) -> str:
    """`run_bench` of qat_overhead.py: one process per variant, these variants beside FP32."""
    return run_bench(
        "qat_overhead.py", "--passes", "1", "--malloc", "current", "--variants", variants, *args
    )


def test_qat_overhead_bench_prints_every_variant_as_a_ratio():
    out = run_bench("qat_overhead.py", "--passes", "1", "--malloc", "current")
    for variant in (
        "FP32",
        "ours sym folded",
        "ours sym folded, plain ReLUs",
        "ours sym unfolded",
        "ours asym folded",
        "ours asym unfolded",
        "ours LSQ W4A4",
        "torch.ao eager QAT",
    ):
        assert f"| {variant} |" in out, out
    assert "| FP32 | " in out and "| 1.00x |" in out
    # each row says how much of the step the kernel took and how many pages it faulted in
    fp32_row = next(line for line in out.splitlines() if line.startswith("| FP32 |"))
    kernel_ms, faulted_mb = fp32_row.strip("| ").split(" | ")[3:5]
    assert kernel_ms.split()[0].isdigit() and float(faulted_mb) >= 0, fp32_row
    # the memory table: live tensors, the resident peak and the first step's cost apart
    memory = out[out.index("Peak memory of a training step") :]
    assert "| tensors live at the step's peak (MB) | ratio to FP32 |" in memory, memory
    fp32_memory = next(line for line in memory.splitlines() if line.startswith("| FP32 |"))
    assert fp32_memory.count("1.00x") == 2, fp32_memory


def test_qat_overhead_bench_runs_in_bf16_mixed_precision():
    out = run_qat_overhead("ours sym folded", "--bf16")
    assert "NIN training step, bf16-mixed, batch 8" in out, out
    assert "| ours sym folded |" in out and "Peak memory of a training step, bf16-mixed" in out


@pytest.mark.parametrize("bf16", [False, True])
def test_the_bench_step_runs_its_forward_in_bf16_when_asked(bf16):
    make_step = _bench_function("make_step")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    dtypes = []
    model[0].register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    model(torch.randn(1, 3, 32, 32))  # materializes the lazy layer
    dtypes.clear()
    make_step(model, batch_size=2, bf16=bf16)()
    assert dtypes == [torch.bfloat16 if bf16 else torch.float32]


def test_qat_overhead_bench_counts_the_operators_a_step_calls():
    out = run_bench("qat_overhead.py", "--quick", "--ops", "--variants", "ours sym folded")
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in out.splitlines()
        if line.startswith("| FP32") or line.startswith("| ours")
    }
    assert rows["FP32"][1] == rows["FP32"][3] == "1.00x" and rows["FP32"][4] == "0", out
    # per layer: observers, fake quantization, the fold and their backward
    assert int(rows["ours sym folded"][0]) > 3 * int(rows["FP32"][0]), out
    assert int(rows["ours sym folded"][2]) > 3 * int(rows["FP32"][2]), out
    assert int(rows["FP32"][2]) < int(rows["FP32"][0]), out  # views launch nothing
    assert int(rows["ours sym folded"][4]) > 0, out  # the CPU kernel's and observers' reads


def test_operator_calls_counts_outer_operators_kernels_and_host_reads():
    operator_calls = _bench_function("operator_calls")
    x = torch.ones(4)
    # three outer operators (add, sum, item: item's inner _local_scalar_dense is not
    # counted), each computing something, and one host read
    assert operator_calls(lambda: (x + 1).sum().item()) == (3, 3, 1)
    # views launch no kernel; a reshape that has to copy does (its inner clone)
    assert operator_calls(lambda: x.view(2, 2).t().detach()) == (3, 0, 0)
    assert operator_calls(lambda: x.view(2, 2).t().reshape(4)) == (3, 1, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qat_overhead_bench_runs_on_a_gpu():
    out = run_qat_overhead("ours sym folded,ours LSQ W4A4", "--device", "cuda", "--bf16")
    assert "NIN training step, on cuda, bf16-mixed" in out, out
    assert "(CUDA's allocated and reserved)" in out and "| ours LSQ W4A4 |" in out, out


def test_qat_overhead_bench_refuses_a_device_torch_does_not_see():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    bad = subprocess.run(
        [sys.executable, "bench/qat_overhead.py", "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "sees no CUDA device" in bad.stderr


def test_live_tensor_peak_is_the_most_a_step_holds_at_once():
    live_tensor_peak = _bench_function("live_tensor_peak")
    mib = 2**20

    def overlapping() -> None:
        first = torch.ones(mib, dtype=torch.uint8)
        second = torch.ones(3 * mib, dtype=torch.uint8)
        del first, second

    def one_after_the_other() -> None:
        first = torch.ones(mib, dtype=torch.uint8)
        del first
        second = torch.ones(3 * mib, dtype=torch.uint8)
        del second

    assert live_tensor_peak(overlapping) == 4 * mib
    assert live_tensor_peak(one_after_the_other) == 3 * mib


def test_qat_overhead_bench_runs_the_chosen_variants_beside_fp32():
    out = run_qat_overhead("ours LSQ W4A4")
    assert "| FP32 |" in out and "| ours LSQ W4A4 |" in out, out
    assert "| ours sym folded |" not in out, out
    bad = subprocess.run(
        [sys.executable, "bench/qat_overhead.py", "--malloc", "current", "--variants", "int3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "unknown variant(s) ['int3']" in bad.stderr


def test_int8_inference_bench_prints_every_runtime_as_a_ratio():
    # NIN: torch.ao's eager-mode path; ViT: the transformer export (ResNets as NIN, FX)
    models = ("nin", "vit_tiny")
    out = run_bench("int8_inference.py", "--batch-sizes", "2", "--passes", "1", "--models", *models)
    assert all(f"{model} inference, batch 2" in out for model in models), out
    for variant in (
        "PyTorch FP32 eager",
        "onnxruntime FP32",
        "ours int8 ONNX, symmetric",
        "ours int8 ONNX, asymmetric",
        "ours int8 ONNX, symmetric, float first input",
    ):
        assert f"| {variant} |" in out, out
    assert "one process per variant" in out
    assert "| PyTorch FP32 eager | " in out and "| 1.00x |" in out


def test_digits_demo_quantized_model_keeps_its_accuracy():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from digits_qat import main
    finally:
        sys.path.pop(0)
    results = main(["--fp32-epochs", "6", "--qat-epochs", "3"])
    assert results["fp32"] > 0.9
    assert results["qat"] > 0.9
    assert results["qat"] > results["fp32"] - 0.03


def test_lowbit_protocol_rows_map_to_their_training_settings(tmp_path):
    """Each row's suffixes become overrides (``_kd``: distillation, ``_lowwd``: a quarter of
    the weight decay, ``_wdamp``: weight steps damped only); a row with results is skipped.
    ``PYTHON=echo`` prints the commands."""
    (tmp_path / "fp32" / "checkpoints").mkdir(parents=True)
    (tmp_path / "fp32" / "results.json").write_text("{}")
    (tmp_path / "fp32" / "checkpoints" / "latest-epoch014.ckpt").write_text("")
    (tmp_path / "lowbit" / "w8a8_seed1").mkdir(parents=True)
    (tmp_path / "lowbit" / "w8a8_seed1" / "results.json").write_text("{}")
    rows = [
        "w2a2_lsq_res8_full_lowwd_kd",
        "ptq_w4a4",
        "w8a8",
        "w4a4_lsq",
        "w4a4_lsq_res8_full_wdamp_kd",
    ]
    out = subprocess.run(
        ["bash", "scripts/lowbit_protocol.sh", str(tmp_path), *rows],
        cwd=ROOT,
        env={**os.environ, "PYTHON": "echo", "SEED": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    commands = {
        line.split("hydra.run.dir=")[1].split()[0].split("/")[-1]: line for line in out[:-1]
    }
    assert set(commands) == {
        "w2a2_lsq_res8_full_lowwd_kd_seed1",
        "ptq_w4a4_seed1",
        "w4a4_lsq_seed1",
        "w4a4_lsq_res8_full_wdamp_kd_seed1",
    }
    lowwd_kd = commands["w2a2_lsq_res8_full_lowwd_kd_seed1"].split()
    assert "quant=w2a2_lsq_res8_full" in lowwd_kd and "optimizer.weight_decay=1.25e-4" in lowwd_kd
    assert "module.distillation_weight=0.5" in lowwd_kd and "seed=1" in lowwd_kd
    assert not any("damping" in a for a in lowwd_kd)
    wdamp_kd = commands["w4a4_lsq_res8_full_wdamp_kd_seed1"].split()
    assert "quant=w4a4_lsq_res8_full" in wdamp_kd and "quant.high_bits_damping=weights" in wdamp_kd
    assert (
        "module.distillation_weight=0.5" in wdamp_kd
        and "module.distillation_temperature=1" in wdamp_kd
    )
    ptq = commands["ptq_w4a4_seed1"].split()
    assert "recipe=resnet20_lowbit_ptq_cpu" in ptq and "quant=w4a4" in ptq
    plain = commands["w4a4_lsq_seed1"].split()
    assert "quant=w4a4_lsq" in plain and not any(
        "weight_decay" in a or "distill" in a or "damping" in a for a in plain
    )
    assert out[-1] == f"-m lightning_qat.report {tmp_path}/lowbit"


def test_heldout_images_are_balanced_and_never_trained_on():
    """The held-out draw is class-balanced, the same every time, and shares no image with
    the training subset the data module trains on (images numbered by their pixels)."""
    from lightning_qat.app.data.base import ImageClassificationData

    class Numbered(ImageClassificationData):
        def load(self, split):
            n = 1000 if split == "train" else 100
            number = torch.arange(n)
            images = torch.stack([number // 256, number % 256], 1).to(torch.uint8)
            labels = torch.arange(n) * 7 % 10  # classes interleaved, not in blocks
            return images.reshape(n, 1, 1, 2).expand(n, 1, 2, 2).contiguous(), labels

    data = Numbered(train_subset=300, subset_seed=3)
    data.setup("fit")
    trained = data.train_set.images[:, 0, 0].long()
    trained = set((trained[:, 0] * 256 + trained[:, 1]).tolist())
    assert len(trained) == 300 and trained == set(data.train_indices.tolist())
    _, labels = data.load("train")
    heldout_indices = script_module("scripts", "heldout_accuracy").heldout_indices
    held = heldout_indices(labels, data.train_indices, 5, 200)
    assert len(set(held.tolist())) == 200 and not trained & set(held.tolist())
    assert torch.bincount(labels[held], minlength=10).tolist() == [20] * 10
    assert torch.equal(held, heldout_indices(labels, data.train_indices, 5, 200))
    with pytest.raises(ValueError, match="exceeds"):
        heldout_indices(labels, data.train_indices, 5, 701)


def test_heldout_accuracy_scores_a_run_as_its_test_was_scored(tmp_path):
    """A digits run on a 600-image subset: the script's test accuracy is the run's own
    (the checkpoint restored in its fake-quant form), and its held-out score is of 400
    images the run never trained on."""
    run = tmp_path / "run_seed0"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "trainer.max_epochs=2",
            "qat.start_epoch=1",
            "qat.freeze_bn_epoch=1",
            "qat.freeze_observer_epoch=1",
            "+data.train_subset=600",
            "deploy=null",
            f"hydra.run.dir={run}",
            "callbacks.progress_bar=null",
            "trainer.enable_model_summary=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = script_module("scripts", "heldout_accuracy").score_run(run, images=400, with_test=True)
    assert scores["test_acc_here"] == pytest.approx(scores["test_acc"], abs=1e-4)
    assert 50 < scores["heldout_acc"] <= 100 and scores["heldout_acc"] * 4 == int(
        scores["heldout_acc"] * 4
    )  # a whole number of the 400 images
    out = subprocess.run(
        # the run named twice, as overlapping globs do: it counts once
        [sys.executable, "scripts/heldout_accuracy.py", str(run), f"{run}/", "--images", "400"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"| run | 1 | {scores['heldout_acc']:.2f} | {scores['test_acc']:.2f} |" in out


def test_device_agreement_feeds_each_module_the_reference_inputs():
    """scripts/device_agreement.py's module-by-module comparison (the CUDA test's): a
    copy whose one layer computes differently shows a difference in that layer (and the
    modules holding it) alone when fed the reference's inputs, while running free every
    later module parts too."""
    from lightning_qat import QuantConfig, prepare_qat
    from lightning_qat.app.models import ResNetCifar

    agreement = script_module("scripts", "device_agreement")
    torch.manual_seed(0)
    model = prepare_qat(ResNetCifar(depth=8, in_channels=1), QuantConfig()).train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    model(x)
    state = copy.deepcopy(model.state_dict())
    reference, _, grads = agreement.module_outputs(model, x, y, "cpu")
    assert grads and all((k[0], 0) in reference for k in [("fc", 0), ("layers.0.conv1", 0)])
    changed = prepare_qat(ResNetCifar(depth=8, in_channels=1), QuantConfig()).train()
    changed.load_state_dict(state)
    with torch.no_grad():  # its BatchNorm's shift (the weight goes through the weight
        # quantizer, a module that is fed the reference's folded weight)
        changed.layers[0].conv1.bn.bias.add_(0.5)
    fed, _, _ = agreement.module_outputs(changed, x, y, "cpu", inputs=reference)
    differing = {d.key[0] for d in agreement.differences(reference, fed)}
    assert "layers.0.conv1" in differing
    assert differing <= {"layers.0.conv1", "layers.0", "layers"}, differing
    free, _, _ = agreement.module_outputs(changed, x, y, "cpu")
    assert "fc" in {d.key[0] for d in agreement.differences(reference, free)}


def test_epoch_curves_average_each_setting_over_its_seeds(tmp_path, capsys):
    """scripts/epoch_curves.py: the per-epoch means of a setting's seeds (the last value
    an epoch logged), a column per epoch, and the plot."""
    curves = script_module("scripts", "epoch_curves")
    logs = {"a_seed0": [(0.9, None), (0.7, 0.5)], "a_seed1": [(1.1, None), (0.9, 0.7)]}
    logs["b_seed0"] = [(2.0, None), (1.0, 0.25)]
    for name, epochs in logs.items():
        (tmp_path / name / "csv").mkdir(parents=True)
        rows = ["epoch,train_loss_epoch,train_loss_step,val_acc"]
        for epoch, (loss, acc) in enumerate(epochs):
            rows.append(f"{epoch},,{loss + 5},")  # a step row: not the epoch's loss
            rows.append(f"{epoch},{loss},,{'' if acc is None else acc}")
        (tmp_path / name / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    runs = [str(tmp_path / n) for n in logs]
    curves.main([*runs, "--plot", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    assert "| a | 1.0000 (0.9000, 1.1000) | 0.8000 (0.7000, 0.9000) |" in out
    assert "| b | 2.0000 (2.0000) | 1.0000 (1.0000) |" in out
    assert "| val_acc | epoch 1 |" in out and "| a | 0.6000 (0.5000, 0.7000) |" in out
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match=r"no csv/metrics\.csv"):
        curves.main([str(tmp_path)])
