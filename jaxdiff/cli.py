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


def _config_path(argv: list[str]) -> str | None:
    """The ``--config`` file of ``argv`` (without a ``:argument`` suffix), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """``[(dotted name after "config.", value or None), ...]`` of the ``--config.X.Y[=V]`` flags."""
    out = []
    for i, arg in enumerate(argv):
        name, sep, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name.startswith("config.") and name != "config.":
            if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value = argv[i + 1]
            out.append((name[len("config."):], value if (sep or value) else None))
    return out


def _load_config(path: str):
    """``get_config()`` of the config file ``path`` (how ml_collections' config flag loads it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_jaxdiff_flag_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _missing_field(config, dotted: str) -> str | None:
    """``"--config.A.B: no such field in config.A; did you mean C?"`` for the first missing part, else None."""
    import difflib

    node, path = config, "config"
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else None
        if keys is None:
            return f"--config.{dotted}: {path} holds a {type(node).__name__} value, not a group of settings"
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
            hint = f"; did you mean {path}.{close[0]}?" if close else f" (its fields: {', '.join(sorted(keys))})"
            return f"--config.{dotted}: no such field in {path}{hint}"
        node, path = node[part], f"{path}.{part}"
    return None


def _flag_error(argv: list[str], error: BaseException) -> str:
    """One line for a flag that cannot be parsed: a missing config file, a config field that does not
    exist (with the closest name), a bad value."""
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        return f"--config: no such file {path!r}"
    overrides = _overrides(argv)
    if path is not None and overrides:
        try:
            config = _load_config(path)
        except Exception as load_error:  # the config file itself is broken: say so, in one line
            return f"--config {path}: {type(load_error).__name__}: {load_error}".split("\n")[0]
        for dotted, _ in overrides:
            missing = _missing_field(config, dotted)
            if missing:
                return missing
    raw = str(error).replace("\\'", "'").replace('\\"', '"').replace("\\n", "\n")
    text = raw.strip("'")
    for dotted, value in overrides:  # a value that does not parse as the field's type
        if f"config.{dotted}" in text:
            reason = raw.split(":", 1)[-1].strip().split("\n")[0]
            return f"--config.{dotted}={value}: {reason}" if value is not None else f"--config.{dotted}: {reason}"
    return " ".join(text.split("\n")[0].split()) or type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    """``flags.FLAGS(argv)``; an unparsable flag prints one ``error:`` line and exits 1 (``--debug``: raises)."""
    try:
        path = _config_path(argv)
        if path is not None and "config" in flags.FLAGS and not os.path.isfile(path):
            raise FileNotFoundError(f"--config: no such file {path!r}")
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
