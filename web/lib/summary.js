// Pure helpers for the StepVideo frontend extension. No imports of ComfyUI's app.js here,
// so node's test runner can load this module; the browser loads it too (side-effect free).

/** Node id whose summary this extension shows. */
export const LOADER_NODE_ID = "StepVideoModelLoader";

/** Name of the read-only widget that holds the summary on the node. */
export const SUMMARY_WIDGET = "stepvideo_summary";

/**
 * Returns the summary text carried by a node's "executed" UI output, or "" when none.
 *
 * The Python node sends `{"text": ["line\nline..."]}`; ComfyUI may deliver a string, a
 * list, or (when outputs are merged) a nested list, so all of them are flattened here.
 * Non-string items are ignored rather than shown as "[object Object]".
 */
export function summaryText(output) {
  const collected = [];
  const visit = (value) => {
    if (typeof value === "string") {
      if (value.trim()) collected.push(value.trim());
    } else if (Array.isArray(value)) {
      value.forEach(visit);
    }
  };
  visit(output?.text);
  return collected.join("\n");
}

/**
 * Returns how many text rows the summary box needs: one per line, clamped to [min, max],
 * so the node grows with the summary without becoming huge.
 */
export function rowsFor(text, { min = 2, max = 12 } = {}) {
  const lines = text ? String(text).split("\n").length : 0;
  return Math.min(max, Math.max(min, lines));
}

/** Returns the widget named `name` on `node`, or undefined. */
export function findWidget(node, name) {
  return (node?.widgets ?? []).find((w) => w?.name === name);
}
