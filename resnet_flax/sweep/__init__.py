"""Hyperparameter sweeps with Optuna: many short training runs, chosen by validation accuracy.

`python -m resnet_flax.sweep` runs one (`__main__`, whose docstring shows the commands and how Optuna and
training share the work). Its modules, each importing only those listed before it:

- `search_space`: the search space file (`get_space()`), its checks against the config, the grid, suggesting values.
- `records`: what `sweep.json` records (`SweepInfo`) and the trial configs it rebuilds; the Optuna storage and
  study with its sampler and pruner; the baseline trial; the directory of each trial's run.
- `workers`: the objective (a trial as an ordinary training run reporting to the pruner), the loop of a worker,
  and the worker processes of `--workers=N`.
- `report`: `<sweep workdir>/report/`, from the records alone (it imports neither `workers` nor the command).
- `__main__`: the command: its flags, the sweep (checks, study, workers, then the report), `--report` alone.

This file imports none of them, so that importing one loads only what it needs (the report defines no flags).
"""
