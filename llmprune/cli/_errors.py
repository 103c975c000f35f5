"""The one error boundary: every exception becomes one line on stderr and an exit code.

1 bad input, 2 step failed, 3 workdir busy, 4 integrity, 130 interrupted, 143 terminated. ``LLMPRUNE_DEBUG=1``
shows tracebacks.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from llmprune import report
from llmprune.errors import LlmpruneError, StepFailed

INTERRUPTED = 130
TERMINATED = 143  # 128 + SIGTERM, as a shell reports it
_LEFT = "the workdir is left as it was before this step"


class Terminated(BaseException):
    """SIGTERM (a CI job cancelled, ``kill``), raised in the main thread like Ctrl-C's KeyboardInterrupt, so every
    step unwinds the same way: its staging area removed, the workdir as it was."""


def _on_sigterm(signum, frame):
    raise Terminated()


def guarded(invoke: Callable[[], int], on_error: Callable[[str, int], None] | None = None) -> int:
    """Run ``invoke`` (a command line through the app) and map what it raises to an exit code; each error is one
    line on stderr, and handed to ``on_error(line, exit code)`` too (``--json``: a JSON document on stdout)."""
    import signal

    def fail(msg: str, code: int) -> int:
        report.error(msg)
        if on_error is not None:
            on_error(msg, code)
        return code

    debug = os.environ.get("LLMPRUNE_DEBUG") == "1"
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave its handler alone
        previous = None
    try:
        rv = invoke()
        return fail(f"interrupted; {_LEFT}", rv) if rv == INTERRUPTED else rv
    except LlmpruneError as e:
        if debug:
            raise
        return fail(str(e), e.exit_code)
    except (KeyboardInterrupt, EOFError):
        return fail(f"interrupted; {_LEFT}", INTERRUPTED)
    except Terminated:
        return fail(f"terminated; {_LEFT}", TERMINATED)
    except Exception as e:
        # Typer vendors its own copy of click in recent releases: recognise click's exceptions by class name.
        kinds = {c.__name__ for c in type(e).__mro__}
        if "NoArgsIsHelpError" in kinds:
            e.show()
            return 0
        if "Exit" in kinds:
            return e.exit_code
        if "Abort" in kinds:
            return fail(f"interrupted; {_LEFT}", INTERRUPTED)
        if debug:
            raise
        if "UsageError" in kinds:
            ctx = getattr(e, "ctx", None)
            return fail(e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx else ""), 1)
        return fail(message(e), StepFailed.exit_code)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def message(e: Exception) -> str:
    """The line shown for an unexpected exception inside a step."""
    import torch

    # safetensors reports a full disk as its own error type, with the OS's text in the message.
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "no space left on device" in str(e).lower():
        return f"no space left on device while writing; {_LEFT}"
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return (f"out of memory on the device; {_LEFT}; try --act-dtype bfloat16, a smaller --batch-size, or fewer "
                "calibration samples")
    if isinstance(e, MemoryError):
        return (f"out of host memory; {_LEFT}; try a smaller --batch-size, --act-dtype bfloat16, or fewer "
                "calibration samples")
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first} (set LLMPRUNE_DEBUG=1 to see the traceback)"
