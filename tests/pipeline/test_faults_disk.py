"""Fault injection, a real full disk: the CLI (`python -m dpq_jax.main`, `convert_torch_checkpoint.py`) runs in a
private mount namespace (`unshare -rm`) where its workdir, or the converter's output, lies on a tmpfs, so the kernel
itself answers ENOSPC in the middle of a write. Each case copies a good earlier output onto the tmpfs (mounted large
enough), shrinks it (`mount -o remount,size=`) to leave a chosen number of KiB free, runs the command, and copies
what the tmpfs holds afterwards back out for the assertions (the tmpfs is gone once the namespace ends): exit status
2, one `error:` line naming the file and 'no space left', no traceback and no error log, no temp left, the earlier
output byte for byte. The free space is chosen, from the sizes the tiny job writes, so that the write that matters
is the one that fails. Skipped where a tmpfs cannot be mounted that way (unshare(1) missing, user namespaces off).
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dpq_jax import convert, pipeline
from dpq_jax.quant import storage
from tests import helpers
from tests.pipeline import faults

# helpers.tiny_pipeline_config() as flags of configs/smoke.py: a random 2-block DiT on 8x8 latents
TINY = ('--config.model.name=DiT-2x32x2/4', '--config.model.input_size=8', '--config.model.num_classes=10',
        '--config.quant.k=4', '--config.quant.d=4', '--config.quant.kmeans_iters=2',
        r'--config.quant.pattern=blocks_\d+/mlp/fc1', '--config.sample.steps=2')  # fmt: skip

# One namespace: a tmpfs at $MNT holding a copy of $SEED as $MNT/$NAME; then per entry of $FREES, the tmpfs shrunk
# (or grown) to leave that many KiB free, the command run, and the tmpfs copied to $OUT/<i>.
_SCRIPT = r"""
set -e
mount -t tmpfs -o size=256m tmpfs "$MNT"
[ -z "$SEED" ] || cp -a "$SEED" "$MNT/$NAME"
i=0
for free in $FREES; do
  used=$(df -k --output=used "$MNT" | tail -n 1)
  mount -o remount,size=$((used + free))k tmpfs "$MNT"
  set +e
  "$@" > "$OUT/$i.out" 2> "$OUT/$i.err"
  echo $? > "$OUT/$i.rc"
  set -e
  mkdir "$OUT/$i"
  cp -a "$MNT/." "$OUT/$i/"
  i=$((i + 1))
