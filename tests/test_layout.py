"""The layering rules of the source, enforced over its syntax trees (issue 14).

Rules:

1. No import cycle between the modules of ``gateway`` and ``l4gw_plugins``. Every
   import counts: module level, inside a function, under ``if TYPE_CHECKING:``, and
   ``__import__``/``importlib.import_module`` (and ``pkgutil.resolve_name``,
   ``importlib.util.find_spec``, ``runpy.run_module``) called with a string literal,
   a module-level string constant, or the variable of a loop over literal strings
   (``for m in ("gateway.cli.tproxy", ...): __import__(m)``). A cycle hidden in a
   function or behind ``TYPE_CHECKING`` still means a type lives in the wrong
   module (STYLE.md).
2. ``gateway`` never imports ``l4gw_plugins``, in any of those forms, and holds no
   string naming one of its modules outside docstrings (whatever importer it would
   reach): the core must run with every plugin disabled.
3. The pure modules (values and parsers, no I/O) import no ``trio`` at run time and
   do no socket I/O (a call of ``.recv``, ``.send``, ``.connect``, ``.accept``,
   ``socket.socket(``, a resolver lookup, ...), nor does any module they import at
   run time. ``import socket`` for constants and types is fine, and so is an import
   of trio under ``TYPE_CHECKING`` (``hookspecs`` names ``trio.Nursery``): it runs no
   trio code.
4. Plugins import only the declared public namespaces: ``gateway`` (the names of its
   ``__all__``), ``gateway.schema``, ``gateway.relay`` and ``gateway.telemetry`` and
   their modules, ``gateway.testing``, and their own package. The built-in plugins,
   the example plugins under ``examples/`` (and their tests), and the Python blocks
   of README.md and docs/plugins.md keep to it, as a third-party author must.

How imports are counted:

* ``import a.b.c`` is an import of ``a.b.c`` alone. Python also runs the
  ``__init__`` of ``a`` and ``a.b`` first, but every module of a package does that:
  counted, it would make ``gateway/__init__.py`` (the public face, which imports
  from the modules below it) a member of every cycle.
* An import of a package is an import of its ``__init__``.
* ``from pkg import name`` is an import of ``pkg.name`` when that is a module,
  else of ``pkg``.

The engine (:func:`check`) takes the root of a source tree, so the last tests can
prove each rule fails on a violation seeded into a copy of the tree.
"""

from __future__ import annotations

import ast
import itertools
import re
import shutil
import textwrap
from collections import deque
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Source folder -> import name (pyproject.toml: package-dir).
PACKAGES = {"gateway": "gateway", "plugins": "l4gw_plugins"}
CORE, PLUGINS = "gateway", "l4gw_plugins"

PURE = (
    "gateway/flow.py",
    "gateway/config.py",
    "gateway/schema.py",
    "gateway/proxy_protocol.py",
    "gateway/clienthello.py",
    "gateway/linux.py",
    "gateway/redact.py",
    "gateway/identity.py",
    "gateway/hookspecs.py",
)
# Pure when it exists (the plan half of the TPROXY set-up).
PURE_OPTIONAL = ("gateway/tproxy/plan.py",)

# What a plugin may import of the core besides the names of gateway.__all__.
PUBLIC_MODULES = frozenset(
    {"gateway.discovery", "gateway.schema", "gateway.shield", "gateway.testing"}
)
PUBLIC_NAMESPACES = ("gateway.relay", "gateway.telemetry")

# A cycle of more modules than this is reported with its hidden imports only.
SMALL_CYCLE = 6

# Plugin code outside plugins/ that keeps the same boundary.
PLUGIN_DOCS = ("README.md", "docs/plugins.md")
EXAMPLES = "examples"
_SKIP_DIRS = frozenset({"__pycache__", ".venv", "node_modules", "build", "dist"})

