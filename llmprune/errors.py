"""The error types that the CLI turns into one line and an exit code (see cli.main)."""


class LlmpruneError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""

    exit_code = 1


class UserError(LlmpruneError):
    """Bad input: a wrong option, a missing workdir, an unreachable source. Exit code 1."""

    exit_code = 1


class StepFailed(LlmpruneError):
    """A step started and could not finish (numerics, out of memory...). Exit code 2."""

    exit_code = 2


class WorkdirBusy(LlmpruneError):
    """Another process holds the workdir lock. Exit code 3."""

    exit_code = 3


class IntegrityError(LlmpruneError):
    """A file in the workdir does not match the hash recorded in the manifest. Exit code 4."""

    exit_code = 4


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to ``limit``: how a
    library's error is quoted inside llmprune's one-line messages."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
