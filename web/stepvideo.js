// StepVideo frontend extension.
// 1. After StepVideoModelLoader runs, show what it loaded in a read-only box on the node.
// 2. On StepVideoSampler and StepVideoModelLoader, a live memory plan from the server's
//    GET /stepvideo/plan (the pack's planner): blocks on the GPU, peak VRAM, a rough time,
//    in red when the run will not fit; a warning when such a prompt is queued; and
//    width/height/frames snapped to multiples of 16/16/17 with a short hint.
// The logic lives in ./lib/*.js (pure, unit-tested); this file only wires it to the page.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LOADER_NODE_ID, SUMMARY_WIDGET, findWidget, rowsFor, summaryText } from "./lib/summary.js";
import { MODEL_LOADER_NODE_ID, SAMPLER_NODE_ID, downstreamSamplers, nodeClass, upstreamLoader, widgetValues }
  from "./lib/graph.js";
import { ASSUMED_VRAM_SETTING, LOADER_FIELDS, PLAN_ROUTE, PLAN_WIDGET, SAMPLER_FIELDS, loaderLine, planLines,
  planParams, planQuery, planText, planTooltip, queueWarnings } from "./lib/plan.js";
import { SNAP_RULES, snapWidgetValue } from "./lib/snap.js";

const LINE_PX = 15;

// --------------------------------------------------------------------------- loader summary

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

function growToFit(node) {
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  app.graph?.setDirtyCanvas(true, true);
}

function showSummary(node, text) {
  const widget = findWidget(node, SUMMARY_WIDGET) ?? createSummaryWidget(node);
  widget.value = text;
  widget.options?.setValue?.(text); // older DOM widgets do not forward .value to setValue
  growToFit(node);
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

// --------------------------------------------------------------------------- memory plan

const PLAN_NODES = [SAMPLER_NODE_ID, MODEL_LOADER_NODE_ID];
const COLORS = { ok: "#5fbf5f", error: "#ff5252", info: "", hint: "#d9a83a" };
const CACHE_MS = 3000;        // answers reused for this long (several nodes ask the same)
const HINT_MS = 10000;        // how long a snapping hint stays on the node
const QUEUE_CHECK_MS = 2500;  // queueing never waits longer than this for a plan
const planCache = new Map();  // query -> { at, promise }
let refreshTimer = null;

function assumedFreeGiB() {
  try {
    return Number(app.extensionManager?.setting?.get?.(ASSUMED_VRAM_SETTING)
      ?? app.ui?.settings?.getSettingValue?.(ASSUMED_VRAM_SETTING) ?? 0) || 0;
  } catch {
    return 0;
  }
}

// The plan answer for `query`, shared by every node asking within CACHE_MS. Failures
// come back as { error } and are shown on the node (never thrown, never a console error).
function fetchPlan(query, fresh = false) {
  const hit = planCache.get(query);
  if (!fresh && hit && Date.now() - hit.at < CACHE_MS) return hit.promise;
  const promise = api.fetchApi(`${PLAN_ROUTE}?${query}`)
    .then(async (res) => {
      const body = await res.json().catch(() => ({}));
      return res.ok ? body : { error: body?.error ?? `HTTP ${res.status} from ${PLAN_ROUTE}` };
    })
    .catch((err) => ({ error: `plan request failed: ${err?.message ?? err}` }));
  planCache.set(query, { at: Date.now(), promise });
  if (planCache.size > 64) planCache.delete(planCache.keys().next().value);
  return promise;
}

// The query for one plan node: a sampler takes the loader upstream of it, a loader the
// first sampler downstream of it (or the official size when it feeds none).
function queryFor(node) {
  if (nodeClass(node) === SAMPLER_NODE_ID) {
    const loader = upstreamLoader(node);
    const loaderValues = loader ? widgetValues(loader, LOADER_FIELDS) : {};
    return planQuery(planParams(widgetValues(node, SAMPLER_FIELDS), loaderValues, assumedFreeGiB()));
  }
  const sampler = downstreamSamplers(node)[0];
  const samplerValues = sampler ? widgetValues(sampler, SAMPLER_FIELDS) : {};
  return planQuery(planParams(samplerValues, widgetValues(node, LOADER_FIELDS), assumedFreeGiB()));
}

function createPlanWidget(node) {
  if (typeof node.addDOMWidget === "function") {
    const box = document.createElement("div");
    box.className = "stepvideo-plan";
    box.style.cssText = `font:11px/${LINE_PX}px monospace;overflow:hidden;padding:2px 4px;`
      + "box-sizing:border-box;width:100%;";
    let text = "";
    const widget = node.addDOMWidget(PLAN_WIDGET, "stepvideo_plan", box, {
      getValue: () => text,
      setValue: (v) => { text = v ?? ""; },
      getMinHeight: () => Math.max(1, box.childElementCount) * LINE_PX + 14,
      serialize: false,
    });
    widget.serialize = false;
    widget.stepvideoBox = box;
    return widget;
  }
  const widget = node.addWidget("text", PLAN_WIDGET, "", () => {}, { serialize: false });
  widget.serialize = false;
  widget.disabled = true;
  return widget;
}

function currentHints(node) {
  const now = Date.now();
  node.stepvideoHints = (node.stepvideoHints ?? []).filter((hint) => hint.until > now);
  return node.stepvideoHints.map((hint) => ({ text: hint.text, level: "hint" }));
}

function renderPlan(node, response) {
  if (response !== undefined) node.stepvideoPlan = response;
  const lines = nodeClass(node) === MODEL_LOADER_NODE_ID
    ? [loaderLine(node.stepvideoPlan)]
    : [...currentHints(node), ...planLines(node.stepvideoPlan)];
  const widget = findWidget(node, PLAN_WIDGET) ?? createPlanWidget(node);
  const text = lines.map((line) => line.text).join("\n");
  widget.value = text;
  widget.options?.setValue?.(text);
  const box = widget.stepvideoBox;
  if (box) {
    box.replaceChildren(...lines.map((line) => {
      const row = document.createElement("div");
      row.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis;";
      row.textContent = line.text;
      if (COLORS[line.level]) row.style.color = COLORS[line.level];
      if (line.level === "error") row.style.fontWeight = "bold";
      return row;
    }));
    box.title = planTooltip(node.stepvideoPlan);
  }
  growToFit(node);
}

async function refreshNode(node, fresh = false) {
  const query = queryFor(node);
  node.stepvideoQuery = query;
  const response = await fetchPlan(query, fresh);
  if (node.stepvideoQuery === query) renderPlan(node, response); // a newer request wins
  return response;
}

function planNodes() {
  return (app.graph?.nodes ?? []).filter((node) => PLAN_NODES.includes(nodeClass(node)));
}

function refreshAll() {
  refreshTimer = null;
  for (const node of planNodes()) refreshNode(node);
}

function scheduleRefresh(delay = 250) {
  if (refreshTimer) clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshAll, delay);
}

