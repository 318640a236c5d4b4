"""The scripts' wrapper: the persistent compilation cache is on by default, movable and can be turned off."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A script in the shape of scripts/*.py: one jitted computation under cli.run.
PROGRAM = """
import jax, jax.numpy as jnp
from jaxdiff import cli
def main(argv):
    jax.jit(lambda x: jnp.tanh(x @ x).sum())(jnp.ones((32, 32))).block_until_ready()
cli.run(main)
"""


def _run(tmp_path, *flags, env_updates=None):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.update(env_updates or {})
    return subprocess.run([sys.executable, "-c", PROGRAM, *flags], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _entries(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@pytest.mark.slow
def test_compilation_cache_default_flag_and_off(tmp_path):
    default = tmp_path / "xdg" / "jaxdiff" / "xla"
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _entries(default), "the default cache directory received the compiled program"

    moved = tmp_path / "moved"
    proc = _run(tmp_path, f"--compilation_cache={moved}")
    assert proc.returncode == 0, proc.stderr
    assert _entries(moved)

    env_dir = tmp_path / "from_env"
    proc = _run(tmp_path, env_updates={"JAX_COMPILATION_CACHE_DIR": str(env_dir)})
    assert proc.returncode == 0, proc.stderr
    assert _entries(env_dir)

    before = _entries(default)
    proc = _run(tmp_path, "--compilation_cache=", env_updates={"JAX_COMPILATION_CACHE_DIR": str(env_dir),
                                                               "XDG_CACHE_HOME": str(tmp_path / "other")})
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "other").exists() and _entries(default) == before


def test_uncreatable_cache_directory_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _run(tmp_path, f"--compilation_cache={blocker / 'sub'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --compilation_cache: cannot create")


@pytest.mark.parametrize("flag, line", [
    ("--config.train.num_step=5",
     "error: --config.train.num_step: no such field in config.train; did you mean config.train.num_steps?"),
    ("--config.trian.num_steps=5", "error: --config.trian.num_steps: no such field in config; did you mean config.train?"),
    ("--config.train.num_steps=abc",
     "error: --config.train.num_steps=abc: invalid literal for int() with base 10: 'abc'"),
    ("--config=missing.py", "error: --config: no such file 'missing.py'"),
])
def test_a_config_typo_is_one_line_naming_the_key_and_the_suggestion(tmp_path, flag, line):
    """What a user types wrong on the training command line: one ``error:`` line, exit 1, nothing written."""
    workdir = tmp_path / "wd"
    args = [sys.executable, "-m", "jaxdiff.scripts.train", "--config", "jaxdiff/configs/digits.py",
            "--workdir", str(workdir), flag]
    if flag.startswith("--config="):
        args = [a for a in args if a not in ("--config", "jaxdiff/configs/digits.py")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [line]
    assert not workdir.exists()


def test_the_scripts_help_shows_their_docstrings_as_written():
    """``--help`` prints a script's module docstring: an escape in it (a shell line continuation ``\\``
    at a line's end) must not be processed away, so every script's docstring is its source text."""
    import ast
    import glob

    for path in sorted(glob.glob(os.path.join(ROOT, "jaxdiff", "scripts", "*.py"))):
        source = open(path, encoding="utf-8").read()
        tree = ast.parse(source)
        doc = ast.get_docstring(tree, clean=False)
        if doc is None:
            continue
        literal = ast.get_source_segment(source, tree.body[0].value)
        text = literal.lstrip("rRbuU")[3:-3]
        assert doc == text, f"{os.path.relpath(path, ROOT)}: its docstring's escapes change --help (make it r\"\"\")"
