"""``python -m lightning_qat.export <ckpt>``: the app's export CLI
(`lightning_qat.app.export_cli`: it rebuilds the model from the run's Hydra config)."""

from lightning_qat.app.export_cli import main

if __name__ == "__main__":
    main()
