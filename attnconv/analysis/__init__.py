"""Looking at layers and networks without training them.

* :mod:`attnconv.analysis.profiling` -- parameters, multiply-adds, interleaved timings, the
  memory autograd keeps for backward, and which attention layers a network holds.
* :mod:`attnconv.analysis.complexity` -- the complexity table of whole networks that
  ``attnconv bench`` prints.
* :mod:`attnconv.analysis.figures` -- PNG pictures of what the attention does on one image
  (``attnconv viz``; needs matplotlib).
"""
