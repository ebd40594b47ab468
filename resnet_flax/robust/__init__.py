"""Robustness: adversarial attacks for evaluation (`attacks`), adversarial training (`adversarial`), and the
CIFAR-10-C corruptions with their cache and report (`corruptions`)."""
