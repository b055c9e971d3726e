// Finding the nodes a memory plan depends on, through the litegraph node API only
// (getInputNode / getOutputNodes / widgets), so tests can pass plain objects.

export const SAMPLER_NODE_ID = "StepVideoSampler";
export const MODEL_LOADER_NODE_ID = "StepVideoModelLoader";
export const MODEL_INPUT = "model";

/** Returns the node's class id (the Python node id), whatever the frontend calls it. */
export function nodeClass(node) {
  return node?.comfyClass ?? node?.type ?? "";
}

/** Returns `{name: value}` for the node's widgets named in `names` (missing ones are left out). */
export function widgetValues(node, names) {
  const out = {};
  for (const widget of node?.widgets ?? []) {
    if (names.includes(widget?.name)) out[widget.name] = widget.value;
  }
  return out;
}

/**
 * Returns the StepVideoModelLoader feeding `node`'s "model" input, following model
 * sockets through nodes in between (LoRA loaders), or null when there is none.
 */
export function upstreamLoader(node, maxDepth = 32) {
  let current = node;
  const seen = new Set();
  for (let depth = 0; depth < maxDepth && current && !seen.has(current); depth++) {
    seen.add(current);
    const slot = (current.inputs ?? []).findIndex((input) => input?.name === MODEL_INPUT);
    if (slot < 0) return null;
    const source = current.getInputNode?.(slot);
    if (!source) return null;
    if (nodeClass(source) === MODEL_LOADER_NODE_ID) return source;
    current = source;
  }
  return null;
}

/**
 * The types a socket accepts or carries: ComfyUI writes a union as "A,B" (e.g. the LoRA
 * loader's "STEPVIDEO_MODEL,MODEL").
 */
export function socketTypes(type) {
  return String(type ?? "").split(",").map((t) => t.trim()).filter(Boolean);
}

/**
 * Returns the StepVideoSampler nodes that `node`'s model output reaches, following model
 * sockets through nodes in between (LoRA loaders), in the order found.
 */
export function downstreamSamplers(node, maxNodes = 256) {
  const found = [];
  const queue = [node];
  const seen = new Set([node]);
  while (queue.length && seen.size <= maxNodes) {
    const current = queue.shift();
    (current.outputs ?? []).forEach((output, slot) => {
      if (!socketTypes(output?.type).includes("STEPVIDEO_MODEL")) return;
      for (const target of current.getOutputNodes?.(slot) ?? []) {
        if (!target || seen.has(target)) continue;
        seen.add(target);
        if (nodeClass(target) === SAMPLER_NODE_ID) found.push(target);
        else queue.push(target);
      }
    });
  }
  return found;
}
