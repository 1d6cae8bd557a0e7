"""Small-scale DSCLoRA reproduction (issue #8): a SPAN-style SR network, data, and the run script."""
