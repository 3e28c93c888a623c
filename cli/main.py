"""Entry point of the ``metacompress`` command: importing the command modules registers them."""

from metacompress.cli import compress_cmd  # noqa: F401  (registers train, compress, inspect)
from metacompress.cli import meta_cmd  # noqa: F401  (registers meta-train, meta-eval)
from metacompress.cli import fuse_cmd  # noqa: F401
from metacompress.cli import deploy_cmd  # noqa: F401  (registers verify, bench, quantize)
from metacompress.cli import policy_cmd  # noqa: F401  (registers policy train/info/eval)
from metacompress.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
