r"""Entry point: `python -m dpq_jax.main --config=NAME[:arg] --workdir=DIR [--config.KEY=VALUE ...]`.

With no flags it runs the embedded default job (the digits demo) into runs/<config name>/. `--config` is a
config file's path, or the name of a shipped config (`dit_xl_1bit`, `dit_xl_1bit.py`, `dit_xl_1bit:smoke`)
when no such path exists here.
"""

import ast
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

from dpq_jax import configs

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = configs.path('digits')
HELP_FLAGS = ('--help', '--helpshort', '--helpfull', '-h', '-?')


def _literal(text: str):
  """A Python literal where `text` is one (1, 0.5, None), else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


class CommaTupleParser(tuple_parser.TupleParser):
  """Tuple config fields as users type them: a plain comma list, `--config.compare.rows=fp,vq-1bit`, is
  ('fp', 'vq-1bit') (ml_collections parses the whole text as one Python literal: `vq-1bit` is none, so it refuses
  the list, and `fp,vq` would be the one string 'fp,vq'); items that are literals keep their type (`1,2` is
  (1, 2)). Text with quotes or brackets is ml_collections' literal syntax, unchanged."""

  def parse(self, argument):
    if isinstance(argument, str) and ',' in argument and not any(c in argument for c in '\'"()[]{}'):
      return tuple(_literal(item.strip()) for item in argument.split(',') if item.strip())
    return super().parse(argument)


config_flags.register_flag_parser_for_type(tuple, CommaTupleParser())
_CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Job config: a file or a shipped name (above).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (default: runs/<config name>).')


def shipped_config(argv: list[str]) -> list[str]:
  """argv with `--config=NAME[.py][:arg]` pointing at the shipped config NAME when NAME is no path that exists
  (configs.resolve; ValueError naming the shipped configs when there is none)."""
  out, pending = [], False
  for a in argv:
    if a.startswith('--config='):
      a = '--config=' + configs.resolve(a[len('--config=') :])
    elif pending:
      a = configs.resolve(a)
    pending = a == '--config'
    out.append(a)
  return out


def _doc_line(path: str) -> str:
  """The first line of a module's docstring, read without importing it (help stays fast: no jax)."""
  with open(path) as f:
    return (ast.get_docstring(ast.parse(f.read())) or '').partition('\n')[0]


def usage() -> str:
  """This module's docstring with the stages and the shipped configs, for --help and --helpshort."""
  with open(os.path.join(_PACKAGE, 'stages', '__init__.py')) as f:  # the REGISTRY's order, without importing it
    registry = next(n.value for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], 'id', '') == 'REGISTRY')  # fmt: skip
  lines = [__doc__, "Stages (config.stages, in order: a tuple or 'load,quantize'; a stage that needs a model"
           ' implies load):']  # fmt: skip
  for key in registry.keys:
    doc = _doc_line(os.path.join(_PACKAGE, 'stages', f'{key.value}.py'))
    lines.append(f'  {key.value:10} {doc.partition(": ")[2]}')
  lines.append('\nShipped configs (--config=NAME or NAME:arg; dpq_jax/configs/NAME.py):')
  lines += [f'  {name:12} {_doc_line(configs.path(name))}' for name in configs.names()]
  lines.append('\nREADME.md explains them: "Running jobs", "The demo", "Quantization", "Python API".\n')
  return '\n'.join(lines)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, where a bad flag, config argument or config key is one line and exit status 2 (absl
  would print the config file's traceback, or ml_collections three chained ones for an unknown key)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    message = lines[0] + (f' ({lines[-1]})' if len(lines) > 1 else '')  # the config file's own error, last
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config does not have
    key = str(e).strip('"\'')
    given = next((a for a in argv[1:] if a.startswith('--config.') and key in a), '--config')
    message = f'{given}: the config has no key {key!r}'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 brings it back
  from dpq_jax import errors

  with errors.reported():  # user faults (errors.UserError, a full disk, ...): one line, exit 2; bugs: a traceback
    config = _CONFIG.value
    try:
      name = config.name
    except OSError as e:  # ml_collections reports a config file it could not load at the first access
      raise errors.ConfigError(f'--config: {" ".join(str(e).split())}') from None
    workdir = _WORKDIR.value or os.path.join('runs', name)
    from dpq_jax import pipeline  # Imports jax: after flags and config, so --help and their errors stay fast.

    report = pipeline.run(config, workdir)
  print(
    f'wrote {os.path.join(workdir, "report.md")} ({", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())})'
  )


if __name__ == '__main__':
  if any(a in HELP_FLAGS for a in sys.argv[1:]):
    __doc__ = usage()  # absl prints __main__'s docstring above the flags
  try:
    sys.argv = shipped_config(sys.argv)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  app.run(main, flags_parser=parse_flags)
