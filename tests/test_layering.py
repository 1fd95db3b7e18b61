"""The library imports lean and one way: ``import lightning_qat`` (numerics, callback,
integer export) needs torch, Lightning and torchmetrics only; the app sits on top."""

import ast
import json
import subprocess
import sys
from pathlib import Path

from lightning_qat.callback import print_table

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_qat"
#: the app's and the exporters' dependencies (extras), never needed by the library
APP_ONLY = {
    "hydra",
    "omegaconf",
    "wandb",
    "matplotlib",
    "tensorboard",
    "optuna",
    "sklearn",
    "torchvision",
    "rich",
    "onnx",
    "onnxruntime",
}
#: the old module paths of the app, kept as aliases of lightning_qat.app.*
ALIASES = {"data.py", "models.py", "module.py", "experiment.py", "report.py", "run_folder.py"}


def _new_packages(code: str) -> set[str]:
    """Top-level packages that ``code`` imports beyond torch, Lightning and torchmetrics."""
    probe = (
        "import sys, json\n"
        "import torch, lightning, torchmetrics\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        f"{code}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} - before)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_library_imports_none_of_the_apps_dependencies():
    added = _new_packages(
        "import lightning_qat\n"
        "from lightning_qat import QuantizationAwareTraining, QuantConfig, prepare_qat\n"
        "from lightning_qat.export import to_integer, plan_deployment, evaluate_deployment\n"
    )
    assert added & APP_ONLY == set(), added
    # rich is one of Lightning's own optional imports: what counts is that the library
    # does not import it where Lightning did not


def test_onnx_is_imported_when_exporting_only():
    assert "onnx" in _new_packages("from lightning_qat.export import to_onnx")
    assert "onnx" not in _new_packages("import lightning_qat.export")


def _library_files() -> list[Path]:
    return [
        path
        for path in PACKAGE.rglob("*.py")
        if "app" not in path.relative_to(PACKAGE).parts[:1]
        and not (path.parent == PACKAGE and path.name in ALIASES)
        and path.name != "__main__.py"
    ]


def _top_level_imports(tree: ast.Module) -> list[str]:
    """Module names imported at module level (outside functions and try/except)."""
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def test_library_modules_never_import_the_app_or_its_dependencies():
    files = _library_files()
    assert len(files) > 20 and PACKAGE / "callback.py" in files
    for path in files:
        for name in _top_level_imports(ast.parse(path.read_text())):
            assert not name.startswith("lightning_qat.app"), (path, name)
            assert name.split(".")[0] not in APP_ONLY, (path, name)


def test_the_layer_table_prints_without_rich(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # as if rich were not installed
    print_table("layers", ("layer", "kind"), [("net.0", "QuantConvBn2d"), ("fc", "QuantLinear")])
    assert capsys.readouterr().out.splitlines() == [
        "layers",
        "layer  kind         ",
        "net.0  QuantConvBn2d",
        "fc     QuantLinear  ",
    ]


def test_old_app_module_paths_still_work():
    from lightning_qat.app.data import DigitsData as new
    from lightning_qat.data import DigitsData as old
    from lightning_qat.models import resnet20  # noqa: F401
    from lightning_qat.module import ImageClassifier  # noqa: F401

    assert old is new
