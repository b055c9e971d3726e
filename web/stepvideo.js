// StepVideo frontend extension: after StepVideoModelLoader runs, show what it loaded
// (layers, width, parameters, dtype, load time) in a read-only box on the node.
import { app } from "../../scripts/app.js";
import { LOADER_NODE_ID, SUMMARY_WIDGET, findWidget, rowsFor, summaryText } from "./lib/summary.js";

const LINE_PX = 15;

// Creates the read-only summary widget, preferring a DOM textarea (multi-line, selectable
// text) and falling back to a plain litegraph text widget on frontends without DOM widgets.
function createSummaryWidget(node) {
  if (typeof node.addDOMWidget === "function") {
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.spellcheck = false;
    box.style.cssText = `width:100%;resize:none;opacity:0.75;font:11px/${LINE_PX}px monospace;`;
    const widget = node.addDOMWidget(SUMMARY_WIDGET, "stepvideo_summary", box, {
      getValue: () => box.value,
      setValue: (v) => { box.value = v ?? ""; },
      // the node layout asks for this; one row per summary line, plus the box's padding
      getMinHeight: () => rowsFor(box.value) * LINE_PX + 12,
      serialize: false,
    });
    widget.serialize = false;
    return widget;
  }
  const widget = node.addWidget("text", SUMMARY_WIDGET, "", () => {}, { serialize: false });
  widget.serialize = false;
  widget.disabled = true;
  return widget;
}

function showSummary(node, text) {
  const widget = findWidget(node, SUMMARY_WIDGET) ?? createSummaryWidget(node);
  widget.value = text;
  widget.options?.setValue?.(text); // older DOM widgets do not forward .value to setValue
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  app.graph?.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "StepVideo.ModelLoaderSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== LOADER_NODE_ID) return;
    const previous = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      previous?.apply(this, arguments);
      const text = summaryText(output);
      if (text) showSummary(this, text);
    };
  },
});
