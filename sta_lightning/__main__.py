"""``python -m sta_lightning``: the LightningCLI (fit / validate / test / predict)."""

import sys

from sta_lightning.cli import main

if __name__ == "__main__":
    sys.argv[0] = "python -m sta_lightning"  # the program name in usage and error messages
    main()
