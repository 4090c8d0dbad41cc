"""Entry point: builds the typer app and maps errors to exit codes.

Exit codes: 0 success; 2 bad input or usage (one line naming the file and the fault);
1 internal error (traceback only with --debug). Library imports happen inside each
command, so `fedseg --help` starts without importing torch.
"""

from __future__ import annotations

import sys

import typer

from fedseg import __version__
from fedseg.cli.help_format import use_plain_help
from fedseg.cli import (
    data_commands,
    export_commands,
    federation_commands,
    flower_commands,
    model_commands,
    run_commands,
    selection_commands,
    simulate_command,
    trust_commands,
)

app = typer.Typer(
    name="fedseg",
    help=(
        "Federated medical image segmentation in the spirit of nnU-Net. Each step reads and writes "
        "plain files, so a federation runs from shell scripts at each site.\n\n"
        "Example (one machine): fedseg synth sites --preset tiny && "
        "fedseg simulate sites --strategy fedavg --rounds 3 -o run"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"fedseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show a traceback for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """fedseg command line."""


for module in (
    data_commands, federation_commands, model_commands, selection_commands, simulate_command, run_commands,
    trust_commands, flower_commands, export_commands,
):
    module.register(app)
use_plain_help(app)   # "[required]", not "\\[required]", in every --help


def run(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the process exit code."""
    from fedseg.errors import InputError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="fedseg", standalone_mode=False)
    except InputError as exc:
        if debug:
            raise
        print(f"fedseg: error: {exc}", file=sys.stderr)
        code = 2
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        print("fedseg: aborted", file=sys.stderr)
        code = 130
    except KeyboardInterrupt:
        print("fedseg: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into exit 1
        # Usage errors from typer's command-line parser (click's ClickException family, which
        # newer typer versions vendor): they know how to show themselves and their exit code.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            code = exc.exit_code
        elif debug:
            raise
        else:
            print(f"fedseg: internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", file=sys.stderr)
            code = 1
    else:
        code = result if isinstance(result, int) else 0
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    run()
