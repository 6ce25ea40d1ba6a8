"""Command line entry point (LightningCLI once the model and data modules exist)."""

import sys


def main(args: list[str] | None = None) -> None:
    sys.exit("sta_lightning: the LightningCLI is not wired yet; the model and data modules are in progress.")
