"""Triton kernels of fastbml (installed as `fastbml.kernels`).

Kernels know nothing of training methods: they scale, add noise, reduce and mask tensors.
Importing this package needs triton; fastbml imports it only when the triton backend runs.
"""