# Calls that import the module named by their (string) argument.
IMPORTERS = frozenset({"__import__", "import_module", "resolve_name", "find_spec", "run_module"})
# Socket methods that move bytes or change connection state.
SOCKET_IO_METHODS = frozenset(
    {
        "accept",
        "connect",
        "connect_ex",
        "recv",
        "recv_into",
        "recvfrom",
        "recvfrom_into",
        "recvmsg",
        "recvmsg_into",
        "send",
        "sendall",
        "sendfile",
        "sendmsg",
        "sendto",
    }
)
# Functions of the socket module that open a socket or ask the resolver.
SOCKET_IO_FUNCTIONS = frozenset(
    {
        "socket",
        "socketpair",
        "fromfd",
        "create_connection",
        "create_server",
        "getaddrinfo",
        "gethostbyname",
        "gethostbyname_ex",
        "gethostbyaddr",
        "getnameinfo",
    }
)


@dataclass(frozen=True)
class Import:
    """One import of one module by another, where it is written."""

    source: str
    """The importing module."""
    target: str
    """The imported module: a module of the tree when it is one, else the dotted name."""
    name: str | None
    """For ``from pkg import name`` when ``name`` is not a module: the name."""
    path: str
    line: int
    kind: str
    """"module-level", "function-level", "TYPE_CHECKING" or the importer called."""

    @property
    def runtime(self) -> bool:
        return self.kind != "TYPE_CHECKING"

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def __str__(self) -> str:
        imported = f"{self.target} ({self.name})" if self.name else self.target
        return f"{self.where()} {self.source} -> {imported} [{self.kind}]"


@dataclass
class Module:
    name: str
    path: str
    tree: ast.Module
    is_package: bool
    imports: list[Import] = field(default_factory=list)
    io_calls: list[tuple[int, str]] = field(default_factory=list)
    """Socket I/O calls: (line, what)."""
    plugin_strings: list[tuple[int, str]] = field(default_factory=list)
    """String literals (not docstrings) naming a module of ``l4gw_plugins``: (line, text)."""
    attribute_uses: list[tuple[int, str]] = field(default_factory=list)
    """``gateway.attr`` where ``gateway`` is bound by ``import gateway``: (line, attr)."""


# --- reading a tree ---------------------------------------------------------------


def discover(root: Path) -> dict[str, Module]:
    """The modules of ``gateway`` and ``l4gw_plugins`` under ``root``, by import name."""
    found: list[tuple[str, str, str, bool]] = []
    for folder, package in PACKAGES.items():
        for path in sorted(_python_files(root / folder)):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join([package, *parts])
            found.append((name, str(path.relative_to(root)), path.read_text(), is_package))
    known = frozenset(name for name, *_ in found)
    return {f[0]: _read_module(*f, known) for f in found}


@cache
def _read_module(name: str, rel: str, text: str, is_package: bool, known: frozenset[str]) -> Module:
    # Cached: the seeded trees differ from this one in a single file.
    module = Module(name, rel, ast.parse(text, filename=rel), is_package)
    _Collector(module, known).run()
    return module


def _python_files(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*.py"):
        if not _SKIP_DIRS & set(path.relative_to(folder).parts):
            yield path


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, known: AbstractSet[str]) -> str:
    """The deepest module of the tree that ``name`` starts with, or ``name`` itself."""
    if name in known:
        return name
    parts = name.split(".")
    if parts[0] in (CORE, PLUGINS):
        for end in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in known:
                return prefix
    return name


