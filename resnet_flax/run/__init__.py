"""The run contract: what a workdir holds and how it is written, below everything that trains or reads one.

- `workdir`: run.json (`RunInfo`), the resume and writable checks, the step arithmetic (`Steps`).
- `checkpoint`: Orbax checkpoints: save, keep latest + best, resume; open a workdir's read-only and choose one.
- `writers`: TensorBoard (with or without TensorFlow) and metrics.csv; `curves`: training_curves.png.
- `report_paths`: where an evaluation report lives, and eval/index.json, the list of a workdir's evaluations.
- `distributed`: processes and the ('data',) mesh; `preemption`: SIGTERM/SIGINT at a step boundary.
"""
