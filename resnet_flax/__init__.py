"""resnet_flax: compact ResNets on CIFAR and image folders in JAX/Flax."""
