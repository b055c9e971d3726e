"""ComfyUI-StepVideo: Step-Video-T2V text-to-video nodes for ComfyUI.

ComfyUI imports this folder as a package and reads the V1 registration below. The
model code lives in ``stepvideo_core/`` (pure PyTorch, no ComfyUI imports); the nodes in
``nodes/`` are thin wrappers, and the ``nodes/comfy_bridge/`` package is their only door
into ComfyUI, so this package also imports in plain Python.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