done
"""


@dataclasses.dataclass
class Run:
  returncode: int
  stdout: str
  stderr: str
  after: str  # a copy of the tmpfs as the run left it: $MNT/X is after/X


@pytest.fixture(scope='session')
def tmpfs(tmp_path_factory):
  """Skips unless a private tmpfs can be mounted here and a write to it fails with ENOSPC when it is full."""
  if shutil.which('unshare') is None:
    pytest.skip('unshare(1) is missing: a real full disk needs a tmpfs mounted in a private mount namespace')
  probe = tmp_path_factory.mktemp('probe')
  r = subprocess.run(['unshare', '-rm', 'sh', '-c', f'mount -t tmpfs -o size=64k tmpfs {probe} && '
                      f'dd if=/dev/zero of={probe}/x bs=1k count=128'], capture_output=True, text=True)  # fmt: skip
  if 'No space left' not in r.stderr:
    pytest.skip(f'no small tmpfs in a private mount namespace here (unshare -rm, then mount -t tmpfs: '
                f'{" ".join(r.stderr.split())[:200]}); a real full disk cannot be tested')  # fmt: skip


def on_small_tmpfs(tmp_path, argv, frees, seed=None, name='w', timeout=900) -> list[Run]:
  """Runs `argv` (from the repository root) once per entry of `frees` with that many KiB free on a tmpfs mounted at
  tmp_path/mnt, which first holds a copy of `seed` as mnt/`name`; what each run left there (see _SCRIPT)."""
  mnt, out = tmp_path / 'mnt', tmp_path / 'out'
  mnt.mkdir()
  out.mkdir()
  env = {**os.environ, 'MNT': str(mnt), 'OUT': str(out), 'SEED': str(seed or ''), 'NAME': name,
         'FREES': ' '.join(map(str, frees))}  # fmt: skip
  r = subprocess.run(['unshare', '-rm', 'sh', '-c', _SCRIPT, 'sh', *map(str, argv)], cwd=helpers.ROOT, env=env,
                     capture_output=True, text=True, timeout=timeout)  # fmt: skip
  assert r.returncode == 0, r.stderr  # the script itself (mount, cp), not the command
  return [Run(int((out / f'{i}.rc').read_text()), (out / f'{i}.out').read_text(), (out / f'{i}.err').read_text(),
              str(out / str(i))) for i in range(len(frees))]  # fmt: skip


def main_argv(workdir, *flags) -> list[str]:
  return [sys.executable, '-m', 'dpq_jax.main', '--config=configs/smoke.py', f'--workdir={workdir}', *TINY,
          *flags]  # fmt: skip


def full_disk_line(run: Run, path) -> str:
  """The run ended as main ends a user fault: status 2, one `error:` line naming `path` and a full disk, nothing
  else reported (no traceback, no error log of a library's threads); that line."""
  lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
  assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr and 'Exception ignored' not in run.stderr, run.stderr[-3000:]
  assert not re.search(r'^[EF]\d{4} ', run.stderr, re.M), run.stderr[-3000:]  # absl ERROR/FATAL log lines
  assert f'error: {path}: no space left on the device' in lines[0] and 'free some and rerun' in lines[0], lines[0]
  return lines[0]


def moved(files: dict, src, dst) -> dict:
  """faults.files(src) as it reads under dst."""
  return {p.replace(str(src), str(dst), 1): data for p, data in files.items()}


@pytest.fixture(scope='module')
def good_workdir(faults_workdir, tmp_path_factory):
  """faults_workdir (the tiny job's artifact and lineage) with the samples of its fp model added: what a run that
  fails on a full disk must leave as it was."""
  out = str(tmp_path_factory.mktemp('disk') / 'good')
  shutil.copytree(faults_workdir, out)
  config = faults.config()
  config.stages = ('load', 'sample')
  pipeline.run(config, out)
  assert os.path.isfile(os.path.join(out, 'samples', 'latents.npz'))
  return out


def test_full_disk_at_the_start_and_in_the_artifact(tmpfs, good_workdir, tmp_path):
  """0 KiB free: the lock's pid is the first write; 64 KiB: the new artifact (~200 KiB, another quant.seed) fails
  while it is written. Both: one line, and the workdir exactly as it was."""
  w = tmp_path / 'mnt' / 'w'
  runs = on_small_tmpfs(tmp_path, main_argv(w, '--config.stages=load,quantize', '--config.quant.seed=7'), [0, 64],
                        seed=good_workdir)  # fmt: skip
  full_disk_line(runs[0], w / '.lock')
  full_disk_line(runs[1], w / storage.ARTIFACT_DIR)
  before = faults.files(good_workdir)
  for run in runs:
    after = os.path.join(run.after, 'w')
    assert faults.files(after) == moved(before, good_workdir, after) and faults.temps(after) == []
    assert not os.path.exists(os.path.join(after, '.lock'))


def test_full_disk_while_writing_the_samples(tmpfs, good_workdir, tmp_path):
  """128 samples in 2 chunks of 64 (68 KiB each as npz) fit in 200 KiB; their 132 KiB latents.npz does not: the
  earlier latents.npz stays, the chunks stay whole, and the same command with room resumes from them."""
  w = tmp_path / 'mnt' / 'w'
  argv = main_argv(w, '--config.stages=load,sample', '--config.sample.num_samples=128', '--config.sample.batch_size=64')
  failed, rerun = on_small_tmpfs(tmp_path, argv, [200, 4096], seed=good_workdir)
  line = full_disk_line(failed, w / 'samples' / 'latents.npz')
  assert f'stay in {w / "samples" / "chunks"}: the same command resumes from them' in line, line
  after = os.path.join(failed.after, 'w')
  chunks = os.path.join(after, 'samples', 'chunks')
  files = faults.files(after)
  new = {p for p in files if p.startswith(chunks + os.sep)}
  assert {os.path.basename(p) for p in new} == {'meta.json', '00000000.npz', '00000064.npz'}
  for p in sorted(new - {os.path.join(chunks, 'meta.json')}):
    with np.load(p) as f:  # whole: a readable npz of its 64 samples
      assert f['latents'].shape == (64, 8, 8, 4) and np.isfinite(f['latents']).all()
  assert {p: files[p] for p in set(files) - new} == moved(faults.files(good_workdir), good_workdir, after)
  assert faults.temps(after) == []
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  with np.load(os.path.join(rerun.after, 'w', 'samples', 'latents.npz')) as f:
    assert f['arr_0'].shape == (128, 8, 8, 4)
  report = json.loads(open(os.path.join(rerun.after, 'w', 'report.json')).read())
  assert report['samples']['resumed_chunks'] == 2  # nothing sampled again


# ~60 s of CPU with a cold compilation cache (the calibration step compiles for ~20 s), two CLI runs
@pytest.mark.slow
def test_full_disk_while_writing_a_calibration_checkpoint(tmpfs, good_workdir, tmp_path):
  """Calibration checkpoints of ~440 KiB (codebooks, biases, embedders and final layer with their Adam moments) at
  steps 1 and 2 with 650 KiB free: the first is written, orbax's save of the second fails mid-write. One line naming
  step 2 and the step a rerun resumes from, no orbax temp step left, the earlier report and samples untouched; the
  same command with room then resumes from step 1."""
  w = tmp_path / 'mnt' / 'w'
  argv = main_argv(w, '--config.stages=load,quantize,calibrate', '--config.calibrate.steps=2',
                   '--config.calibrate.checkpoint_every=1', '--config.calibrate.batch_size=4',
                   '--config.calibrate.warmup=0', '--config.calibrate.log_every=1',
                   '--config.calibrate.trainable=codebooks,biases,embedders,final_layer', '--config.data.num_samples=8',
                   '--config.data.sample_steps=2', '--config.data.sample_batch_size=8')  # fmt: skip
  failed, rerun = on_small_tmpfs(tmp_path, argv, [650, 4096], seed=good_workdir)
  line = full_disk_line(failed, w / 'checkpoints' / '2')
  assert 'the same command resumes from checkpoint 1, the last complete one' in line, line
  after = os.path.join(failed.after, 'w')
  assert os.listdir(os.path.join(after, 'checkpoints')) == ['1'] and faults.temps(after) == []
  before = moved(faults.files(good_workdir), good_workdir, after)
  kept = [p for p in before if os.path.basename(p) in ('report.json', 'report.md', 'latents.npz', 'samples_grid.png')]
  assert len(kept) == 4 and all(open(p, 'rb').read() == before[p] for p in kept)
  storage.load(os.path.join(after, storage.ARTIFACT_DIR))  # the artifact in place is whole (quantize's, rewritten)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  report = json.loads(open(os.path.join(rerun.after, 'w', 'report.json')).read())
  assert report['calibrate']['resumed_from_step'] == 1 and report['calibrate']['steps'] == 2


def test_converter_on_a_full_disk_keeps_the_earlier_output(tmpfs, torch_dit, tiny_converted, tmp_path):
  """DiT-S/2 (130 MB of fp32 params) converted over an earlier output with 4 MiB free: orbax's write of params/
  fails mid-way; the earlier output stays as it was and loads, and no temp dir is left beside it."""
  import torch

  _, state = torch_dit
  pt = tmp_path / 'dit_s.pt'
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pt)
  out = tmp_path / 'mnt' / 'dit'
  argv = [sys.executable, os.path.join(helpers.ROOT, 'convert_torch_checkpoint.py'), '--checkpoint', pt,
          '--output', out, '--image-size', 256]  # fmt: skip
  (run,) = on_small_tmpfs(tmp_path, argv, [4096], seed=tiny_converted[2], name='dit')
  full_disk_line(run, out)
  assert os.listdir(run.after) == ['dit']  # no .dit.tmp-* beside it
  after = os.path.join(run.after, 'dit')
  assert faults.files(after) == moved(faults.files(tiny_converted[2]), tiny_converted[2], after)
  spec, _ = convert.load_converted(after)
  assert spec == tiny_converted[0]
