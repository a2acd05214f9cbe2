"""The documentation site (``mkdocs.yml``, ``docs/``): every public name has a reference, every page is in the nav,
and, where mkdocs is installed (the ``docs`` extra), ``mkdocs build --strict`` succeeds."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import art_weightpert

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"
CONFIG = ROOT / "mkdocs.yml"

# Top-level modules that are implementation details (documented in architecture.md, not in the API reference).
# A new top-level module is public unless it is added here; a public one needs a reference page.
INTERNAL_MODULES = {
    "art_weightpert.balls",
    "art_weightpert.conv_gemm",
    "art_weightpert.flips",
    "art_weightpert.graph",
    "art_weightpert.rounding",
    "art_weightpert.torch_tools",
    "art_weightpert.validation",
}

_DIRECTIVE = re.compile(r"^:::[ \t]+(\S+)[ \t]*$", re.MULTILINE)


def public_modules() -> list[str]:
    """The package, its subpackages and its public top-level modules."""
    names = ["art_weightpert"]
    for info in pkgutil.iter_modules(art_weightpert.__path__, "art_weightpert."):
        if info.ispkg:
            package = importlib.import_module(info.name)
            names.append(info.name)
            names += [sub.name for sub in pkgutil.walk_packages(package.__path__, info.name + ".") if sub.ispkg]
        elif info.name not in INTERNAL_MODULES and not info.name.rpartition(".")[2].startswith("_"):
            names.append(info.name)
    return names


def public_names(module_name: str) -> dict[str, object]:
    """A module's public names: its ``__all__``, else the classes and functions it defines without a leading
    underscore (the same rule as the reference's ``filters: public``)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return {name: getattr(module, name) for name in module.__all__}
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module_name
    }


def _members_option(block: str) -> list[str] | bool | None:
    """The ``members`` option of a directive's indented options block: a list, False, or None (all members)."""
    match = re.search(r"^\s*members:[ \t]*(.*)$", block, re.MULTILINE)
    if match is None:
        return None
    value = match.group(1).strip()
    if value.lower() in ("false", "no", "[]"):
        return False
    if value.lower() in ("true", "yes"):
        return None
    if value.startswith("["):
        return [item.strip().strip("'\"") for item in value.strip("[]").split(",") if item.strip()]
    rest = block[match.end() :]
    return re.findall(r"^\s*-\s*['\"]?([\w.]+)['\"]?\s*$", rest.split("\n\n")[0], re.MULTILINE)


def directives() -> list[tuple[str, str, list[str] | bool | None]]:
    """(page, identifier, members option) of every ``:::`` directive of the reference pages."""
    found = []
    for page in sorted(REFERENCE.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        matches = list(_DIRECTIVE.finditer(text))
        for i, match in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            block = "\n".join(
                line for line in text[match.end() : end].splitlines() if line.startswith((" ", "\t")) or not line
            )
            found.append((page.name, match.group(1), _members_option(block)))
    return found


def _resolve(identifier: str) -> object:
    """The module or object that a directive's identifier names."""
    parts = identifier.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(identifier)


def rendered() -> set[tuple[str, int]]:
    """(name, id(object)) of every object that a reference page renders under that name."""
    shown = set()
    for _, identifier, members in directives():
        obj = _resolve(identifier)
        if inspect.ismodule(obj):
            if members is False:
                continue
            for name, value in public_names(obj.__name__).items():
                if members is None or name in members:
                    shown.add((name, id(value)))
        else:
            shown.add((identifier.rpartition(".")[2], id(obj)))
    return shown


def test_every_directive_names_an_importable_object():
    assert directives(), "no ::: directive in docs/reference/"
    for page, identifier, _ in directives():
        try:
            _resolve(identifier)
        except (ImportError, AttributeError) as error:
            pytest.fail(f"docs/reference/{page}: `::: {identifier}` names nothing importable ({error})")


def test_every_public_name_has_a_reference():
    shown = rendered()
    missing = [
        f"{module}.{name}"
        for module in public_modules()
        for name, value in public_names(module).items()
        if (name, id(value)) not in shown
    ]
    assert not missing, (
        "public names without an API reference (add a `::: module` page under docs/reference/ and to mkdocs.yml's "
        f"nav, or list the module in INTERNAL_MODULES of this test): {missing}"
    )


def _nav_pages() -> set[str]:
    text = CONFIG.read_text(encoding="utf-8")
    nav = text[text.index("\nnav:") :]
    return set(re.findall(r"([\w./-]+\.md)\s*$", nav, re.MULTILINE))


def test_every_page_is_in_the_nav():
    nav = _nav_pages()
    pages = {page.relative_to(DOCS).as_posix() for page in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def test_site_directory_is_ignored():
    lines = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert any(line.strip() in ("site/", "/site/", "site") for line in lines)


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(CONFIG), "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert (tmp_path / "site" / "reference" / "attacks" / "index.html").is_file()
