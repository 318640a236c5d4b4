"""The command-line programs (``python -m jaxdiff.scripts.NAME`` or the ``jaxdiff-NAME`` entry points)."""
