"""Reference implementations for tests and benchmarks, as ``torch.testing`` is for torch.

:mod:`attnconv.testing.reference_rfa` holds faithful ports of the official RFAConv modules:
slow on purpose, the yardstick the layers are checked and timed against.
"""
