"""Triton kernels of resnet-fused, shipped as ``resnet_fused.triton_kernels``.

This folder is installed through the symlink ``resnet_fused/triton_kernels``: the top-level import
name ``triton_kernels`` belongs to the PyPI package ``triton-kernels``.
"""
