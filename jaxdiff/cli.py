"""What the scripts share: quiet third-party logs, one-line ``error: ...`` messages and a
persistent compilation cache.

A script's ``main`` is wrapped by :func:`run`: expected failures (bad flags, settings, files;
a non-finite loss) print ``error: MESSAGE`` on stderr and exit 1, unless ``--debug`` asks for
the traceback. Third-party INFO logs (orbax writes dozens per checkpoint) are off unless
``--verbosity`` is given.

Compiled programs (the train step, the samplers) are kept in a persistent XLA cache, so a
machine compiles them once: ``--compilation_cache DIR`` (default ``$JAX_COMPILATION_CACHE_DIR``
if set, else ``$XDG_CACHE_HOME/jaxdiff/xla``, i.e. ``~/.cache/jaxdiff/xla``);
``--compilation_cache=`` turns it off.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

__all__ = ["run", "EXPECTED_ERRORS", "parse_options", "default_compilation_cache", "enable_compilation_cache"]

flags.DEFINE_bool("debug", False, "Show the Python traceback of an error instead of one line.")
flags.DEFINE_string("compilation_cache", None,
                    "Directory of the persistent XLA compilation cache (default: $JAX_COMPILATION_CACHE_DIR, "
                    "else $XDG_CACHE_HOME/jaxdiff/xla or ~/.cache/jaxdiff/xla); an empty value turns it off.")

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


def default_compilation_cache() -> str:
    """``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/jaxdiff/xla`` (``~/.cache/jaxdiff/xla``)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdiff", "xla")


def enable_compilation_cache(path: str | None) -> str | None:
    """Point JAX's persistent compilation cache at ``path`` (created if missing); ``""`` turns it off.

    ``None`` means :func:`default_compilation_cache`; a default directory that cannot be created
    only disables the cache, one given explicitly raises ``ValueError``. Call it before the
    first compilation. Returns the directory in use, or None.
    """
    import jax

    explicit = path is not None
    if path is None:
        path = default_compilation_cache()
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        if explicit:
            raise ValueError(f"--compilation_cache: cannot create the directory {path!r}: {error}") from error
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def _flag_error(argv: list[str], error: BaseException) -> str:
    """One line for a flag that cannot be parsed: a config field that does not exist, a bad value, a missing file."""
    text = str(error).replace("\\'", "'").replace('\\"', '"').replace("\\n", "\n").strip("'")
    key = re.search(r"'(\w+)'", text)
    guess = re.search(r'Did you mean \\?"(\w+)\\?"', text)
    if key and isinstance(error, (AttributeError, KeyError)):
        for arg in argv[1:]:
            name = arg.split("=", 1)[0].lstrip("-")
            parts = name.split(".")
            if name.startswith("config.") and key.group(1) in parts[1:]:
                parent = ".".join(parts[:parts.index(key.group(1))])
                hint = f"; did you mean {guess.group(1)}?" if guess else ""
                return f"--{name}: no such field in {parent}{hint}"
    if isinstance(error, flags.UnrecognizedFlagError) and "config." in text:
        return f"--{text.split(chr(39))[1]}: no such field in the config"
    if "No such file or directory" in text or isinstance(error, OSError):
        missing = [arg.split("=", 1)[-1] for i, arg in enumerate(argv) if arg.startswith("--config=")]
        missing += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
        if missing and not os.path.exists(missing[0]):
            return f"--config: no such file {missing[0]!r}"
    return " ".join(text.split("\n")[0].split()) or type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    """``flags.FLAGS(argv)``; an unparsable flag prints one ``error:`` line and exits 1 (``--debug``: raises)."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].present:
            flags.FLAGS.config  # noqa: B018  (loads the file and applies the overrides now, before any work)
        return rest
    except Exception as error:
        if "--debug" in argv:
            raise
        print(f"error: {_flag_error(argv, error)}", file=sys.stderr)
        sys.exit(1)


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with quiet logs, the compilation cache and ``error: ...`` lines for expected failures."""

    def wrapped(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        _quiet_logs()
        try:
            enable_compilation_cache(flags.FLAGS.compilation_cache)
            main(argv)
        except EXPECTED_ERRORS as error:
            if flags.FLAGS.debug:
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    app.run(wrapped, flags_parser=_parse_flags)
