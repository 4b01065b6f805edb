"""The package's layout holds: no import cycle (function-level imports included, so none can
hide one), the transform needs no bank, no module over 500 lines, and the adapter kinds'
names stay in their own modules."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "lora_jax"
MAX_LINES = 500
# Where the DoRA kind may be named: its module, the registry's list of built-in kinds, and
# the package namespace that imports (so registers) it.
DORA_AT = {"dora.py", "kinds.py", "__init__.py"}


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in sorted(ROOT.rglob("*.py")):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


MODULES = _modules()


def _imported(name: str, path: pathlib.Path) -> set[str]:
  """The lora_jax modules ``name`` imports anywhere in its source (its package's
  ``__init__`` counts for ``from pkg import module``)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      wanted = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                for a in node.names]
    else:
      continue
    for target in wanted:
      while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
      if target in MODULES and target != name and target != "lora_jax":
        out.add(target)
  return out


GRAPH = {name: _imported(name, path) for name, path in MODULES.items()}


def _cycles(graph) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan's algorithm)."""
  index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return found


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle():
  assert len(GRAPH) > 30 and sum(map(len, GRAPH.values())) > 100  # the walk sees the package
  assert _cycles(GRAPH) == []


def test_the_transform_imports_no_bank():
  assert "lora_jax.bank" not in GRAPH["lora_jax.transform"]
  assert not any(m.startswith("lora_jax.bank") for m in GRAPH["lora_jax.transform"])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_500_lines(name):
  lines = len(MODULES[name].read_text().splitlines())
  assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines"


def test_dora_is_named_only_in_its_own_module():
  named = sorted(str(p.relative_to(ROOT)) for p in MODULES.values()
                 if re.search("dora", p.read_text(), re.IGNORECASE))
  assert set(named) <= DORA_AT, named
  assert "dora.py" in named


def test_the_interpreter_names_no_primitive():
  """``_interpret`` is a table-driven evaluator: no primitive name appears in its code (the
  rules tables hold them, the higher-order rules and the adapted product's ``FrameRule``
  included)."""
  from lora_jax import _rules

  primitives = set(_rules.Apply.rules) | set(_rules.Analyze.rules)
  assert {"dot_general", "scan", "jit", "gather"} <= primitives
  tree = ast.parse(MODULES["lora_jax._interpret"].read_text())
  docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
  named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
           and isinstance(n.value, str) and id(n) not in docstrings} & primitives
  assert named == set(), named


def test_test_modules_import_none_of_each_other_and_mirror_the_layout():
  """Shared pieces live in tests/_fixtures.py and tests/_utils.py, never in a test module;
  every test module sits in one of the layout's folders under a name no other one has."""
  tests = ROOT.parent / "tests"
  found = sorted(tests.rglob("test_*.py"))
  assert {p.parent.name for p in found} == {"core", "models", "app", "interop", "docs"}
  assert len({p.name for p in found}) == len(found)
  names = {p.stem for p in found}
  for path in [*found, *tests.glob("_*.py")]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        imported.add(node.module.split(".")[0])
    assert not imported & names, (path.name, imported & names)
