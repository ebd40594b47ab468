"""Devices and processes: multi-host start-up through `jax.distributed`, and the data-parallel mesh."""

import os

import jax
from absl import logging

# Variables that cluster launchers set; with any of them jax.distributed finds its peers alone.
CLUSTER_VARIABLES = ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  """Joins the other processes of the job, if there are any.

  With `coordinator_address` the job is described by the flags (e.g. several processes on one
  machine); otherwise a cluster launcher's environment is auto-detected. On CPU, collectives
  between processes go through gloo.
  """
  if coordinator_address is None and not _in_cluster():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Only the CPU backend reads it.
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info(
    'Process %d of %d; %d local of %d devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _in_cluster() -> bool:
  return any(v in os.environ for v in CLUSTER_VARIABLES)


def create_mesh() -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh of every device of every process.

  Its axis is Auto: Explicit axes (jax's default for `make_mesh`) reject the unsharded per-example
  keys of the vmapped augmentation.
  """
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
