"""Entry point of the ``metacompress`` command: importing the command modules registers them."""

from metacompress.cli import compress_cmd  # noqa: F401  (registers train, compress, inspect)
from metacompress.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
