"""launch/: both scripts parse (`bash -n`), print the right commands with --dry-run, and refuse bad input."""

import os
import shlex
import subprocess

import pytest

from tests.helpers import ROOT

TPU = os.path.join(ROOT, 'launch', 'tpu_vm.sh')
GPU = os.path.join(ROOT, 'launch', 'gpu_multinode.sh')


def _run(script, *args, env=None):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  full_env.update(env or {})
  return subprocess.run(['bash', script, *args], capture_output=True, text=True, env=full_env, timeout=60)


def _commands(stdout):
  """The '+ ' lines of a dry run, each split back into its words."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


@pytest.mark.parametrize('script', [TPU, GPU])
def test_scripts_parse(script):
  assert subprocess.run(['bash', '-n', script]).returncode == 0


def test_tpu_dry_run_commands():
  r = _run(TPU, '--name', 'dpq', '--zone', 'us-west4-a', '--project', 'p1', '--workdir', 'gs://bkt/runs/a',
           '--checkpoint', 'gs://bkt/ckpt/xl', '--data-dir', 'gs://data/tfds', '--dry-run', '--',
           '--config.calibrate.steps=7')  # fmt: skip
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  create, archive, scp, install, job = cmds
  assert create[:7] == ['gcloud', '--project', 'p1', 'compute', 'tpus', 'tpu-vm', 'create']
  assert create[7:] == [
    'dpq',
    '--zone',
    'us-west4-a',
    '--accelerator-type',
    'v5litepod-8',
    '--version',
    'v2-alpha-tpuv5-lite',
  ]
  assert archive[:3] == ['git', '-C', ROOT] and archive[-1] == 'HEAD'
  assert '--worker=all' in scp and '--worker=all' in install and '--worker=all' in job
  remote_install = install[install.index('--command') + 1]
  assert 'gcsfuse' not in remote_install and 'mkdir' not in remote_install  # gs:// goes to the job as it is
  assert shlex.split(remote_install)[-1] == '.[tpu,gcs]'  # pyproject's extras: jax[tpu], gcsfs (epath's gs://)
  remote_job = shlex.split(job[job.index('--command') + 1])
  assert remote_job[:4] == ['cd', 'dpq_jax', '&&', 'DPQ_DISTRIBUTED=1']
  assert remote_job[4:] == [
    'python3', '-m', 'dpq_jax.main', '--config=dit_xl_1bit', '--workdir=gs://bkt/runs/a',
    '--config.model.checkpoint=gs://bkt/ckpt/xl', '--config.data.data_dir=gs://data/tfds', '--config.calibrate.steps=7',
  ]  # fmt: skip


def test_tpu_dry_run_gcsfuse_mounts_the_buckets():
  r = _run(TPU, '--name', 'dpq', '--zone', 'z', '--workdir', 'gs://bkt/runs/a', '--checkpoint', 'gs://bkt/ckpt/xl',
           '--data-dir', 'gs://data/tfds', '--vae', '/local/vae', '--gcsfuse', '--dry-run')  # fmt: skip
  assert r.returncode == 0, r.stderr
  _, _, _, install, job = _commands(r.stdout)
  remote_install = install[install.index('--command') + 1]
  assert (
    'gcsfuse --implicit-dirs bkt /gcs/bkt' in remote_install
    and 'gcsfuse --implicit-dirs data /gcs/data' in remote_install
  )
  assert remote_install.count('gcsfuse') == 2  # one mount per bucket
  assert shlex.split(job[job.index('--command') + 1])[4:] == [
    'python3', '-m', 'dpq_jax.main', '--config=dit_xl_1bit', '--workdir=/gcs/bkt/runs/a',
    '--config.model.checkpoint=/gcs/bkt/ckpt/xl', '--config.data.data_dir=/gcs/data/tfds',
    '--config.vae.checkpoint=/local/vae',
  ]  # fmt: skip


def test_tpu_queued_spot():
  r = _run(TPU, '--name', 'q', '--zone', 'z', '--workdir', 'gs://b/r', '--accelerator', 'v5p-16', '--queued', '--spot',
           '--dry-run')  # fmt: skip
  assert r.returncode == 0, r.stderr
  create = _commands(r.stdout)[0]
  assert create[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create']
  assert create[5:] == ['q-qr', '--node-id', 'q', '--zone', 'z', '--accelerator-type', 'v5p-16',
                        '--runtime-version', 'v2-alpha-tpuv5', '--spot']  # fmt: skip


@pytest.mark.parametrize(
  'args, message',
  [
    (['--zone', 'z', '--workdir', 'gs://b/r'], '--name is required'),
    (['--name', 'n', '--zone', 'z', '--workdir', '/local/dir'], "--workdir='/local/dir': expected a gs:// path"),
    (['--name', 'n', '--zone', 'z', '--workdir', 'gs://b/r', '--accelerator', 'tpu9-8'], "--accelerator='tpu9-8'"),
    (['--name', 'n', '--zone', 'z', '--workdir', 'gs://b/r', '--spot'], '--spot needs --queued'),
    (['--bogus'], "unknown argument '--bogus'"),
  ],
)
def test_tpu_refusals(args, message):
  r = _run(TPU, *args, '--dry-run')
  assert r.returncode == 2 and message in r.stderr and not r.stdout


def test_gpu_explicit_and_slurm():
  r = _run(GPU, '--coordinator', 'h0:1234', '--num-processes', '4', '--process-id', '2', '--workdir', '/shared/x',
           '--dry-run', '--', '--config.calibrate.steps=5')  # fmt: skip
  assert r.returncode == 0, r.stderr
  (cmd,) = _commands(r.stdout)
  assert cmd[:3] == ['JAX_COORDINATOR_ADDRESS=h0:1234', 'JAX_NUM_PROCESSES=4', 'JAX_PROCESS_ID=2']
  assert cmd[3:] == ['python3', '-m', 'dpq_jax.main', '--config=dit_xl_1bit', '--workdir=/shared/x',
                     '--config.calibrate.steps=5']  # fmt: skip
  for nodelist, first in (('gpu[01-04]', 'gpu01'), ('n1,n2', 'n1'), ('gpu[07,09]', 'gpu07'), ('node5', 'node5')):
    env = {'SLURM_JOB_NODELIST': nodelist, 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1', 'PATH': '/usr/bin:/bin'}
    r = _run(GPU, '--workdir', '/s', '--dry-run', env=env)
    assert r.returncode == 0, r.stderr
    assert _commands(r.stdout)[0][:3] == [
      f'JAX_COORDINATOR_ADDRESS={first}:12355',
      'JAX_NUM_PROCESSES=2',
      'JAX_PROCESS_ID=1',
    ]


@pytest.mark.parametrize(
  'args, message',
  [
    (['--workdir', '/s'], 'no coordinator'),
    (['--workdir', '/s', '--coordinator', 'h0'], "--coordinator='h0': expected HOST:PORT"),
    (['--workdir', '/s', '--coordinator', 'h:1', '--num-processes', '0', '--process-id', '0'], "--num-processes='0'"),
    (['--workdir', '/s', '--coordinator', 'h:1', '--num-processes', '2', '--process-id', '2'], "--process-id='2'"),
    (['--coordinator', 'h:1'], '--workdir is required'),
  ],
)
def test_gpu_refusals(args, message):
  r = _run(GPU, *args, '--dry-run')
  assert r.returncode == 2 and message in r.stderr and not r.stdout
