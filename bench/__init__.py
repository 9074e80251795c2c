"""Speed comparisons of the fused ops against eager PyTorch: `python -m bench --help`."""
