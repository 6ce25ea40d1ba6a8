"""``python -m sta_lightning``: the LightningCLI (fit / validate / test / predict)."""

from sta_lightning.cli import main

if __name__ == "__main__":
    main()
