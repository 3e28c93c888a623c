"""Entry point of the ``metacompress`` command: importing the command modules registers them."""

from __future__ import annotations

import functools
import sys
from typing import Any, Sequence

import typer

from metacompress.cli import (
    compress_cmd,  # noqa: F401  (registers train, compress, inspect)
    deploy_cmd,  # noqa: F401  (registers verify, bench, quantize)
    fuse_cmd,  # noqa: F401
    meta_cmd,  # noqa: F401  (registers meta-train, meta-eval)
    policy_cmd,  # noqa: F401  (registers policy train/info/eval)
    robust_cmd,  # noqa: F401  (registers robustify)
    run_cmd,  # noqa: F401  (registers run, recipes list/show)
    sweep_cmd,  # noqa: F401
)
from metacompress.cli.app import _one_line, app, err_console
from metacompress.compress.measure import composed_attention
from metacompress.meta import distributed

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer with click installed
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError


@functools.lru_cache(maxsize=1)
def _command() -> Any:
    """The click command tree, built once per process (typer rebuilds it on every call)."""
    return typer.main.get_command(app)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return its exit code.

    Typer prints a malformed command line (an option that is not a number, a missing option)
    as a multi-line panel; the toolkit's contract is one line on stderr and exit code 2.
    """
    command = _command()
    try:
        with composed_attention():  # compression's passes count and hook attention's parts
            code = command.main(args=list(argv) if argv is not None else None, prog_name="metacompress",
                                standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()
        return 2
    except UsageError as exc:
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        err_console.print(f"error: {_one_line(exc.format_message())}{where}", highlight=False, markup=False,
                          soft_wrap=True)
        return 2
    except ClickException as exc:
        err_console.print(f"error: {_one_line(exc.format_message())}", highlight=False, markup=False, soft_wrap=True)
        return exc.exit_code
    except typer.Abort:
        return 1
    return code if isinstance(code, int) else 0


def main() -> None:
    code = run()
    distributed.exit_rank(code)  # under torchrun: no interpreter teardown (see there)
    sys.exit(code)


if __name__ == "__main__":
    main()
