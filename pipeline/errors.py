"""The project's exceptions: one root, each leaf says what went wrong and carries its exit code.

The CLI edge turns any of these into one message and the leaf's exit code; anything else that
escapes is a bug of ours and is reported as such.
"""

from __future__ import annotations

from collections.abc import Sequence


class PipelineError(Exception):
    """Root of every error the pipeline reports to a user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(PipelineError):
    """A wrong command line or an unknown name asked for (image, environment, version)."""

    exit_code = 2


class ConfigError(PipelineError, ValueError):
    """A file of the user's is wrong: names the file, the key and the value."""

    exit_code = 3

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.key = key


class VariableError(ConfigError):
    """An environment variable of the user's holds a wrong value: names the variable and it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"environment variable {variable}", None, problem)


class TemplateError(ConfigError):
    """A template could not be rendered (undefined name, syntax error)."""


class ToolError(PipelineError):
    """An external tool failed: names the command, its exit code and its last lines of output."""

    exit_code = 4

    def __init__(
        self,
        what: str,
        argv: Sequence[str],
        returncode: int,
        tail: Sequence[str],
        log: str = "",
        *,
        cause: str = "",
    ) -> None:
        command = f"`{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}`"
        message = f"{what} failed: {cause}\n  " if cause else f"{what} failed: "
        message += f"{command} exited with code {returncode}"
        if log:
            message += f" (full output: {log})"
        if tail and not cause:
            lines = "\n".join(f"  | {line}" for line in tail)
            message += f"; last lines:\n{lines}"
        super().__init__(message)
        self.what = what
        self.argv = list(argv)
        self.returncode = returncode
        self.tail = list(tail)
        self.log = log
        self.cause = cause


class MissingTool(PipelineError):
    """A tool the pipeline needs is not installed."""

    exit_code = 4


class VerifyFailed(PipelineError):
    """The candidate image did not pass verification; it is recorded as failed."""

    exit_code = 5


class DeployFailed(PipelineError):
    """Terraform could not bring the fleet to the wanted version."""

    exit_code = 6


class RolledBack(DeployFailed):
    """A rollout failed its health gate and was undone: the fleet runs what it ran before."""

    exit_code = 8


class LockHeld(PipelineError):
    """Another run holds the lock of this environment or image."""

    exit_code = 7


class Interrupted(PipelineError):
    """The user pressed Ctrl-C (or the run got SIGTERM); what was started has been cleaned up."""

    exit_code = 130


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with --debug output)",
    UsageError.exit_code: "wrong command line, or unknown image, environment or version",
    ConfigError.exit_code: (
        "a file or variable of yours is wrong (pipeline.yml, a role, a template, PIPELINE_*)"
    ),
    ToolError.exit_code: "an external tool (Packer, Ansible, Molecule, Terraform, QEMU) failed",
    VerifyFailed.exit_code: "the image failed verification",
    DeployFailed.exit_code: "the rollout failed",
    LockHeld.exit_code: "another run holds the lock",
    RolledBack.exit_code: "the rollout failed its health gate and was rolled back",
    Interrupted.exit_code: "interrupted; what was started has been cleaned up",
}
