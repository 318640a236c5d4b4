"""What the scripts share: quiet third-party logs and one-line ``error: ...`` messages.

A script's ``main`` is wrapped by :func:`run`: expected failures (bad flags, settings, files;
a non-finite loss) print ``error: MESSAGE`` on stderr and exit 1, unless ``--debug`` asks for
the traceback. Third-party INFO logs (orbax writes dozens per checkpoint) are off unless
``--verbosity`` is given.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

__all__ = ["run", "EXPECTED_ERRORS", "parse_options"]

flags.DEFINE_bool("debug", False, "Show the Python traceback of an error instead of one line.")

# Failures that a user can fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError, FloatingPointError, OSError)


def _parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(pairs, flag: str = "--option") -> dict:
    """``["name=value", ...]`` (a repeated flag) -> ``{name: value}``, values as int, float, bool or str.

    ``ValueError`` naming ``flag`` for an entry without ``=`` or a repeated name. Whether the
    names are options of the chosen sampler is for :func:`jaxdiff.samplers.registry.check` to say.
    """
    out = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{flag} must be name=value, got {pair!r}")
        if name in out:
            raise ValueError(f"{flag} {name} given twice")
        out[name] = _parse_value(value)
    return out


def _quiet_logs() -> None:
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
        for name in ("orbax", "jax", "absl"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with quiet logs and ``error: ...`` lines for expected failures."""

    def wrapped(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        _quiet_logs()
        try:
            main(argv)
        except EXPECTED_ERRORS as error:
            if flags.FLAGS.debug:
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    app.run(wrapped)
