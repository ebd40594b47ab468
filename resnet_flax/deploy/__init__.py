"""A trained run in use: the Python API (`api`: `resnet_flax.load`), `--mode=predict` (`predict`) and
`--mode=export` to other runtimes."""
