"""DVC stage entry points: each module is a short ``python -m stages.<name>`` script.

:func:`run_stage` is the shared ``__main__``: it loads ``params.yaml``, records the
run with sacred and turns the errors a user can fix (bad params, bad data, a
missing or foreign input, a full disk) into one line on stderr and exit status 2,
instead of a traceback. ``ATTMASK_TRACEBACK=1`` shows the traceback anyway.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn

EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story (they name the key or file).

    ``OSError`` covers a missing input (FileNotFoundError, the features' BackboneNotFoundError),
    permissions and a full disk; the pipeline's own messages name the file.
    """
    from pipeline.core.errors import UserError

    return (UserError, OSError)


def describe_error(stage: str, error: BaseException) -> str:
    """``"<stage>: <module.Type>: <message>"`` on one line."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    message = " ".join(str(error).split())
    return f"{stage}: {name}: {message}" if message else f"{stage}: {name}"


def run_stage(stage: str, main: Callable[[Any, Any], dict[str, Any]], enabled: bool = True,
              params_path: str = "params.yaml") -> dict[str, Any]:
    """Load params, run ``main(params, record)`` under :func:`pipeline.core.tracking.record_run`.

    ``enabled=False`` (torchrun ranks other than 0) runs without a sacred record.
    A user error ends the process with one line on stderr and exit status 2.
    """
    from pipeline.core.config import load_params
    from pipeline.core.numerics import limit_threads
    from pipeline.core.tracking import record_run

    try:
        params = load_params(params_path)
        limit_threads(params.threads)
        return record_run(stage, params, lambda record: main(params, record), enabled=enabled)
    except user_errors() as error:
        if os.environ.get("ATTMASK_TRACEBACK"):
            raise
        _fail(stage, error)


def _fail(stage: str, error: BaseException) -> NoReturn:
    print(describe_error(stage, error), file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
