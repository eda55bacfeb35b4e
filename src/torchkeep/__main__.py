"""``python -m torchkeep``: the same command line as ``torchkeep``."""

from torchkeep.cli import main

if __name__ == "__main__":
    main()
