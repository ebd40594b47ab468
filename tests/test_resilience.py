"""Preemption, kills, corrupt checkpoints, non-finite losses, unwritable or full disks, several hosts."""

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_flax import cli
from resnet_flax.errors import DiskFullError
from resnet_flax.run import preemption, writers
from resnet_flax.run.checkpoint import CheckpointError

from helpers import SMOKE_TOTAL_STEPS, finished_steps, load_checkpoint, run_main, run_smoke


def wait_for(condition, timeout: float = 120):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.02)


def assert_same_state(workdir_a, workdir_b, step: int):
  a, b = load_checkpoint(workdir_a, step), load_checkpoint(workdir_b, step)
  for name in ('params', 'batch_stats', 'opt_state', 'step'):
    jax.tree.map(np.testing.assert_array_equal, a[name], b[name])


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_zero(straight_run, tmp_path):
  process = run_smoke(tmp_path, wait=False)
  wait_for(lambda: finished_steps(tmp_path))
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  stopped_at = finished_steps(tmp_path)[-1]
  assert stopped_at < SMOKE_TOTAL_STEPS
  assert f'Stopped by SIGTERM at step {stopped_at} with a checkpoint' in output
  returncode, output = run_smoke(tmp_path)
  assert returncode == 0 and f'Resuming from the checkpoint of step {stopped_at}' in output
  assert_same_state(tmp_path, straight_run, SMOKE_TOTAL_STEPS)


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments_lose_nothing(straight_run, tmp_path):
  """Kills during training and during saves (a checkpoint every 2 steps); each run resumes."""
  rng = random.Random(0)
  kills, steps_lost = 0, []
  while kills < 20:
    process = run_smoke(tmp_path, '--config.checkpoint_every_steps=2', wait=False)
    output = []
    while line := process.stdout.readline():  # Kill once steps run: the start-up is not what we test.
      output.append(line)
      if re.search(r'step \d+/|already complete', line):
        break
    time.sleep(rng.uniform(0, 1.0))
    process.kill()
    output.append(process.stdout.read())
    process.wait()
    logged_steps = [int(s) for s in re.findall(r'step (\d+)/', ''.join(output))]
    kills += process.returncode == -signal.SIGKILL
    kept = finished_steps(tmp_path)
    steps_lost.append(max(logged_steps, default=0) - (kept[-1] if kept else 0))
    if kept[-1:] == [SMOKE_TOTAL_STEPS]:
      shutil.rmtree(tmp_path / 'checkpoints' / str(SMOKE_TOTAL_STEPS))  # Keep it going to 20 kills.
  returncode, output = run_smoke(tmp_path, '--config.checkpoint_every_steps=2')
  assert returncode == 0, output
  assert not list((tmp_path / 'checkpoints').glob('*tmp*')), 'leftover temporary checkpoints'
  assert_same_state(tmp_path, straight_run, SMOKE_TOTAL_STEPS)
  print(f'steps lost per kill (checkpoint every 2 steps): {steps_lost}')
  assert max(steps_lost) <= 2 * 2  # The interval, plus the save in flight when the kill came.


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path):
  assert run_main(tmp_path)[0] == 0  # Smoke: 16 steps, checkpoints 15 and 16 kept.
  for blob in (tmp_path / 'checkpoints' / '16').rglob('d/*'):
    blob.write_bytes(blob.read_bytes()[:10])
  returncode, output = run_main(tmp_path, '--config.num_epochs=3')
  assert returncode == 0, output
  assert f'Checkpoint {tmp_path}/checkpoints/16 cannot be restored' in output
  assert 'Resuming from the checkpoint of step 15' in output
  assert (tmp_path / 'checkpoints_corrupt' / '16').is_dir()
  assert finished_steps(tmp_path)[-1] == 24


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
  assert run_main(tmp_path)[0] == 0
  before = load_checkpoint(tmp_path, 16)
  returncode, output = run_main(tmp_path, '--config.num_epochs=4', '--config.optim.learning_rate=1e30')
  assert returncode == 1
  assert (
    output.strip()
    .splitlines()[-1]
    .startswith('error: the loss became non-finite at step 18 (the checkpoint of step 16 is intact)')
  )
  assert finished_steps(tmp_path) == [15, 16]
  jax.tree.map(np.testing.assert_array_equal, load_checkpoint(tmp_path, 16)['params'], before['params'])


