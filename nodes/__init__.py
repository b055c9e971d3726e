"""ComfyUI nodes of the StepVideo pack: one module per node family, merged here."""

from . import image, lora, model, native, sampler, text, vae

# `native` (Step-Video as a ComfyUI MODEL) registers its nodes only inside ComfyUI.
_FAMILIES = (model, text, vae, image, sampler, lora, native)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _family in _FAMILIES:
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

from . import routes  # noqa: E402 - after the node families: the route uses their choices

routes.register()  # GET /stepvideo/plan on ComfyUI's server (no-op outside ComfyUI)
