"""``python -m metacompress`` (and ``torchrun -m metacompress``): the command-line interface."""

from metacompress.cli.main import main

if __name__ == "__main__":
    main()