@pytest.mark.slow
def test_skip_nonfinite_updates_counts_them_and_keeps_training(tmp_path):
  assert run_main(tmp_path)[0] == 0
  returncode, output = run_main(
    tmp_path,
    '--config.num_epochs=3',
    '--config.optim.learning_rate=1e30',
    '--config.skip_nonfinite_updates=True',
    '--config.log_every_steps=1',
  )
  assert returncode == 0, output
  skipped = dict(writers.read_scalars(str(tmp_path))['train_nonfinite_steps'])
  assert skipped[24] >= 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(load_checkpoint(tmp_path, 24)))


def test_unwritable_workdir_is_refused_before_any_work(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  returncode, output = run_main(blocker / 'run')
  assert returncode == 1
  assert output.strip().splitlines()[-1].startswith(f'error: workdir {blocker}/run is not writable')
  assert blocker.read_text() == ''


# Where no tmpfs can be mounted, the disk is full for every write of Orbax's own (Python) files from the second
# checkpoint on, from main.py's start (a sitecustomize): the arrays, which tensorstore writes, still go through.
DISK_FULL_AFTER_THE_FIRST_CHECKPOINT = r"""import errno, re
from etils import epath

first_step = []


def unless_full(write):
  def checked(path, *args, **kwargs):
    step = re.search(r'/checkpoints/(\d+)', str(path))
    if step:
      first_step[:] = first_step or [step[1]]
      if step[1] != first_step[0]:
        raise OSError(errno.ENOSPC, 'No space left on device', str(path))
    return write(path, *args, **kwargs)
  return checked


Path = type(epath.Path('/'))
Path.write_text, Path.write_bytes = unless_full(Path.write_text), unless_full(Path.write_bytes)
"""


@pytest.fixture
def full_disk(tmp_path) -> tuple[Path, dict[str, str]]:
  """(a workdir, main.py's environment) where the disk fills after the first checkpoint: a 1 MiB tmpfs (room for
  the smoke model's first checkpoint, ~0.7 MiB, not for a second) where one can be mounted, else ENOSPC injected."""
  mount_point = tmp_path / 'tiny_disk'
  mount_point.mkdir()
  mount = ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount_point)]
  if not subprocess.run(mount, capture_output=True).returncode:
    yield mount_point / 'run', {}
    subprocess.run(['umount', str(mount_point)], check=True)
    return
  site = tmp_path / 'full_disk_site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(DISK_FULL_AFTER_THE_FIRST_CHECKPOINT)
  yield tmp_path / 'run', {'PYTHONPATH': os.pathsep.join(filter(None, [str(site), os.environ.get('PYTHONPATH')]))}


def test_full_disk_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(full_disk):
  workdir, env = full_disk
  returncode, output = run_main(workdir, '--config.keep_checkpoints=5', env=env)
  assert returncode == 1, output
  last_line = output.strip().splitlines()[-1]
  assert last_line.startswith('error: no space left on the device'), last_line
  assert 'Traceback' not in output  # Orbax's and tensorstore's reports of the failed writes are one line each.
  kept = finished_steps(workdir)
  assert kept
  if 'while saving a checkpoint' in last_line:  # Else TensorBoard's async events met the full disk first: cli's line.
    assert f'the checkpoint of step {kept[-1]} is intact' in last_line
  assert load_checkpoint(workdir, kept[-1])['step'] == kept[-1]


def run_two_processes(workdir, port: int, *args) -> list[subprocess.Popen]:
  return [
    run_main(workdir, '--config.log_every_steps=1', *args, devices=2, wait=False, process=(port, 2, i))
    for i in range(2)
  ]


