"""The package layers stay ordered: no module of kat_jax imports a package of a higher layer,
and nothing in kat_jax imports experiments/ (imports inside functions count too)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Low to high; a package may import its own layer and the layers below it.
LAYERS = (
    # utilities, config field checks, kernels, tokenizers/packing, tasks + verifiers
    ("errors", "field_checks", "progress", "openai_http", "kernels", "data", "tasks"),
    ("model",),
    ("parallel", "checkpoint"),
    ("train", "sampling"),  # the trainer; decoding and "a model as a generate function"
    ("rl", "distill", "upscale", "autothink"),  # stages (rl also: tree packer, policy update)
    ("agentic", "eval"),  # stages built on rl / evaluating every stage's models
    ("testing",),  # test helpers
)
LAYER = {package: i for i, packages in enumerate(LAYERS) for package in packages}


def _imports(path: str) -> list[tuple[int, str]]:
  """(line, imported module) of every import in the file, at any depth."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.append((node.lineno, node.module))
    elif isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
  return found


def _modules():
  for directory, _, files in os.walk(os.path.join(ROOT, "kat_jax")):
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(directory, name)


def _package(path: str) -> str:
  parts = os.path.relpath(path, os.path.join(ROOT, "kat_jax")).split(os.sep)
  return parts[0][:-3] if len(parts) == 1 else parts[0]


def test_every_kat_jax_package_has_a_layer():
  packages = {_package(p) for p in _modules()} - {"__init__"}
  assert packages <= set(LAYER), sorted(packages - set(LAYER))


def test_no_module_imports_a_higher_layer_or_experiments():
  bad = []
  for path in _modules():
    package = _package(path)
    if package == "__init__":
      continue
    for line, module in _imports(path):
      where = f"{os.path.relpath(path, ROOT)}:{line} imports {module}"
      if module.split(".")[0] == "experiments":
        bad.append(where)
      parts = module.split(".")
      if parts[0] == "kat_jax" and len(parts) > 1 and parts[1] in LAYER:
        if LAYER[parts[1]] > LAYER[package]:
          bad.append(where)
  assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_package():
  bad = []
  for path in _modules():
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
      if (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
          and node.module.startswith("kat_jax.")
          and node.module.split(".")[1] != _package(path)):
        bad += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.module}.{a.name}"
                for a in node.names if a.name.startswith("_")]
  assert not bad, "\n".join(bad)