function addHint(node, text) {
  node.stepvideoHints = [...(node.stepvideoHints ?? []), { text, until: Date.now() + HINT_MS }];
  renderPlan(node);
  setTimeout(() => renderPlan(node), HINT_MS + 50);
}

// Wraps the callbacks of the widgets a plan depends on (the frontend calls a widget's
// callback after every user edit): snap sizes, then re-plan.
function watchWidgets(node) {
  const names = nodeClass(node) === SAMPLER_NODE_ID ? SAMPLER_FIELDS : LOADER_FIELDS;
  for (const widget of node.widgets ?? []) {
    if (!names.includes(widget?.name) || widget.stepvideoWatched) continue;
    widget.stepvideoWatched = true;
    const original = widget.callback;
    widget.callback = function (value, ...rest) {
      if (SNAP_RULES[widget.name]) {
        const snapped = snapWidgetValue(widget.name, widget.value);
        if (snapped.changed) {
          widget.value = snapped.value;
          value = snapped.value;
          addHint(node, snapped.hint);
        }
      }
      const result = original?.call(this, value, ...rest);
      scheduleRefresh();
      return result;
    };
  }
}

async function warnBeforeQueue() {
  const samplers = planNodes().filter((node) => nodeClass(node) === SAMPLER_NODE_ID && !node.mode);
  const entries = await Promise.all(samplers.map(async (node) => ({
    title: `${node.title || "StepVideo Sampler"} #${node.id}`,
    response: await refreshNode(node, true),
  })));
  for (const warning of queueWarnings(entries)) {
    console.warn(`StepVideo: ${warning}`);
    app.extensionManager?.toast?.add?.({
      severity: "warn", summary: "StepVideo: this run may not fit in VRAM", detail: warning, life: 10000,
    });
  }
}

app.registerExtension({
  name: "StepVideo.MemoryPlan",
  settings: [{
    id: ASSUMED_VRAM_SETTING,
    category: ["StepVideo", "Memory plan", "Assumed free VRAM"],
    name: "Plan for this much free VRAM (GiB; 0 = the server's GPU)",
    tooltip: "The memory plan on StepVideo nodes normally uses the free memory of the server's GPU. "
      + "Set a size here to plan for another card, e.g. 24 when the server has no GPU.",
    type: "number",
    defaultValue: 0,
    attrs: { min: 0, max: 1024, step: 1 },
    onChange: () => scheduleRefresh(0),
  }],
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.name ?? "").startsWith("StepVideo")) return;
    const previousConnections = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const result = previousConnections?.apply(this, arguments);
      scheduleRefresh();
      return result;
    };
    if (!PLAN_NODES.includes(nodeData.name)) return;
    const previousCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = previousCreated?.apply(this, arguments);
      watchWidgets(this);
      createPlanWidget(this);
      scheduleRefresh();
      return result;
    };
  },
  loadedGraphNode(node) {
    if (PLAN_NODES.includes(nodeClass(node))) scheduleRefresh();
  },
  afterConfigureGraph() {
    scheduleRefresh();
  },
  async setup() {
    api.addEventListener("status", () => scheduleRefresh(1000)); // free VRAM changes with the queue
    const original = app.queuePrompt;
    if (typeof original !== "function" || original.stepvideoWrapped) return;
    const wrapped = async function (...args) {
      const timeout = new Promise((resolve) => setTimeout(resolve, QUEUE_CHECK_MS));
      await Promise.race([warnBeforeQueue().catch((err) => console.warn("StepVideo: plan check failed", err)),
        timeout]);
      return original.apply(this, args);
    };
    wrapped.stepvideoWrapped = true;
    app.queuePrompt = wrapped;
  },
});

// exposed for the headless UI test and for debugging from the browser console
window.stepvideoPlan = { refreshAll, refreshNode, planText, queryFor, warnBeforeQueue };
