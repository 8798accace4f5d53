"""The import rules of the layering (DESIGN: an arrow only ever points down), read from the
source with `ast`: nothing is imported or run, so a violation fails here even on a code
path no other test reaches.

    report, models, parallel    the base: import nothing else of vlm_jax
    interop                     models
    data                        models (model configs, e.g. tokens per image)
    eval                        models, data, report
    peft                        models
    train  (the engine)         models, parallel, interop, data, eval, report
    techniques                  anything below them, and no other technique
    experiments                 anything of vlm_jax; nothing imports them
Nothing in vlm_jax imports `configs`, `launch`, `benchmarks` or `tests`.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm_jax"

BASE = {"report": set(), "models": set(), "parallel": set()}
LAYERS = {
    **BASE,
    "interop": {"models"},
    "data": {"models"},
    "eval": {"models", "data", "report"},
    "peft": {"models"},
    "train": {"models", "parallel", "interop", "data", "eval", "report"},
}
TECHNIQUES = ("curation", "soups", "sparsity", "adapters", "synth", "guidance")
OUTSIDE = ("configs", "launch", "benchmarks", "tests")
# Imports that may sit inside a function (heavy and optional on a given path), with a `# reason`.
HEAVY = ("tensorflow", "tensorflow_datasets", "etils", "transformers", "torch", "matplotlib",
         "vlm_jax.data.builders")  # the TFDS builders: importing them imports TFDS


def _part(path: pathlib.Path) -> str:
  """`vlm_jax/train/loop.py` -> "train"; `vlm_jax/report.py` -> "report"; `vlm_jax/__init__.py` -> ""."""
  rel = path.relative_to(PACKAGE).with_suffix("")
  return "" if rel.parts == ("__init__",) else rel.parts[0]


def _files():
  return sorted(p for p in PACKAGE.rglob("*.py"))


def _imports(tree: ast.AST):
  """(node, imported module, imported names) for every import statement."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node, alias.name, ()
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node, node.module, tuple(a.name for a in node.names)


def _targets(module: str, names: tuple) -> set[str]:
  """The vlm_jax parts an import reaches: `from vlm_jax import soups` reaches "soups"."""
  parts = module.split(".")
  if parts[0] != "vlm_jax":
    return set()
  if len(parts) > 1:
    return {parts[1]}
  return {n for n in names if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").exists()}


def _allowed(part: str) -> set[str] | None:
  """The parts `part` may import besides itself (None: anything below experiments)."""
  if part in LAYERS:
    return LAYERS[part]
  if part in TECHNIQUES:
    return set(LAYERS)
  if part in ("experiments", ""):
    return None
  raise AssertionError(f"vlm_jax/{part} is in no layer: add it to tests/test_layering.py")


def test_every_arrow_points_down():
  wrong = []
  for path in _files():
    part = _part(path)
    allowed = _allowed(part)
    for node, module, names in _imports(ast.parse(path.read_text(), str(path))):
      if module.split(".")[0] in OUTSIDE:
        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module} (vlm_jax never imports {OUTSIDE})")
      for target in _targets(module, names) - {part}:
        if target == "experiments":
          wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports the experiments")
        elif allowed is not None and target not in allowed:
          wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {part or 'vlm_jax'} imports {target}")
  assert not wrong, "\n".join(wrong)


def test_a_plain_training_run_stays_in_the_engine_and_below():
  """The train loop's own imports reach no technique (a regression guard on the seam)."""
  engine = [p for p in _files() if _part(p) == "train"]
  assert {p.name for p in engine} >= {"loop.py", "step.py", "setup.py", "init_from.py", "extension.py"}
  for path in engine:
    for _, module, names in _imports(ast.parse(path.read_text())):
      assert not _targets(module, names) & set(TECHNIQUES), f"{path.name} imports {module}"


def test_no_private_names_across_packages():
  wrong = []
  for path in _files():
    part = _part(path)
    tree = ast.parse(path.read_text())
    modules = {}  # local alias -> the vlm_jax part of the module it names
    for node, module, names in _imports(tree):
      if not module.startswith("vlm_jax"):
        continue
      if isinstance(node, ast.ImportFrom):
        for alias in node.names:
          target = _targets(f"{module}.{alias.name}" if module == "vlm_jax" else module, (alias.name,))
          if alias.name.startswith("_") and target - {part}:
            wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{alias.name}")
          modules[alias.asname or alias.name] = next(iter(target), part)
      else:
        for alias in node.names:
          modules[alias.asname or alias.name] = next(iter(_targets(alias.name, ())), part)
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
          and not node.attr.startswith("__") and modules.get(node.value.id, part) != part):
        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
  assert not wrong, "\n".join(wrong)


def test_imports_sit_at_the_top_except_heavy_optional_ones_with_a_reason():
  wrong = []
  for path in _files():
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    top = {id(n) for n in tree.body}
    for node, module, names in _imports(tree):
      if id(node) in top or _guarded_at_top(tree, node):
        continue
      heavy = any(module == h or module.startswith(h + ".") for h in HEAVY) or \
          any(f"{module}.{n}" in HEAVY for n in names)
      line = lines[node.lineno - 1]
      if not heavy or "#" not in line:
        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
  assert not wrong, "imports inside functions (allowed only for " + ", ".join(HEAVY) + \
      ", each with a `# reason`):\n" + "\n".join(wrong)


def _guarded_at_top(tree: ast.Module, node: ast.AST) -> bool:
  """An import inside a module-level `try:` / `if:` block counts as a top-level import."""
  return any(isinstance(stmt, (ast.Try, ast.If)) and node in list(ast.walk(stmt)) for stmt in tree.body)


@pytest.mark.parametrize("rule", ["arrow", "private"])
def test_the_rules_catch_a_violation(tmp_path, monkeypatch, rule):
  """The checks above would fail on a file that breaks them (they do not pass vacuously)."""
  fake = tmp_path / "vlm_jax"
  (fake / "train").mkdir(parents=True)
  (fake / "sparsity").mkdir()
  source = ("from vlm_jax.sparsity import masks\n" if rule == "arrow" else
            "from vlm_jax.sparsity import masks\nx = masks._private\n")
  (fake / "train" / "loop.py").write_text(source)
  (fake / "sparsity" / "masks.py").write_text("_private = 1\n")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  check = test_every_arrow_points_down if rule == "arrow" else test_no_private_names_across_packages
  with pytest.raises(AssertionError, match="train|masks._private"):
    check()
