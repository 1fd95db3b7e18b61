"""The Hydra app (``train.py``) on top of the library: the experiment runner, its
LightningModule, data modules, model zoo, run folders, export CLI and sweep report.

Imports go one way: this package imports the library (`lightning_qat`), the library never
imports it, so ``import lightning_qat`` needs neither Hydra nor the app's other
dependencies (``pip install lightning-qat[app]``).
"""
