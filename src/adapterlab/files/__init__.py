"""Storage: safetensors files (`safetensors`), atomic writes and locks (`atomic`), adapter
directories (`adapter_dir`) and filling deltas from a file's tensors (`fill`). Nothing here knows a
method by name. docs/architecture.md#files describes the format.
"""