# Two processes of 2 devices sum the gradients and the BatchNorm statistics across the 4 devices in another order than
# one process of 4 (and another CPU's kernels sum in yet other orders), which changes float32 results in their last bits
# (rel ~1e-7) at the first steps; each step of training then amplifies the difference. So the bounds grow with the step.
# Measured on an Intel(R) Xeon(R) Processor (lscpu; family 6 model 207, AVX-512; jaxlib 0.10.2) between the 4-device
# one-process smoke run and 11 runs summing in other orders (2 processes x 2 devices, 1, 2 and 8 devices; seeds 0-2;
# runs of 16 steps and the first 16 steps of runs of 48): the loss of step k differed by at most k x 1.5e-4 relative (8
# devices: 2.1e-3 at step 14), the params of step 16 by at most 16 x (6.5e-5 relative + 3.3e-5 absolute) (2 processes,
# seed 1). An AVX2 CI host's 2 processes: 1.5e-3 at a step of 13-16, under k x 1.2e-4. The runs spread widely (the
# loss's per-step growth ranged over 1e-7 to 1.5e-4): the bounds take twice the largest per-step growth measured. A real
# fault (a process on the wrong examples, BatchNorm statistics of one process's devices only) moves the loss by percents
# from the first steps, where the bounds are 3e-4 to 1.2e-3 (steps 1-4). The loss's relative differences grow faster as
# it nears 0 (1.5e-2 at step 34 of 48, at a loss of 0.005): these bounds are for this run's 16 steps, losses above 0.05.
LOSS_DRIFT_PER_STEP = 3e-4  # Relative.
PARAMS_DRIFT_PER_STEP = 1.3e-4, 6.5e-5  # rtol, atol.


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_kill(tmp_path):
  steps = 16  # The smoke config's.
  one = tmp_path / 'one_process'
  assert run_main(one, '--config.log_every_steps=1', devices=4)[0] == 0

  two = tmp_path / 'two_processes'
  processes = run_two_processes(two, 23456)
  wait_for(lambda: finished_steps(two))
  processes[1].kill()  # One host dies; the other cannot go on alone: the job scheduler stops it too.
  processes[0].kill()
  for p in processes:
    p.communicate()
  assert finished_steps(two)[-1] < steps

  processes = run_two_processes(two, 23457)
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert all('Resuming from the checkpoint' in o for o in outputs)
  losses = lambda w: dict(writers.read_scalars(str(w))['train_loss'])  # {step: loss}, the resumed run's last.
  assert list(losses(two)) == list(losses(one)) == list(range(1, steps + 1))
  one_losses, two_losses = np.array(list(losses(one).values())), np.array(list(losses(two).values()))
  relative, bound = np.abs(two_losses - one_losses) / one_losses, LOSS_DRIFT_PER_STEP * np.arange(1, steps + 1)
  assert np.all(relative <= bound), f'losses relatively apart by {relative}, bounds {bound}'
  a, b = load_checkpoint(two, steps), load_checkpoint(one, steps)
  rtol, atol = (steps * d for d in PARAMS_DRIFT_PER_STEP)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a['params'], b['params'])
  assert len(list(Path(two).glob('events.out.tfevents*'))) == 2  # One per run: process 0 writes, 1 does not.


def test_first_sigint_asks_to_stop_and_a_second_one_exits_at_once(monkeypatch):
  exits = []
  monkeypatch.setattr(preemption.os, '_exit', exits.append)
  with preemption.StopRequest() as stop:
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGINT)
    wait_for(stop.requested)
    assert stop.signal_name == 'SIGINT' and exits == []
    os.kill(os.getpid(), signal.SIGINT)
    wait_for(lambda: exits)
  assert exits == [128 + signal.SIGINT]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Restored on leaving.


class _FullDiskWriter:
  def flush(self):
    raise OSError(errno.ENOSPC, 'No space left on device')


def test_a_full_disk_at_the_last_flush_is_one_clear_error_unless_the_run_already_failed(caplog):
  with pytest.raises(DiskFullError, match=r'^no space left on the device while writing the TensorBoard events in W '):
    writers.flush_at_the_end(_FullDiskWriter(), 'W')
  with pytest.raises(CheckpointError, match='the checkpoint of step 5 is intact'):  # The run's own error stays.
    try:
      raise CheckpointError(
        'no space left on the device while saving a checkpoint (the checkpoint of step 5 is intact)'
      )
    finally:
      writers.flush_at_the_end(_FullDiskWriter(), 'W')
  assert 'TensorBoard events of the last steps were not written' in caplog.text


def test_a_full_disk_met_by_any_library_ends_the_command_in_one_line(monkeypatch):
  def write_events():
    raise RuntimeError('Could not flush events file') from OSError(errno.ENOSPC, 'No space left on device')

  said = []
  monkeypatch.setattr(cli, 'quiet_library_logs', lambda: None)  # Process-wide: not in the test's process.
  monkeypatch.setattr(cli, 'exit_with_error', lambda message: said.append(message) or sys.exit(1))
  with pytest.raises(SystemExit):
    cli.run(write_events, '', None, None, None)
  assert said == ['no space left on the device (RuntimeError); free some space and rerun the same command to resume']
  with pytest.raises(RuntimeError, match='another failure'):  # Not a full disk: raised as it is.
    cli.run(lambda: (_ for _ in ()).throw(RuntimeError('another failure')), '', None, None, None)
