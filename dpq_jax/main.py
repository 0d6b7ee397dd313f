r"""Entry point: `python -m dpq_jax.main --config=configs/NAME.py --workdir=DIR`.

With no flags it runs the embedded default job into runs/<config name>/.
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
  app.run(main)
