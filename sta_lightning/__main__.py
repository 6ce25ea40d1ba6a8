"""``python -m sta_lightning``: the LightningCLI (fit / validate / test / predict) and the subcommands of
their own parsers (export, convert, ablate)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(args), one line of help)
SUBCOMMANDS = {
    "export": (
        "sta_lightning.export.cli",
        "ONNX / TorchScript / ExportedProgram of a checkpoint, with its JSON sidecar",
    ),
    "convert": (
        "sta_lightning.convert",
        "a dataset from one format to another: YOLO data.yaml or Pascal VOC to COCO json, COCO json to YOLO",
    ),
    "ablate": (
        "sta_lightning.ablation.cli",
        "variants over paired seeds: fits, results.csv and paired confidence intervals",
    ),
}


def subcommands_help() -> str:
    """The help lines of the subcommands with parsers of their own."""
    lines = [
        f"  {name:<22}{text}\n  {'':<22}(python -m sta_lightning {name} --help)"
        for name, (_, text) in SUBCOMMANDS.items()
    ]
    return "\nother subcommands:\n" + "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Dispatch the subcommands of ``SUBCOMMANDS`` to their parsers and everything else to the LightningCLI
    (``args`` default: the command line)."""
    given = sys.argv[1:] if args is None else args
    if given[:1] and given[0] in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS[given[0]][0]).main(given[1:])
        return
    from sta_lightning.cli import main as cli_main

    try:
        cli_main(args)
    finally:
        if given[:1] in (["-h"], ["--help"]):  # after LightningCLI's help, which exits
            print(subcommands_help())


if __name__ == "__main__":
    sys.argv[0] = "python -m sta_lightning"  # the program name in usage and error messages
    main()
