"""Backend-dispatching ops: each takes `backend=` and runs the torch, cpp or triton implementation."""
