"""A griffe extension for this project's API reference (loaded by ``mkdocs.yml``; not part of the package).

* Lazy exports: ``art_weightpert`` and ``art_weightpert.metrics`` import most of their public names on first use,
  from a module-level dict ``_LAZY = {name: module}`` and ``__getattr__``, which static analysis cannot follow. Each
  ``_LAZY`` entry becomes an alias to ``module.name`` and joins the module's exports, so ``::: art_weightpert.metrics``
  documents every name of its ``__all__``, including names added later.
* Sphinx roles: the docstrings cross-reference with ``:class:`X```, ``:func:`.x```, ``:meth:`~a.B.c``` etc., which
  mkdocstrings does not read. Each role becomes an optional cross-reference (a link where the target is documented,
  plain code elsewhere, never a warning), resolved like Sphinx does: in the docstring's scope, then by its dotted
  suffix among the package's objects.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`([^`]+)`")


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class ProjectDocstrings(griffe.Extension):
    """Lazy exports and Sphinx cross-reference roles (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        objects = list(_walk(pkg))
        for obj in objects:
            if obj.is_module:
                self._lazy_exports(obj)
        by_suffix: dict[str, list[str]] = defaultdict(list)
        for obj in objects:
            parts = obj.path.split(".")
            for i in range(1, len(parts)):
                by_suffix[".".join(parts[i:])].append(obj.path)
        collection = loader.modules_collection
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(
                    lambda m, o=obj: self._reference(m.group(1), o, collection, by_suffix), obj.docstring.value
                )

    @staticmethod
    def _lazy_exports(module: griffe.Module) -> None:
        lazy = module.members.get("_LAZY")
        if lazy is None or lazy.is_alias or not lazy.is_attribute or lazy.value is None:
            return
        try:
            mapping = ast.literal_eval(str(lazy.value))
        except (ValueError, SyntaxError):
            return
        exports = [name for name in (module.exports or []) if isinstance(name, str)]
        for name, target in mapping.items():
            if name not in module.members:
                module.set_member(name, griffe.Alias(name, f"{target}.{name}", parent=module))
            if name not in exports:
                exports.append(name)
        module.exports = exports

    @staticmethod
    def _exists(path: str, collection: Any) -> bool:
        try:
            collection[path]
        except Exception:  # any lookup failure means: not one of ours
            return False
        return True

    def _reference(self, text: str, obj: griffe.Object, collection: Any, by_suffix: dict[str, list[str]]) -> str:
        target = text.strip()
        if "<" in target and target.endswith(">"):  # `title <target>`
            title, target = target[:-1].split("<", 1)
            title, target = title.strip(), target.strip()
        else:
            title = None
        short = target.startswith("~")
        target = target.lstrip("~").lstrip(".").rstrip("()")
        shown = title or (target.rsplit(".", 1)[-1] if short else target)
        path = self._resolve(target, obj, collection, by_suffix)
        if path is None:
            return f"`{shown}`"
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

    def _resolve(self, target: str, obj: griffe.Object, collection: Any, by_suffix: dict[str, list[str]]) -> str | None:
        if self._exists(target, collection):
            return target
        head, _, rest = target.partition(".")
        try:
            path = obj.resolve(head)
        except Exception:  # griffe.NameResolutionError and alias errors alike
            path = None
        if path is not None:
            path = f"{path}.{rest}" if rest else path
            if self._exists(path, collection):
                return path
        candidates = by_suffix.get(target, [])
        if not candidates:
            return None
        # The closest one to the docstring: the longest common dotted prefix.
        return max(candidates, key=lambda candidate: _shared_prefix(candidate, obj.path))


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n
