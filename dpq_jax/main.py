r"""Entry point: `python -m dpq_jax.main --config=configs/NAME.py --workdir=DIR`.

With no flags it runs the embedded default job into runs/<config name>/. `--config=NAME[:arg]` (or
`NAME.py`) names a shipped config of configs/ when no such path exists here.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_ROOT, 'configs', 'digits.py')
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)  # configs/ imports configs.common

_CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Job config file (ml_collections).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (default: runs/<config name>).')


def shipped_config(argv: list[str]) -> list[str]:
  """argv with `--config=NAME[.py][:arg]` pointing at configs/NAME.py when NAME is no path that exists."""
  out, pending = [], False
  for a in argv:
    prefix = '--config=' if a.startswith('--config=') else '' if pending else None
    pending = a == '--config'
    if prefix is not None:
      path, sep, arg = a[len(prefix) :].partition(':')
      folder, name = os.path.split(path)
      shipped = os.path.join(_ROOT, 'configs', name if name.endswith('.py') else f'{name}.py')
      if not os.path.exists(path) and folder in ('', 'configs') and os.path.isfile(shipped):
        a = f'{prefix}{shipped}{sep}{arg}'
    out.append(a)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  from dpq_jax import errors, pipeline  # Imports jax: after flag parsing, so --help stays fast.

  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join('runs', config.name)
  try:
    report = pipeline.run(config, workdir)
  except (errors.ConfigError, errors.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(
    f'wrote {os.path.join(workdir, "report.md")} ({", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())})'
  )


if __name__ == '__main__':
  sys.argv = shipped_config(sys.argv)
  app.run(main)
