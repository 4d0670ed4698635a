"""DVC stage entry points: each module is a short ``python -m stages.<name>`` script.

:func:`run_stage` is the shared ``__main__``: it loads ``params.yaml``, records the
run with sacred and turns the errors a user can fix (bad params, bad data, a
missing or foreign input, a full disk) into one line on stderr and exit status 2,
instead of a traceback. ``ATTMASK_TRACEBACK=1`` shows the traceback anyway.

Importing this package as the parent of ``python -m stages.<name>`` first puts
the numerical libraries' dispatch controls of ``params.yaml``'s ``numerics``
into the environment, re-executing the interpreter before torch or NumPy load
(:func:`pipeline.core.numerics.ensure_numerics`); :func:`run_stage` checks
again with the validated params.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn

EXIT_USER_ERROR = 2


def _numerics_before_imports(params_path: str = "params.yaml") -> None:
    """Re-execute with ``numerics``' controls while nothing heavy is loaded yet (saves a second torch import).

    Anything unreadable is left to :func:`run_stage`, which reports it properly.
    """
    try:
        import yaml

        mode = (yaml.safe_load(open(params_path)) or {}).get("numerics", "portable")
        from pipeline.core.numerics import ensure_numerics, numerics_env

        numerics_env(mode)
    except Exception:
        return
    ensure_numerics(mode)


def launched_as_stage() -> bool:
    """Whether this process is ``python -m stages.<name>`` (directly, from DVC or under torchrun)."""
    argv = sys.orig_argv
    return any(a == "-m" and b.startswith("stages.") for a, b in zip(argv, argv[1:]))


if sys.argv[:1] == ["-m"]:  # Python sets argv[0] to "-m" while it imports the parents of a `-m` module
    _numerics_before_imports()


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
    from pipeline.core.numerics import configure_numerics, ensure_numerics, limit_threads
    from pipeline.core.tracking import record_run

    try:
        params = load_params(params_path)
        if launched_as_stage():  # called in-process (tests, a notebook): the record says what numerics it had
            ensure_numerics(params.numerics)
        warning = configure_numerics(params.numerics)
        if warning:
            print(f"{stage}: {warning}", file=sys.stderr, flush=True)
        limit_threads(params.threads)
        return record_run(stage, params, lambda record: main(params, record), enabled=enabled)
    except user_errors() as error:
        if os.environ.get("ATTMASK_TRACEBACK"):
            raise
        _fail(stage, error)


def _fail(stage: str, error: BaseException) -> NoReturn:
    print(describe_error(stage, error), file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
