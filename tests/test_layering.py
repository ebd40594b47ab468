"""Imports flow one way: each module of resnet_flax imports only from its own layer or the layers below.

Every import counts: at module level, inside functions, under `if TYPE_CHECKING:`, and module names written
as strings (what `importlib.import_module` is given: the data sources' registry). Read from the source with
`ast`, so nothing is imported and nothing is missed by lazy imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'resnet_flax'

# Top to bottom. A module belongs to the layer of its longest prefix here; the package root
# (`resnet_flax/__init__.py`, which holds `resnet_flax.load`) sits with the Python API it calls.
LAYERS = (
  ('resnet_flax.cli', 'resnet_flax.sweep', 'resnet_flax.explain.command', 'resnet_flax.serve'),  # Commands.
  ('resnet_flax', 'resnet_flax.deploy'),  # The Python API, predict, export.
  ('resnet_flax.explain',),  # Grad-CAM and integrated gradients of a restored model.
  ('resnet_flax.evaluate',),
  ('resnet_flax.train',),
  ('resnet_flax.robust', 'resnet_flax.compress'),
  ('resnet_flax.step_extensions',),  # The protocol every step extension implements, below them all.
  ('resnet_flax.optim',),
  ('resnet_flax.models',),  # With `models.trained`: a run rebuilt from its workdir.
  ('resnet_flax.data',),
  ('resnet_flax.run', 'resnet_flax.errors', 'resnet_flax.config_fields'),  # The run contract; errors; field rules.
)
MODULE_STRING = re.compile(r'resnet_flax(\.\w+)+')


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_names(module: str, source: str, is_package: bool) -> set[str]:
  """Every dotted name `source` imports (absolute, relative, in functions) or names as a module string."""
  names = set()
  package = module if is_package else module.rpartition('.')[0]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      names.update(f'{base}.{alias.name}' for alias in node.names)  # A module, or a name of module `base`.
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
      names.add(node.value)
  return {name for name in names if name == 'resnet_flax' or name.startswith('resnet_flax.')}


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
  """module -> the modules of `sources` it imports: a dotted name is its longest prefix that is a module."""
  graph = {}
  for module, (source, is_package) in sources.items():
    targets = set()
    for name in imported_names(module, source, is_package):
      while name and name not in sources:
        name = name.rpartition('.')[0]
      if name and name != module:
        targets.add(name)
    graph[module] = targets
  return graph


def layer_of(module: str) -> int:
  matches = [
    (len(prefix), index)
    for index, prefixes in enumerate(LAYERS)
    for prefix in prefixes
    if module == prefix or module.startswith(prefix + '.')
  ]
  if not matches:
    raise AssertionError(f'{module} is in no layer of LAYERS: add its package there')
  return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  return sorted(
    f'{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})'
    for module, targets in graph.items()
    for target in targets
    if layer_of(target) < layer_of(module)
  )


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(module: str):
    index[module] = low[module] = len(index)
    stack.append(module)
    on_stack.add(module)
    for target in graph.get(module, ()):
      if target not in index:
        visit(target)
        low[module] = min(low[module], low[target])
      elif target in on_stack:
        low[module] = min(low[module], index[target])
    if low[module] == index[module]:
      component = []
      while not component or component[-1] != module:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        circles.append(sorted(component))

  for module in sorted(graph):
    if module not in index:
      visit(module)
  return circles


def package_sources() -> dict[str, tuple[str, bool]]:
  return {
    module_name(path): (path.read_text(encoding='utf-8'), path.name == '__init__.py')
    for path in sorted(PACKAGE.rglob('*.py'))
  }


def test_every_import_flows_down_the_layers():
  assert upward_imports(import_graph(package_sources())) == []


def test_no_import_circles():
  assert import_circles(import_graph(package_sources())) == []


def test_every_module_has_a_layer():
  for module in package_sources():
    layer_of(module)


@pytest.mark.parametrize(
  'source',
  [
    'from resnet_flax.train import loop',  # Module level.
    'def f():\n  from resnet_flax import train',  # Inside a function.
    'from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from resnet_flax.train import loop',
    "import importlib\nSOURCES = {'x': 'resnet_flax.train.loop'}",  # A module named for importlib.
    'from ..train import loop',  # Relative.
  ],
)
def test_an_upward_import_fails(source):
  sources = package_sources()
  sources['resnet_flax.data.augment'] = (sources['resnet_flax.data.augment'][0] + '\n' + source + '\n', False)
  assert upward_imports(import_graph(sources)) == [
    'resnet_flax.data.augment (layer 9) imports '
    + ('resnet_flax.train (layer 4)' if source.endswith('import train') else 'resnet_flax.train.loop (layer 4)')
  ]


def test_a_circle_fails():
  sources = package_sources()
  sources['resnet_flax.run.writers'] = (
    sources['resnet_flax.run.writers'][0] + '\nfrom resnet_flax.run import curves\n',
    False,
  )
  assert ['resnet_flax.run.curves', 'resnet_flax.run.writers'] in import_circles(import_graph(sources))
