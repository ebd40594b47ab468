"""What a trained model looks at: Grad-CAM and integrated gradients, and a sanity check of both.

`methods` holds the explanations themselves, written in JAX and compiled for a restored model (`compile_explain`,
`Explanation`, the randomisation sanity check); `resnet_flax.deploy.api.Model.explain` calls them. `command` is
`--mode=explain` (`command.run_explain`), which draws the explanations as a grid and writes them as JSON; it sits
above `resnet_flax.deploy` (it loads models through the Python API), so this package does not import it.
"""
