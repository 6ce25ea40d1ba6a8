"""``python -m sta_lightning``: the LightningCLI (fit / validate / test / predict) and ``export``."""

from __future__ import annotations

import sys

EXPORT_HELP = """
other subcommands:
  export                ONNX / TorchScript / ExportedProgram of a checkpoint, with its JSON sidecar
                        (python -m sta_lightning export --help)"""


def main(args: list[str] | None = None) -> None:
    """Dispatch ``export`` to its own parser and everything else to the LightningCLI (``args`` default: the
    command line)."""
    given = sys.argv[1:] if args is None else args
    if given[:1] == ["export"]:
        from sta_lightning.export.cli import main as export_main

        export_main(given[1:])
        return
    from sta_lightning.cli import main as cli_main

    try:
        cli_main(args)
    finally:
        if given[:1] in (["-h"], ["--help"]):  # after LightningCLI's help, which exits
            print(EXPORT_HELP)


if __name__ == "__main__":
    sys.argv[0] = "python -m sta_lightning"  # the program name in usage and error messages
    main()
