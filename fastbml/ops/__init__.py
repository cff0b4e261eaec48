"""The kernel-backed ops, each a `torch.ops.fastbml` operator (registered in `_library.py`) behind
a Python function that takes `backend=` ("torch" runs the plain-PyTorch reference instead)."""
