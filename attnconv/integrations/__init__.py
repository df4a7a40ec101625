"""Bridges to other libraries; each submodule imports its library only when it is imported
(``attnconv.integrations.ultralytics`` needs the ``attnconv[yolo]`` extra)."""
