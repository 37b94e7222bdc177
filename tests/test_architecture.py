"""The architecture rules of DESIGN.md section 2, checked on the source with ``ast``.

Every module under ``stillsvc/`` is parsed (nothing is imported) and every import
statement in it is collected: at module level, inside functions and classes, and
inside ``if TYPE_CHECKING:`` blocks. Names are resolved to modules: relative
imports against the importing module's package, and ``from stillsvc.core import
config`` to the module ``stillsvc.core.config`` (a name that is not a module
resolves to the package it comes from).

The rules:

* **layers** — ``stillsvc.core``, ``stillsvc.common``, ``stillsvc.imaging`` and
  ``stillsvc.driver`` import no transport library (:data:`TRANSPORTS`) and none of
  ``stillsvc.frontends``, ``stillsvc.client``, ``stillsvc.ctl``, ``stillsvc.daemon``
  — except the driver API's transport helpers (:data:`TRANSPORT_HELPERS`:
  ``stillsvc.driver.usb`` uses pyusb), which the other layers never import;
* **frontends** — a module of ``stillsvc.frontends.<x>`` imports no other front-end
  ``stillsvc.frontends.<y>``, nor ``stillsvc.ctl`` or ``stillsvc.client``;
* **drivers** — a module of ``stillsvc.drivers.<x>`` imports nothing of stillsvc
  but ``stillsvc.driver``, ``stillsvc.common``, ``stillsvc.imaging`` and its own
  ``stillsvc.drivers.<x>`` (an allow-list: the core, the front-ends, another driver,
  the driver registry ``stillsvc.drivers`` itself, ... are all refused);
* **client** — ``stillsvc.client`` imports nothing of stillsvc but
  ``stillsvc.common`` (and itself);
* **cycles** — no import cycle among stillsvc's modules.

Which imports count:

* For the four layering rules **every** import counts, ``TYPE_CHECKING`` ones
  included: a front-end that names another front-end's class in an annotation, or
  a core module that types a parameter with a D-Bus class, depends on it all the
  same — the code is written against it, and it breaks when that one changes.
  (Today the core's ``TYPE_CHECKING`` imports are all core→core, which the rules
  allow anyway.) Imports inside functions count too: they run.
* For **cycles**, ``TYPE_CHECKING`` imports do not count: they never execute, and
  a type-only back-reference (``sessions`` naming ``Device`` in an annotation) is
  the accepted way to type two classes that know each other. Imports inside
  functions do count: a deferred import that closes a loop is a cycle put off,
  not removed. The implicit import of a module's parent packages is not an edge.

The checker is plain functions over a source tree, so the second half of this file
runs it on a synthetic tree with one planted violation of each kind.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "stillsvc"

#: Top-level modules that carry a transport: a bus, a socket, HTTP, USB, SANE, mDNS.
TRANSPORTS = frozenset({
    "dbus_fast", "dbus", "dbus_next", "socket", "aiohttp", "pyudev", "usb", "sane", "zeroconf", "ssl", "http",
})
LAYERS = ("stillsvc.core", "stillsvc.common", "stillsvc.imaging", "stillsvc.driver")
#: The driver API's transport helpers, which drivers share: each may use its own one
#: transport library and nothing else of TRANSPORTS; the core, common and imaging use none of them.
TRANSPORT_HELPERS: dict[str, frozenset[str]] = {
    "stillsvc.driver.usb": frozenset({"usb"}),
    "stillsvc.driver.sane": frozenset(),
    "stillsvc.driver.serialport": frozenset(),
}
NOT_FOR_LAYERS = ("stillsvc.frontends", "stillsvc.client", "stillsvc.ctl", "stillsvc.daemon")
FOR_DRIVERS = ("stillsvc.driver", "stillsvc.common", "stillsvc.imaging")
FOR_CLIENT = ("stillsvc.common",)

#: Known violations of the driver rule, as (importing module, imported module), each
#: with the reason. A known one is left out of the driver test and becomes its own
#: xfail(strict=True) test, which fails the day it is fixed (then remove it here).
#: Empty now: the simulator imported stillsvc.core.items until its item types moved
#: to the minidriver API (stillsvc.driver.items).
KNOWN_DRIVER_VIOLATIONS: dict[tuple[str, str], str] = {}


# -- the checker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module, resolved (for an outside library: as written)
    line: int
    text: str  # the statement, for messages
    type_checking: bool
    in_function: bool

    def where(self) -> str:
        flags = [f for f, on in (("TYPE_CHECKING", self.type_checking), ("in a function", self.in_function)) if on]
        return f"{self.module}:{self.line}: {self.text}" + (f" ({', '.join(flags)})" if flags else "")


@dataclass(frozen=True)
class Violation:
    rule: str
    module: str
    target: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def find_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``root`` (the directory holding the package)."""
    modules: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(not p.isidentifier() for p in parts):
            continue
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.imports: list[Import] = []
        self._type_checking = 0
        self._function = 0

    def _known(self, name: str) -> str:
        """``name`` itself if it is one of our modules, else its longest prefix that is."""
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in self.modules:
                return candidate
        return name

    def _add(self, node: ast.stmt, target: str) -> None:
        if within(target, PACKAGE):
            target = self._known(target)
        if any(i.target == target and i.line == node.lineno for i in self.imports):
            return  # from x import a, b: one import of x
        self.imports.append(Import(self.module, target, node.lineno, ast.unparse(node),
                                   self._type_checking > 0, self._function > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".") if self.package else []
            if node.level - 1 > len(parts) - 1:
                raise ValueError(f"{self.module}:{node.lineno}: relative import beyond the top-level package")
            base_parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base == "__future__":
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(node, submodule if alias.name != "*" and submodule in self.modules else base)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._type_checking += 1
            for child in node.body:
                self.visit(child)
            self._type_checking -= 1
            for child in node.orelse:  # the else branch is what runs
                self.visit(child)
        else:
            self.generic_visit(node)

    def _visit_function(self, node: ast.AST) -> None:
        self._function += 1
        self.generic_visit(node)
        self._function -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function


def collect_imports(modules: dict[str, Path]) -> list[Import]:
    imports: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        collector = _Collector(name, path.name == "__init__.py", modules)
        collector.visit(tree)
        imports += collector.imports
    return imports


def _subpackage(name: str, parent: str) -> str | None:
    """``stillsvc.frontends.dbus`` for ``stillsvc.frontends.dbus.bus`` in ``stillsvc.frontends``."""
    if not name.startswith(parent + "."):
        return None
    return parent + "." + name[len(parent) + 1:].split(".")[0]


def layering_violations(imports: Iterable[Import]) -> list[Violation]:
    found: list[Violation] = []

    def add(rule: str, imp: Import, why: str) -> None:
        found.append(Violation(rule, imp.module, imp.target, f"{imp.where()}: {why}"))

    for imp in imports:
        internal = within(imp.target, PACKAGE)
        top = imp.target.split(".")[0]
        layer = next((layer for layer in LAYERS if within(imp.module, layer)), None)
        if layer is not None:
            helper = next((h for h in TRANSPORT_HELPERS if within(imp.module, h)), None)
            if top in TRANSPORTS and (helper is None or top not in TRANSPORT_HELPERS[helper]):
                add("layers", imp, f"{layer} must not use a transport library ({top})")
            elif layer != "stillsvc.driver" and any(within(imp.target, h) for h in TRANSPORT_HELPERS):
                add("layers", imp, f"{layer} must not import a driver transport ({imp.target})")
            elif any(within(imp.target, p) for p in NOT_FOR_LAYERS):
                add("layers", imp, f"{layer} must not import {imp.target}")
        frontend = _subpackage(imp.module, "stillsvc.frontends")
        if frontend is not None and internal:
            other = _subpackage(imp.target, "stillsvc.frontends")
            if other is not None and other != frontend:
                add("frontends", imp, f"front-end {frontend} must not import another front-end ({other})")
            elif within(imp.target, "stillsvc.ctl") or within(imp.target, "stillsvc.client"):
                add("frontends", imp, f"front-end {frontend} must not import {imp.target}")
        driver = _subpackage(imp.module, "stillsvc.drivers")
        if driver is not None and internal:
            allowed = (*FOR_DRIVERS, driver)
            if not any(within(imp.target, p) for p in allowed):
                add("drivers", imp, f"driver {driver} may import only {', '.join(allowed)}")
        if (within(imp.module, "stillsvc.client") and internal
                and not any(within(imp.target, p) for p in (*FOR_CLIENT, "stillsvc.client"))):
            add("client", imp, "stillsvc.client may import only stillsvc.common")
    return found


def import_graph(imports: Iterable[Import], modules: Iterable[str]) -> dict[str, dict[str, Import]]:
    """Edges among our modules that run: every import but the TYPE_CHECKING ones."""
    known = set(modules)
    graph: dict[str, dict[str, Import]] = {name: {} for name in sorted(known)}
    for imp in imports:
        if imp.type_checking or imp.target not in known:
            continue
        graph[imp.module].setdefault(imp.target, imp)
    return graph


def _components(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = 0
    for start, edges in graph.items():
        if start in index:
            continue
        work = [(start, iter(sorted(edges)))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
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
                    result.append(sorted(component))
    return result


def _cycle_in(component: list[str], graph: dict[str, dict[str, Import]]) -> list[str]:
    """One cycle through the component's first module (a shortest one, by BFS)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    queue = [start]
    for node in queue:
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle in component {component}")  # pragma: no cover


def import_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    cycles = []
    for component in _components(graph):
        if len(component) > 1 or component[0] in graph[component[0]]:
            cycles.append(_cycle_in(component, graph))
    return sorted(cycles)


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, Import]]) -> str:
    steps = [graph[a][b].where() for a, b in itertools.pairwise(cycle)]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def check(root: Path) -> tuple[list[Violation], list[str]]:
    """Everything wrong under ``root``: the layering violations and the cycles (described)."""
    modules = find_modules(root)
    imports = collect_imports(modules)
    graph = import_graph(imports, modules)
    return layering_violations(imports), [describe_cycle(c, graph) for c in import_cycles(graph)]


# -- the rules on stillsvc itself ------------------------------------------------------------


@pytest.fixture(scope="module")
def source() -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(REPO)
    return modules, collect_imports(modules)


def _violations(source: tuple[dict[str, Path], list[Import]], rule: str) -> list[Violation]:
    return [v for v in layering_violations(source[1]) if v.rule == rule]


def _report(violations: Iterable[Violation]) -> str:
    return "\n".join(str(v) for v in violations)


def test_the_checker_sees_the_whole_package(source):
    """The checker found the package and its imports (so that the rules below cannot
    pass by looking at nothing). What the resolution does in detail is checked on the
    synthetic tree at the end."""
    modules, imports = source
    for name in ("stillsvc", "stillsvc.core", "stillsvc.core.locks", "stillsvc.driver", "stillsvc.drivers.sim",
                 "stillsvc.frontends.dbus", "stillsvc.daemon"):
        assert name in modules, f"{name} not found under {REPO / PACKAGE}"
    edges = {(i.module, i.target) for i in imports}
    assert any(within(a, "stillsvc.core") and b == "stillsvc.core.locks" for a, b in edges)
    assert any(a == "stillsvc.daemon" and within(b, "stillsvc.core") for a, b in edges)
    assert any(within(a, "stillsvc.drivers.sim") and within(b, "stillsvc.driver") for a, b in edges)
    assert any(i.type_checking for i in imports) and any(i.in_function for i in imports)
    assert any(not within(i.target, PACKAGE) for i in imports)  # outside libraries are seen too


def test_core_common_imaging_and_driver_api_know_no_transport_and_no_frontend(source):
    found = _violations(source, "layers")
    assert not found, "\n" + _report(found)


def test_frontends_do_not_import_each_other_nor_the_clients(source):
    found = _violations(source, "frontends")
    assert not found, "\n" + _report(found)


def test_client_library_imports_only_common(source):
    found = _violations(source, "client")
    assert not found, "\n" + _report(found)


def test_drivers_import_only_the_driver_api_common_and_imaging__apart_from_known_exceptions(source):
    found = [v for v in _violations(source, "drivers") if (v.module, v.target) not in KNOWN_DRIVER_VIOLATIONS]
    assert not found, "\n" + _report(found)


if KNOWN_DRIVER_VIOLATIONS:
    @pytest.mark.parametrize("module,target", [
        pytest.param(module, target, marks=pytest.mark.xfail(strict=True, reason=reason))
        for (module, target), reason in sorted(KNOWN_DRIVER_VIOLATIONS.items())
    ])
    def test_known_driver_exception_is_fixed(source, module, target):
        found = [v for v in _violations(source, "drivers") if (v.module, v.target) == (module, target)]
        assert not found, "\n" + _report(found)


def test_no_import_cycles(source):
    modules, imports = source
    graph = import_graph(imports, modules)
    assert sum(len(edges) for edges in graph.values()) > 20  # the graph was built
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(c, graph) for c in cycles)


# -- the checker on planted violations ----------------------------------------------------------

PLANTED = {
    "__init__.py": "",
    "daemon.py": "",
    "common/__init__.py": "",
    "common/names.py": "",
    # layers: a transport in core, common, imaging and the driver API
    "core/__init__.py": "",
    "core/config.py": "",
    "core/bad.py": "import socket\n",
    "common/bus.py": "from dbus_fast.aio import MessageBus\n",
    "imaging/__init__.py": "def encode():\n    import http.client\n",
    "driver/__init__.py": "from stillsvc.core import config\nimport usb.core\n",
    # layers: the core importing a front-end (type-only), the daemon (in a function), ctl (relative)
    "core/typed.py": ("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from stillsvc.frontends.a import m\n"),
    "core/lazy.py": "def f():\n    from stillsvc import daemon\n",
    "core/rel.py": "from ..ctl import main\nfrom ..common import names\nfrom . import config\n",
    "ctl/__init__.py": "",
    "ctl/main.py": "",
    # front-ends
    "frontends/__init__.py": "",
    "frontends/a/__init__.py": "",
    "frontends/a/m.py": "from stillsvc.frontends.b import n\n",
    "frontends/a/t.py": ("import typing\n"
                         "if typing.TYPE_CHECKING:\n    from ..b.n import Thing\n"
                         "else:\n    from stillsvc.client import api\n"),
    "frontends/a/ok.py": ("from . import m\nfrom .m import x\nfrom stillsvc.core import config\n"
                          "from stillsvc.common.names import NAME\nimport dbus_fast\nfrom stillsvc import frontends\n"),
    "frontends/b/__init__.py": "",
    "frontends/b/n.py": "import stillsvc.ctl.main\n",
    # drivers
    "drivers/__init__.py": "from stillsvc.drivers.x import Driver\n",
    "drivers/x/__init__.py": "from stillsvc.core import config\n",
    "drivers/x/y.py": "from stillsvc.drivers.z import helper\nfrom stillsvc.drivers import discover\n",
    "drivers/x/f.py": "class D:\n    def go(self):\n        from stillsvc.frontends.a.m import thing\n",
    "drivers/x/ok.py": ("from stillsvc.driver import Minidriver\nfrom stillsvc.common import names\n"
                        "from stillsvc.imaging import encode\nfrom .y import q\nfrom . import f\nimport usb\n"),
    "drivers/z/__init__.py": "",
    "drivers/z/helper.py": "",
    # client
    "client/__init__.py": "from stillsvc.core.config import Config\n",
    "client/ok.py": "from stillsvc.common import names\nfrom . import api\nimport dbus_fast\n",
    "client/api.py": "",
    # a cycle a -> b -> c -> a, closed by an import in a function
    "cyc/__init__.py": "",
    "cyc/a.py": "from stillsvc.cyc import b\n",
    "cyc/b.py": "import stillsvc.cyc.c\n",
    "cyc/c.py": "def later():\n    from .a import x\n",
    # a self-import
    "cyc/selfish.py": "from stillsvc.cyc import selfish\n",
    # no cycle: the way back is TYPE_CHECKING only
    "tc/__init__.py": "",
    "tc/p.py": "from stillsvc.tc.q import Q\n",
    "tc/q.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stillsvc.tc.p import P\n",
}

EXPECTED = {
    ("layers", "stillsvc.core.bad", "socket"),
    ("layers", "stillsvc.common.bus", "dbus_fast.aio"),
    ("layers", "stillsvc.imaging", "http.client"),
    ("layers", "stillsvc.driver", "usb.core"),
    ("layers", "stillsvc.core.typed", "stillsvc.frontends.a.m"),
    ("layers", "stillsvc.core.lazy", "stillsvc.daemon"),
    ("layers", "stillsvc.core.rel", "stillsvc.ctl.main"),
    ("frontends", "stillsvc.frontends.a.m", "stillsvc.frontends.b.n"),
    ("frontends", "stillsvc.frontends.a.t", "stillsvc.frontends.b.n"),
    ("frontends", "stillsvc.frontends.a.t", "stillsvc.client.api"),
    ("frontends", "stillsvc.frontends.b.n", "stillsvc.ctl.main"),
    ("drivers", "stillsvc.drivers.x", "stillsvc.core.config"),
    ("drivers", "stillsvc.drivers.x.y", "stillsvc.drivers.z.helper"),
    ("drivers", "stillsvc.drivers.x.y", "stillsvc.drivers"),
    ("drivers", "stillsvc.drivers.x.f", "stillsvc.frontends.a.m"),
    ("client", "stillsvc.client", "stillsvc.core.config"),
}


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    for name, text in PLANTED.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_reports_each_planted_violation_and_nothing_else(planted):
    violations, _cycles = check(planted)
    found = {(v.rule, v.module, v.target) for v in violations}
    assert found == EXPECTED, (f"missed: {sorted(EXPECTED - found)}\n"
                               f"reported wrongly: {sorted(found - EXPECTED)}")
    # Each report names the module, the line and the import as written.
    by_key = {(v.rule, v.module, v.target): v.message for v in violations}
    assert by_key[("layers", "stillsvc.core.lazy", "stillsvc.daemon")].startswith(
        "stillsvc.core.lazy:2: from stillsvc import daemon (in a function)")
    assert by_key[("frontends", "stillsvc.frontends.a.t", "stillsvc.frontends.b.n")].startswith(
        "stillsvc.frontends.a.t:3: from ..b.n import Thing (TYPE_CHECKING)")


def test_checker_reports_the_cycle_path_and_ignores_type_checking_back_references(planted):
    _violations, cycles = check(planted)
    assert len(cycles) == 2, "\n".join(cycles)
    long_cycle = next(c for c in cycles if "cyc.a" in c)
    assert long_cycle.splitlines()[0] == "stillsvc.cyc.a -> stillsvc.cyc.b -> stillsvc.cyc.c -> stillsvc.cyc.a"
    assert "stillsvc.cyc.c:2: from .a import x (in a function)" in long_cycle
    assert any(c.splitlines()[0] == "stillsvc.cyc.selfish -> stillsvc.cyc.selfish" for c in cycles)
    assert not any("stillsvc.tc" in c for c in cycles)


def test_checker_resolves_names_to_modules(planted):
    modules = find_modules(planted)
    targets = {(i.module, i.target) for i in collect_imports(modules)}
    assert ("stillsvc.driver", "stillsvc.core.config") in targets  # from stillsvc.core import config
    assert ("stillsvc.core.rel", "stillsvc.common.names") in targets  # from ..common import names
    assert ("stillsvc.core.rel", "stillsvc.core.config") in targets  # from . import config
    assert ("stillsvc.frontends.a.ok", "stillsvc.frontends.a.m") in targets  # from .m import x
    assert ("stillsvc.frontends.a.ok", "stillsvc.common.names") in targets  # NAME is not a module
    assert ("stillsvc.drivers", "stillsvc.drivers.x") in targets  # Driver is not a module
    assert ("stillsvc.drivers.x.ok", "stillsvc.drivers.x.f") in targets  # from . import f, in x's package
    assert ("stillsvc.cyc.b", "stillsvc.cyc.c") in targets  # import stillsvc.cyc.c
