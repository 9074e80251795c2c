"""Experiments run with the fused models: `python -m resnet_fused.experiments.plain_vs_residual` (plain vs
residual networks, the degradation problem), on the synthetic task of `resnet_fused.experiments.synthetic`."""