class _Collector:
    """Records a module's imports (with their context), socket I/O and ``m.attr`` uses."""

    def __init__(self, module: Module, known: AbstractSet[str]) -> None:
        self.m = module
        self.known = known
        # The strings a name may hold: a module-level string constant, or the loop
        # variable of a "for" over literal strings (a list of modules to import).
        self.values: dict[str, list[str]] = {}
        sequences: dict[str, list[str]] = {}
        for node in module.tree.body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        if _str(node.value) is not None:
                            self.values[target.id] = [_str(node.value) or ""]
                        sequences[target.id] = _strs(node.value)
        for node in ast.walk(module.tree):
            if isinstance(node, ast.For | ast.AsyncFor | ast.comprehension) and isinstance(
                node.target, ast.Name
            ):
                it = node.iter
                strings = sequences.get(it.id, []) if isinstance(it, ast.Name) else _strs(it)
                self.values.setdefault(node.target.id, []).extend(strings)
        # Names bound to the socket module, to its I/O functions, and to the gateway
        # package ("import gateway [as g]"), wherever the import is in the module.
        self.socket_names: set[str] = set()
        self.socket_functions: set[str] = set()
        self.core_names: set[str] = set()
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "socket":
                        self.socket_names.add(alias.asname or "socket")
                    if alias.name.split(".")[0] == CORE and (
                        alias.asname is None or alias.name == CORE
                    ):
                        self.core_names.add(alias.asname or CORE)
            elif isinstance(node, ast.ImportFrom) and node.module == "socket" and not node.level:
                self.socket_functions.update(
                    a.asname or a.name for a in node.names if a.name in SOCKET_IO_FUNCTIONS
                )

    def run(self) -> None:
        self._walk(self.m.tree, "module-level")

    def _walk(self, node: ast.AST, context: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Expr) and _str(child.value) is not None:
                continue  # a docstring: documentation may name anything
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    self._visit(stmt, "TYPE_CHECKING")
                for stmt in child.orelse:
                    self._visit(stmt, context)
                continue
            self._visit(child, context)

    def _visit(self, node: ast.AST, context: str) -> None:
        if isinstance(node, ast.Import):
            self._import(node, context)
        elif isinstance(node, ast.ImportFrom):
            self._import_from(node, context)
        elif isinstance(node, ast.Call):
            self._call(node, context)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.match(rf"{PLUGINS}([.:]|$)", node.value):
                self.m.plugin_strings.append((node.lineno, node.value))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in self.core_names
        ):
            self.m.attribute_uses.append((node.lineno, node.attr))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            context = "function-level" if context == "module-level" else context
        self._walk(node, context)

    def _add(self, target: str, name: str | None, line: int, kind: str) -> None:
        self.m.imports.append(Import(self.m.name, target, name, self.m.path, line, kind))

    def _import(self, node: ast.Import, context: str) -> None:
        for alias in node.names:
            self._add(_resolve(alias.name, self.known), None, node.lineno, context)

    def _import_from(self, node: ast.ImportFrom, context: str) -> None:
        base = self._absolute(node.module or "", node.level)
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            if candidate in self.known:
                self._add(candidate, None, node.lineno, context)
            else:
                self._add(_resolve(base, self.known), alias.name, node.lineno, context)

    def _absolute(self, module: str, level: int) -> str:
        if not level:
            return module
        parts = self.m.name.split(".")
        if not self.m.is_package:
            parts.pop()
        parts = parts[: len(parts) - (level - 1)]
        return ".".join([*parts, module] if module else parts)

    def _call(self, node: ast.Call, context: str) -> None:
        func = node.func
        called = (
            func.id
            if isinstance(func, ast.Name)
            else func.attr
            if isinstance(func, ast.Attribute)
            else None
        )
        if called in IMPORTERS:
            keywords = {k.arg: k.value for k in node.keywords}
            first = node.args[0] if node.args else keywords.get("name", keywords.get("module"))
            second = node.args[1] if len(node.args) > 1 else keywords.get("package")
            packages = self._strings(second) if second is not None else []
            kind = f"{called}()" if context != "TYPE_CHECKING" else context
            for name in self._strings(first) if first is not None else []:
                name = name.split(":")[0]
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    for package in packages:
                        parts = package.split(".")
                        parts = parts[: len(parts) - (level - 1)]
                        absolute = ".".join([*parts, name.lstrip(".")])
                        self._add(_resolve(absolute, self.known), None, node.lineno, kind)
                else:
                    self._add(_resolve(name, self.known), None, node.lineno, kind)
        if isinstance(func, ast.Attribute):
            if func.attr in SOCKET_IO_METHODS:
                self.m.io_calls.append((node.lineno, f".{func.attr}()"))
            elif (
                isinstance(func.value, ast.Name)
                and func.value.id in self.socket_names
                and func.attr in SOCKET_IO_FUNCTIONS
            ):
                self.m.io_calls.append((node.lineno, f"socket.{func.attr}()"))
        elif isinstance(func, ast.Name) and func.id in self.socket_functions:
            self.m.io_calls.append((node.lineno, f"socket.{func.id}()"))

    def _strings(self, node: ast.expr) -> list[str]:
        if isinstance(node, ast.Name):
            return self.values.get(node.id, [])
        value = _str(node)
        return [] if value is None else [value]


