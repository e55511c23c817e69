"""Consistent capture while training runs: staging buffers, the async Checkpointer, thread pools."""
