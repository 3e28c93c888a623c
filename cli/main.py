"""Entry point of the ``metacompress`` command: importing the command modules registers them."""

from metacompress.cli import (
    compress_cmd,  # noqa: F401  (registers train, compress, inspect)
    deploy_cmd,  # noqa: F401  (registers verify, bench, quantize)
    fuse_cmd,  # noqa: F401
    meta_cmd,  # noqa: F401  (registers meta-train, meta-eval)
    policy_cmd,  # noqa: F401  (registers policy train/info/eval)
    run_cmd,  # noqa: F401  (registers run, recipes list/show)
    sweep_cmd,  # noqa: F401
)
from metacompress.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