def _str(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _strs(node: ast.expr) -> list[str]:
    """The strings of a literal tuple, list or set of strings; [] for anything else."""
    if not isinstance(node, ast.Tuple | ast.List | ast.Set):
        return []
    values = [_str(e) for e in node.elts]
    return [v for v in values if v is not None] if None not in values else []


def _literal_all(module: Module) -> list[str] | None:
    """The literal ``__all__`` of a module (with ``+=`` extensions), or None."""
    names: list[str] | None = None
    for node in module.tree.body:
        value: ast.expr | None = None
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        ) or (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "__all__"
        ):
            value, names = node.value, []
        elif (
            isinstance(node, ast.AugAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "__all__"
        ):
            value = node.value
        if value is not None and names is not None:
            names.extend(ast.literal_eval(value))
    return names


# --- the rules --------------------------------------------------------------------


def import_cycles(modules: dict[str, Module]) -> list[str]:
    """Rule 1: each strongly connected set of modules, with the imports that close it."""
    graph: dict[str, dict[str, list[Import]]] = {name: {} for name in modules}
    for module in modules.values():
        for imp in module.imports:
            if imp.target in modules and imp.target != module.name:
                graph[module.name].setdefault(imp.target, []).append(imp)
    out = []
    for component in _strongly_connected(graph):
        members = set(component)
        lines = [f"cycle between {len(component)} modules: {', '.join(component)}"]
        shortest = min(
            (_shortest_cycle(graph, start, members) for start in component),
            key=lambda cycle: (len(cycle), cycle),
        )
        lines.append("  shortest: " + " -> ".join(shortest))
        for source, target in itertools.pairwise(shortest):
            lines.extend(f"    {line}" for line in _statements(graph[source][target]))
        inside = [
            imp
            for source in component
            for target, imports in sorted(graph[source].items())
            if target in members
            for imp in imports
        ]
        if len(component) > SMALL_CYCLE:
            # Too many to list: those written to be hidden are where cycles hide.
            inside = [imp for imp in inside if imp.kind != "module-level"]
            lines.append("  imports inside it in a function, under TYPE_CHECKING or by name:")
        else:
            lines.append("  every import inside it:")
        lines.extend(f"    {line}" for line in _statements(inside))
        out.append("\n".join(lines))
    return out


def _statements(imports: list[Import]) -> list[str]:
    """One line per import statement: ``from m import a, b`` is one import of ``m``."""
    names: dict[tuple[str, int, str, str, str], list[str]] = {}
    for imp in imports:
        key = (imp.path, imp.line, imp.source, imp.target, imp.kind)
        names.setdefault(key, []).extend([imp.name] if imp.name else [])
    return [
        f"{path}:{line} {source} -> {target}"
        + (f" ({', '.join(found)})" if found else "")
        + f" [{kind}]"
        for (path, line, source, target, kind), found in sorted(
            names.items(), key=lambda item: (item[0][0], item[0][1])
        )
    ]


def _strongly_connected(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _shortest_cycle(
    graph: dict[str, dict[str, list[Import]]], start: str, members: set[str]
) -> list[str]:
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ not in members:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if succ not in previous:
                previous[succ] = node
                queue.append(succ)
    raise AssertionError(f"{start} is in a cycle but none returns to it")


def core_imports_plugins(modules: dict[str, Module]) -> list[str]:
    """Rule 2: every import of ``l4gw_plugins`` by ``gateway``, and every string naming
    one of its modules (it can reach an importer in ways the imports above miss)."""
    out = []
    for module in modules.values():
        if not _under(module.name, CORE):
            continue
        imports = [imp for imp in module.imports if _under(imp.target, PLUGINS)]
        out += [str(imp) for imp in imports]
        # A string already reported as the import it feeds is not reported again.
        targets = {imp.target for imp in imports}
        out += [
            f"{module.path}:{line} {module.name} names a plugin module: {text!r}"
            for line, text in module.plugin_strings
            if not any(_under(t, _resolve(text.split(":")[0], set(modules))) for t in targets)
        ]
    return out


def impure_modules(root: Path, modules: dict[str, Module]) -> list[str]:
    """Rule 3: trio imports and socket I/O in the pure modules, and each run-time
    import of theirs that leads to some (with the shortest chain to the nearest)."""
    by_path = {m.path: m for m in modules.values()}
    pure = list(PURE) + [p for p in PURE_OPTIONAL if (root / p).exists()]
    out = [f"{path}: listed as pure but not found" for path in pure if path not in by_path]

    def offences(module: Module) -> list[str]:
        found = [
            f"{imp.where()} imports {imp.target} [{imp.kind}]"
            for imp in module.imports
            if imp.runtime and _under(imp.target, "trio")
        ]
        found += [f"{module.path}:{line} socket I/O: {what}" for line, what in module.io_calls]
        return found

    def nearest(start: str) -> tuple[list[Import], str] | None:
        """Breadth-first over run-time imports: the chain to the nearest offence."""
        via: dict[str, Import | None] = {start: None}
        queue = deque([start])
        while queue:
            name = queue.popleft()
            found = offences(modules[name])
            if found:
                chain: list[Import] = []
                step = via[name]
                while step is not None:
                    chain.append(step)
                    step = via[step.source]
                return list(reversed(chain)), found[0]
            for imp in modules[name].imports:
                if imp.runtime and imp.target in modules and imp.target not in via:
                    via[imp.target] = imp
                    queue.append(imp.target)
        return None

    for path in pure:
        if path not in by_path:
            continue
        module = by_path[path]
        out += [f"{path} (pure): {offence}" for offence in offences(module)]
        statements = {
            (imp.line, imp.target): imp
            for imp in module.imports
            if imp.runtime and imp.target in modules and imp.target != module.name
        }
        for imp in statements.values():
            reached = nearest(imp.target)
            if reached is None:
                continue
            chain, offence = reached
            via = "".join(f", which imports {step.target} ({step.where()})" for step in chain)
            out.append(f"{imp.where()} (pure) imports {imp.target}{via}: {offence}")
    return out


def private_imports_by_plugins(root: Path, modules: dict[str, Module]) -> list[str]:
    """Rule 4: imports of the core outside its declared public namespaces, by the
    built-in plugins, the example plugins and the plugin code in the docs."""
    init = modules.get(CORE)
    public = _literal_all(init) if init is not None else None
    if public is None:
        return ["gateway/__init__.py: no literal __all__ (the plugin API is undeclared)"]
    public_names = frozenset(public)
    known = frozenset(modules)
    plugin_modules = [m for m in modules.values() if _under(m.name, PLUGINS)]
    plugin_modules += _examples(root, known) + _doc_blocks(root, known)
    out = []
    for module in plugin_modules:
        for imp in module.imports:
            if not _allowed(imp.target, imp.name, public_names):
                out.append(str(imp))
        for line, attr in module.attribute_uses:
            if not _allowed(_resolve(f"{CORE}.{attr}", known), attr, public_names):
                out.append(f"{module.path}:{line} {module.name} uses gateway.{attr}")
    return out


def _allowed(target: str, name: str | None, public_names: frozenset[str]) -> bool:
    if not _under(target, CORE):
        return True
    if target == CORE:
        return name is None or name == "*" or name in public_names
    return target in PUBLIC_MODULES or any(_under(target, ns) for ns in PUBLIC_NAMESPACES)


def _examples(root: Path, known: frozenset[str]) -> list[Module]:
    out = []
    folder = root / EXAMPLES
    for path in sorted(_python_files(folder)) if folder.is_dir() else []:
        rel = str(path.relative_to(root))
        out.append(_read_module(rel, rel, path.read_text(), path.name == "__init__.py", known))
    return out


def _doc_blocks(root: Path, known: frozenset[str]) -> list[Module]:
    out = []
    for doc in PLUGIN_DOCS:
        path = root / doc
        if not path.exists():
            continue
        text = path.read_text()
        for match in re.finditer(r"^[ \t]*```python\n(.*?)^[ \t]*```", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 2
            where = f"{doc}:{line}"
            tree = ast.parse(textwrap.dedent(match.group(1)), filename=where)
            ast.increment_lineno(tree, line - 1)
            module = Module(f"{doc} block", doc, tree, False)
            _Collector(module, known).run()
            out.append(module)
    return out


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@dataclass(frozen=True)
class Findings:
    cycles: list[str]
    core_imports_plugins: list[str]
    impure: list[str]
    private_imports: list[str]


def check(root: Path) -> Findings:
    """Every rule over the source tree at ``root`` (holding gateway/ and plugins/)."""
    modules = discover(root)
    return Findings(
        cycles=import_cycles(modules),
        core_imports_plugins=core_imports_plugins(modules),
        impure=impure_modules(root, modules),
        private_imports=private_imports_by_plugins(root, modules),
    )


def report(title: str, found: list[str]) -> str:
    return f"{title} ({len(found)}):\n" + "\n".join(found)


@cache
def source() -> Findings:
    return check(ROOT)


# --- the rules over this tree --------------------------------------------------------


def test_no_import_cycle() -> None:
    found = source().cycles
    assert not found, report("import cycles", found)


def test_gateway_never_imports_plugins() -> None:
    found = source().core_imports_plugins
    assert not found, report("gateway imports l4gw_plugins", found)


def test_pure_modules_do_no_io() -> None:
    found = source().impure
    assert not found, report("trio or socket I/O in a pure module", found)


def test_plugins_import_only_public_namespaces() -> None:
    found = source().private_imports
    assert not found, report("plugins importing private modules of gateway", found)


def test_engine_sees_the_tree() -> None:
    """The rules read what they should: a rename must not empty them silently."""
    modules = discover(ROOT)
    files = [*_python_files(ROOT / "gateway"), *_python_files(ROOT / "plugins")]
    assert len(modules) == len(files)
    assert {"gateway", "gateway.flow", "gateway.server", "l4gw_plugins"} <= set(modules)
    assert "hookimpl" in (_literal_all(modules["gateway"]) or [])


def test_how_imports_are_counted(tmp_path: Path) -> None:
    for rel, text in {
        "gateway/__init__.py": "from gateway.a import A\n__all__ = ['A']\n",
        "gateway/a.py": """
            from __future__ import annotations
            import importlib
            import gateway.b
            from typing import TYPE_CHECKING
            from gateway import c, hookimpl
            from . import b as _b
            from .pkg.d import D
            if TYPE_CHECKING:
                from gateway.b import B
            else:
                import gateway.c
            A = 1
            def f() -> None:
                import gateway.pkg
                for name in ("gateway.b", "gateway.c"):
                    __import__(name)
            class K:
                def g(self) -> object:
                    return importlib.import_module(".d", "gateway.pkg")
        """,
        "gateway/b.py": "",
        "gateway/c.py": "",
        "gateway/pkg/__init__.py": "",
        "gateway/pkg/d.py": "D = 1\n",
        "plugins/__init__.py": "",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    module = discover(tmp_path)["gateway.a"]
    got = [(i.line, i.target, i.name, i.kind) for i in module.imports if _under(i.target, CORE)]
    assert got == [
        (4, "gateway.b", None, "module-level"),
        (6, "gateway.c", None, "module-level"),
        (6, "gateway", "hookimpl", "module-level"),
        (7, "gateway.b", None, "module-level"),
        (8, "gateway.pkg.d", "D", "module-level"),
        (10, "gateway.b", "B", "TYPE_CHECKING"),
        (12, "gateway.c", None, "module-level"),
        (15, "gateway.pkg", None, "function-level"),
        (17, "gateway.b", None, "__import__()"),
        (17, "gateway.c", None, "__import__()"),
        (20, "gateway.pkg.d", None, "import_module()"),
    ]


# --- each rule fails on a seeded violation --------------------------------------------


def _copy_tree(dest: Path) -> Path:
    for folder in [*PACKAGES, EXAMPLES]:
        shutil.copytree(
            ROOT / folder,
            dest / folder,
            ignore=lambda d, names: [
                n
                for n in names
                if n in _SKIP_DIRS or not (n.endswith(".py") or Path(d, n).is_dir())
            ],
        )
    for doc in PLUGIN_DOCS:
        (dest / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, dest / doc)
    return dest


def _seed(root: Path, rel: str, code: str) -> int:
    """Append ``code`` to ``rel``; the line number its last line lands on."""
    path = root / rel
    text = path.read_text()
    path.write_text(text + "\n\n" + textwrap.dedent(code).strip() + "\n")
    return len(path.read_text().splitlines())


SEEDED_CYCLES = {
    "function-level": """
        def _seeded() -> object:
            from gateway.server import Gateway
            return Gateway
    """,
    "TYPE_CHECKING": """
        if TYPE_CHECKING:
            from gateway.server import Gateway
    """,
    "importlib": """
        def _seeded() -> object:
            import importlib
            return importlib.import_module("gateway.server")
    """,
    "__import__ of a constant": """
        _SERVER = "gateway.server"
        def _seeded() -> object:
            return __import__(_SERVER)
    """,
    "__import__ in a loop": """
        def _seeded() -> None:
            for module in ("gateway.linux", "gateway.server"):
                __import__(module, fromlist=["register"])
    """,
}


@pytest.mark.parametrize("form", list(SEEDED_CYCLES))
def test_seeded_cycle_is_reported(tmp_path: Path, form: str) -> None:
    root = _copy_tree(tmp_path)
    before = check(root).cycles
    line = _seed(root, "gateway/flow.py", SEEDED_CYCLES[form])
    after = check(root).cycles
    seeded = [c for c in after if "gateway.flow -> gateway.server" in c]
    assert seeded, report("cycles after the seed", after)
    cycle = seeded[0]
    assert "gateway.flow" in cycle.splitlines()[0]
    assert "gateway.server" in cycle.splitlines()[0]
    # The report points at the seeded import.
    assert any(f"gateway/flow.py:{n} " in cycle for n in range(line - 3, line + 1)), cycle
    assert not any("gateway.flow -> gateway.server" in c for c in before)


SEEDED_PLUGIN_IMPORTS = {
    "module-level": "import l4gw_plugins.routing",
    "from": "from l4gw_plugins import relay",
    "TYPE_CHECKING": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from l4gw_plugins.relay import plugin
    """,
    "importlib": """
        import importlib
        def _seeded() -> object:
            return importlib.import_module("l4gw_plugins.relay")
    """,
    "importlib, relative": """
        import importlib
        def _seeded() -> object:
            return importlib.import_module(".relay", "l4gw_plugins")
    """,
    "a string in a table": """
        import importlib
        _WHERE = {"relay": "l4gw_plugins.relay"}
        def _seeded() -> object:
            return importlib.import_module(_WHERE["relay"])
    """,
    "resolve_name": """
        import pkgutil
        _PLUGIN = "l4gw_plugins.routing:plugin"
        def _seeded() -> object:
            return pkgutil.resolve_name(_PLUGIN)
    """,
}


@pytest.mark.parametrize("form", list(SEEDED_PLUGIN_IMPORTS))
def test_seeded_core_import_of_plugins_is_reported(tmp_path: Path, form: str) -> None:
    root = _copy_tree(tmp_path)
    before = check(root).core_imports_plugins
    line = _seed(root, "gateway/schema.py", SEEDED_PLUGIN_IMPORTS[form])
    after = check(root).core_imports_plugins
    new = [f for f in after if f not in before]
    assert len(new) == 1, report("gateway -> l4gw_plugins after the seed", after)
    assert new[0].startswith("gateway/schema.py:"), new[0]
    assert int(new[0].split(":")[1].split()[0]) in range(line - 3, line + 1), new[0]
    assert "gateway.schema -> l4gw_plugins" in new[0] or "names a plugin module" in new[0]


SEEDED_IMPURE = {
    "import trio": ("gateway/clienthello.py", "import trio", "imports trio"),
    "trio in a function": (
        "gateway/redact.py",
        """
        def _seeded() -> None:
            from trio.lowlevel import checkpoint
            del checkpoint
        """,
        "imports trio.lowlevel",
    ),
    "recv": (
        "gateway/proxy_protocol.py",
        """
        def _seeded(sock: object) -> object:
            return sock.recv(1)  # type: ignore[attr-defined]
        """,
        "socket I/O: .recv()",
    ),
    "socket.socket": (
        "gateway/linux.py",
        "_SEEDED = socket.socket(socket.AF_INET, socket.SOCK_STREAM)",
        "socket I/O: socket.socket()",
    ),
    "through an import": (
        "gateway/identity.py",
        """
        def _seeded() -> object:
            from gateway import upstream
            return upstream
        """,
        "imports gateway.upstream",
    ),
}


@pytest.mark.parametrize("form", list(SEEDED_IMPURE))
def test_seeded_impurity_is_reported(tmp_path: Path, form: str) -> None:
    rel, code, expected = SEEDED_IMPURE[form]
    root = _copy_tree(tmp_path)
    before = check(root).impure
    _seed(root, rel, code)
    new = [f for f in check(root).impure if f not in before]
    assert any(f.startswith(rel) and "(pure)" in f and expected in f for f in new), report(
        "new impurity findings", new
    )


SEEDED_PRIVATE = {
    "private module": ("plugins/routing.py", "from gateway.config import Config", "gateway.config"),
    "private module by name": (
        "plugins/health.py",
        "from gateway import plugin_manager",
        "gateway.plugin_manager",
    ),
    "name outside __all__": (
        "plugins/balance.py",
        "from gateway import Endpoint as _E, load_plugins_seeded",
        "(load_plugins_seeded)",
    ),
    "attribute of gateway": (
        "plugins/accesslog.py",
        """
        import gateway
        _SEEDED = gateway.flow
        """,
        "uses gateway.flow",
    ),
    "in a function": (
        "plugins/ratelimit/shaping.py",
        """
        def _seeded() -> object:
            from gateway.connection import handle
            return handle
        """,
        "gateway.connection",
    ),
    "example plugin": (
        "examples/plugin-geo-deny/l4gw_geo_deny/__init__.py",
        "from gateway.flow import KERNEL_TIERS",
        "gateway.flow",
    ),
}


@pytest.mark.parametrize("form", list(SEEDED_PRIVATE))
def test_seeded_private_import_by_a_plugin_is_reported(tmp_path: Path, form: str) -> None:
    rel, code, expected = SEEDED_PRIVATE[form]
    root = _copy_tree(tmp_path)
    before = check(root).private_imports
    _seed(root, rel, code)
    new = [f for f in check(root).private_imports if f not in before]
    assert any(f.startswith(f"{rel}:") and expected in f for f in new), report(
        "new private imports", new
    )


def test_public_imports_by_a_plugin_pass(tmp_path: Path) -> None:
    """What a plugin may import is not reported."""
    root = _copy_tree(tmp_path)
    before = check(root).private_imports
    _seed(
        root,
        "plugins/routing.py",
        """
        import gateway
        from gateway import hookimpl as _h, schema as _s
        from gateway.schema import Field as _F
        from gateway.relay import copy as _copy
        from gateway.telemetry.records import SpanRecord as _R
        _SEEDED = gateway.hookimpl
        """,
    )
    assert check(root).private_imports == before
