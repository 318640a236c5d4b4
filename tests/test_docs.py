"""The documentation builds strictly: a broken cross-reference or a docstring formatting error fails.

Needs the ``docs`` extra (``pip install -e '.[docs]'``); skipped without Sphinx.
"""

import ast
import operator
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-E", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), os.path.join(ROOT, "docs"), str(tmp_path / "html")]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert os.path.exists(tmp_path / "html" / "_autosummary" / "jaxdiff.samplers.html")


# ------------------------------------------------------------------ facts the pages state, checked against the code
# The docs pages include the README's sections (MyST ``{include}``), so each table and list is written once;
# these tests read the pages as they render (includes expanded) and compare them with the code.

_INCLUDE = re.compile(r"```\{include\} (\S+)\n:start-after: (.*)\n:end-before: (.*)\n```")
_SECTIONS = ("data", "model", "diffusion", "distill", "train", "sample", "eval", "parallel")
_FILES = ("py", "json", "jsonl", "npz", "png", "md", "safetensors")


def _page(name: str) -> str:
    """``docs/NAME.md`` with its ``{include}`` blocks replaced by the text they include."""
    path = os.path.join(ROOT, "docs", name)

    def expand(match):
        with open(os.path.normpath(os.path.join(os.path.dirname(path), match[1])), encoding="utf-8") as f:
            text = f.read()
        start, end = text.index(match[2]) + len(match[2]), text.index(match[3])
        assert start <= end, f"{name}: {match[2]!r} must come before {match[3]!r}"
        return text[start:end]

    with open(path, encoding="utf-8") as f:
        return _INCLUDE.sub(expand, f.read())


def _eval_rule(rule: str, **names) -> int:
    """An NFE rule as the tables write it (``2n - 1``, ``n (M + 1)``) at integer ``names``, without eval()."""
    text = re.sub(r"(\d|\))\s*([A-Za-z(])", r"\1*\2", rule)  # 2n -> 2*n, )( -> )*(
    text = re.sub(r"([A-Za-z])\s+\(", r"\1*(", text)  # n (M + 1) -> n*(M + 1)
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        raise ValueError(f"NFE rule {rule!r}: cannot read {ast.dump(node)}")

    return value(ast.parse(text, mode="eval").body)


def _sampler_rows(text: str) -> dict[str, str]:
    """``{sampler name: NFE column}`` of the sampler table (the one whose header names "NFE for")."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| sampler |") and "NFE for" in line)
    column = [c.strip() for c in lines[start].strip("|").split("|")].index("NFE for `n` steps")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`([^`=\s]+)`", cells[0]):  # the names; `order=1..3` is an option
            rows[name] = cells[column]
    return rows


@pytest.mark.parametrize("page", ["README", "samplers.md"])
def test_the_sampler_table_is_the_registry(page):
    from jaxdiff.samplers import registry

    if page == "README":
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            text = f.read()
    else:
        text = _page(page)
    rows = _sampler_rows(text)
    assert set(rows) == set(registry.SAMPLERS), "the table's samplers are the registry's"
    for name, cell in rows.items():
        spec = registry.get(name)
        if spec.nfe_fn is None:
            assert cell.startswith("adaptive"), (name, cell)
            continue
        rule = re.match(r"`([^`]+)`", cell)
        assert rule, f"{name}: the NFE column must start with the rule in backticks, got {cell!r}"
        m = spec.options.get("num_corrector_steps", 0)
        assert _eval_rule(rule[1], n=6, M=m) == registry.nfe(name, 6), (name, rule[1])


def _named_fields(text: str) -> set[str]:
    """The config fields a page names: ``config.a.b``, ``--config.a.b=...`` and ``a.b`` in inline code, and the
    ``--config.a.b`` flags of its code blocks; ``a`` a config section, file names (``sample.py``) aside."""
    fenced = re.findall(r"```.*?```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", prose) + re.findall(r"--config\.[\w.]+", "\n".join(fenced))
    out = set()
    for span in spans:
        for m in re.finditer(rf"(?<![\w.])(?:--)?(?:config\.)?((?:{'|'.join(_SECTIONS)})\.[A-Za-z_][\w.]*)(?![\w-])", span):
            name = m[1].rstrip(".")
            if name.rsplit(".", 1)[-1] not in _FILES:
                out.add(name)
    return out


def _leaves(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_config_field_the_training_page_names_exists():
    from jaxdiff.configs import default

    fields = set(_leaves(default.get_config()))
    named = _named_fields(_page("training.md"))
    assert len(named) > 10, "the page lost its settings"
    assert not sorted(named - fields), f"docs/training.md names fields that default.get_config() lacks: " \
                                       f"{sorted(named - fields)}"


def test_the_training_page_lists_every_setting():
    """Each section's bullet (``- `train`: ...``) names every field of ``config.train`` (nested ones dotted)."""
    from jaxdiff.configs import default

    text = _page("training.md")
    config = default.get_config()
    missing = []
    for section in _SECTIONS:
        bullet = re.search(rf"^- `{section}[`.].*?(?=^- |^$)", text, flags=re.S | re.M)
        assert bullet, f"docs/training.md has no bullet for config.{section}"
        names = set(re.findall(r"`([\w.]+)", bullet[0])) | {n.split(".", 1)[1] for n in _named_fields(text)
                                                            if n.startswith(section + ".")}
        missing += [f"{section}.{f}" for f in _leaves(config[section]) if f not in names]
    assert not missing, f"docs/training.md does not list {missing}"


def test_the_pages_python_examples_are_the_readmes():
    """A page's Python example comes from the README (an ``{include}``), whose examples tests/test_readme.py runs
    as written; ``nnx.md``'s examples are run by tests/test_nnx.py."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    pages = [n for n in sorted(os.listdir(os.path.join(ROOT, "docs"))) if n.endswith(".md") and n != "nnx.md"]
    found = 0
    for name in pages:
        for block in re.findall(r"```python\n(.*?)```", _page(name), flags=re.S):
            assert block in readme, f"docs/{name} has a Python example that no test runs:\n{block[:300]}"
            found += 1
    assert found >= 2, "getting_started.md lost the README's examples"
