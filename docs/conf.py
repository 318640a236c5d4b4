"""Sphinx configuration of the jaxdiff documentation.

Sphinx, as the sites of jax, flax and optax (the libraries jaxdiff's users already read):
pages in Markdown through myst-parser, the API reference generated from the docstrings
(``sphinx.ext.autodoc`` + ``napoleon`` for the Google-style ``Args:`` sections +
``autosummary`` over module names, so new functions and modules appear without editing the
pages), and the sphinx-book-theme.

Build (strict: a broken cross-reference or a docstring formatting error fails)::

    pip install -e '.[docs]'
    sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "jaxdiff"
author = "the jaxdiff authors"
copyright = "the jaxdiff authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md"]
templates_path = ["_templates"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Types from other libraries in signatures have no target without network access (intersphinx);
# they are plain text. References to jaxdiff itself must all resolve.
nitpick_ignore_regex = [
    ("py:class", r"(jax|jaxlib|jnp|np|numpy|flax|nn|nnx|optax|orbax|ml_collections|chex|tfds|os|typing|collections|PIL)\b.*"),
    ("py:class", r"abc\.ABC"),  # the Objective interface's base class (no intersphinx)
    ("py:class", r"tuple\[.*"),
    ("py:class", r"Schedule"),  # a NamedTuple field annotation rendered without its module
    ("py:class", r"(Array|ArrayLike|PRNGKey|Callable|Sequence|Mapping|Iterator|Any|Module|dtype|NamedTuple)"),
    ("py:obj", r"(jax|jnp|np|flax|nnx|optax)\..*"),
]

# A package page documents the names it re-exports, so ``Schedule`` or ``UNet`` in a signature
# has two equal targets (the package's and the defining module's): either is right.
suppress_warnings = ["ref.python"]

html_theme = "sphinx_book_theme"
html_title = "jaxdiff"
html_theme_options = {"show_toc_level": 2}


# A package page documents the names it re-exports, but module-level data (``SAMPLERS``,
# ``PRESETS``) is documented only where it is assigned. A reference to a re-exported name that
# has no target of its own is sent to the target of the same object where it is defined.
def _lookup(dotted: str):
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_reexport(app, env, node, contnode):
    if node.get("refdomain") != "py" or not node.get("reftarget"):
        return None
    target, module = node["reftarget"], node.get("py:module")
    domain = env.get_domain("py")
    for name in [f"{module}.{target}"] * bool(module) + [target]:
        obj = _lookup(name) if name.startswith("jaxdiff") else None
        if obj is None:
            continue
        leaf = name.rsplit(".", 1)[-1]
        for fullname, entry in list(domain.objects.items()):
            if fullname.rsplit(".", 1)[-1] == leaf and fullname != name and _lookup(fullname) is obj:
                return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], fullname, node, contnode)
    return None


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
