"""The package's import graph has no cycles, and its imports sit at the top of each module.

Every `import` statement of every module of rag_jax/ counts, function-level ones included: a
module that imports another "directly or through others" may not be imported back by it.
"""
import ast
import pathlib

from tests.conftest import ROOT

PACKAGE = ROOT / 'rag_jax'
# Dependencies a module may import inside a function because the package runs without them.
# Imported where they are used: config.wandb's logger (rag_jax/metrics.py), an extra; TFDS and
# the package's TFDS builder (rag_jax/data/text_files.py), which only TFDS datasets need: a corpus
# of prepared token arrays is read on a machine without them.
OPTIONAL = frozenset({'wandb', 'tensorflow_datasets', 'rag_jax.data.text_files'})


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def _imports(tree: ast.AST, modules) -> set[str]:
  """The rag_jax modules a module's import statements name (`from a import b`: a.b when that is
  a module, else a)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        full = f'{node.module}.{a.name}'
        names.add(full if full in modules else node.module)
  return {n for n in names if n in modules}


def import_graph() -> dict[str, set[str]]:
  """module -> the rag_jax modules it imports. Importing a.b.c also runs the packages a and a.b,
  except those the importer is itself inside (a package is initialised before its modules)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    edges = set()
    own = {'.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 1)}
    for target in _imports(ast.parse(path.read_text()), modules):
      parts = target.split('.')
      edges.update(p for p in ('.'.join(parts[:i]) for i in range(1, len(parts)))
                   if p in modules and p not in own)
      edges.add(target)
    edges.discard(name)
    graph[name] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_function_level_imports_count():
  modules = _modules()
  tree = ast.parse('def load():\n  from rag_jax import train\n  import rag_jax.models.gpt\n')
  assert _imports(tree, modules) == {'rag_jax.train', 'rag_jax.models.gpt'}


def test_the_cycle_finder_finds_cycles():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert cycles({'a': {'b'}, 'b': set()}) == []


def test_no_module_imports_one_that_imports_it_back():
  graph = import_graph()
  assert 'rag_jax.runs' in graph['rag_jax.train'] and 'rag_jax.runs' in graph['rag_jax.sample']
  assert cycles(graph) == []


def test_imports_are_at_the_top():
  """No import inside a function or class, except of an optional dependency."""
  late = []
  for name, path in _modules().items():
    tree = ast.parse(path.read_text())
    for scope in ast.walk(tree):
      if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        continue
      for node in ast.walk(scope):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          what = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
          names = ({f'{what}.{a.name}' for a in node.names} if isinstance(node, ast.ImportFrom)
                   else {what})
          if what.split('.')[0] not in OPTIONAL and not names <= OPTIONAL:
            late.append(f'{name}:{node.lineno} imports {what}')
  assert not late, late


def test_no_function_is_longer_than_80_lines():
  """Files of one idea, functions one can read in a glance (docs/design.md)."""
  long = []
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if node.end_lineno - node.lineno + 1 > 80:
          long.append(f'{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines')
  assert not long, long
