// The memory plan shown on StepVideo nodes: building the request to the server's
// GET /stepvideo/plan (nodes/routes.py, which runs the pack's planner) and turning its
// JSON answer into short lines. Pure: no app.js import, no fetch, no DOM.

/** The route, relative to ComfyUI's API root (the frontend's api.fetchApi adds "/api"). */
export const PLAN_ROUTE = "/stepvideo/plan";

/** Name of the read-only widget that shows the plan on a node. */
export const PLAN_WIDGET = "stepvideo_plan";

/** Id of the setting "plan for this much free VRAM" (GiB; 0 = the server's GPU). */
export const ASSUMED_VRAM_SETTING = "StepVideo.Plan.AssumedFreeVRAM";

/** Sampler widgets the plan reads, and the loader widgets. */
export const SAMPLER_FIELDS = ["width", "height", "frames", "preset", "steps", "cfg"];
export const LOADER_FIELDS = ["model", "weight_dtype", "attention", "blocks_on_device"];

/** Query parameter order (stable strings make caching and tests simple). */
const QUERY_ORDER = [...SAMPLER_FIELDS, ...LOADER_FIELDS, "free_gb"];

/** Size used for a loader that feeds no sampler: the official 992x544, 204 frames. */
export const OFFICIAL_SIZE = Object.freeze({ width: 992, height: 544, frames: 204 });

/**
 * Returns the plan parameters from a sampler's and a loader's widget values (either may
 * be empty) and the assumed free VRAM in GiB (ignored unless > 0).
 */
export function planParams(samplerValues = {}, loaderValues = {}, assumedFreeGiB = 0) {
  const params = {};
  for (const key of SAMPLER_FIELDS) if (samplerValues[key] !== undefined) params[key] = samplerValues[key];
  for (const key of LOADER_FIELDS) if (loaderValues[key] !== undefined) params[key] = loaderValues[key];
  for (const [key, value] of Object.entries(OFFICIAL_SIZE)) params[key] ??= value;
  const assumed = Number(assumedFreeGiB);
  if (Number.isFinite(assumed) && assumed > 0) params.free_gb = assumed;
  return params;
}

/** Returns the query string (without "?") for `params`, in a fixed order, skipping empty values. */
export function planQuery(params) {
  const search = new URLSearchParams();
  for (const key of QUERY_ORDER) {
    const value = params?.[key];
    if (value === undefined || value === null || value === "") continue;
    search.append(key, String(value));
  }
  return search.toString();
}

/** Returns "fits", "no" (will not fit), "unknown" (no GPU figure: CPU server) or "error". */
export function fitState(response) {
  if (!response || response.error) return "error";
  if (response.fits === true) return "fits";
  if (response.fits === false) return "no";
  return "unknown";
}

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Returns bytes as "21.6 GiB", "14.7 MiB" or "512 KiB". */
export function formatBytes(bytes) {
  const value = Number(bytes);
  if (!Number.isFinite(value)) return "?";
  if (Math.abs(value) >= GiB) return `${(value / GiB).toFixed(1)} GiB`;
  if (Math.abs(value) >= MiB) return `${(value / MiB).toFixed(1)} MiB`;
  return `${Math.round(value / KiB)} KiB`;
}

/** Returns seconds as "0.4 s", "45 s", "38 min" or "2.3 h". */
export function formatDuration(seconds) {
  const s = Number(seconds);
  if (!Number.isFinite(s) || s < 0) return "?";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 90 * 60) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

/** Returns FLOPs as "21.4 PFLOP", "3.1 TFLOP", "856 MFLOP". */
export function formatFlops(flops) {
  const f = Number(flops);
  if (!Number.isFinite(f)) return "?";
  const units = [["EFLOP", 1e18], ["PFLOP", 1e15], ["TFLOP", 1e12], ["GFLOP", 1e9], ["MFLOP", 1e6]];
  for (const [unit, size] of units) if (f >= size) return `${(f / size).toFixed(f >= 100 * size ? 0 : 1)} ${unit}`;
  return `${Math.round(f)} FLOP`;
}

/** Returns what to change when a run does not fit, most effective first. */
export function advice(response) {
  const tips = [];
  if (response?.weight_format !== "fp8_scaled") tips.push("fp8_scaled");
  if (response?.request?.blocks_on_device !== "auto") tips.push("blocks auto");
  tips.push("smaller video");
  return `try ${tips.join(", ")}`;
}

/**
 * Returns the plan as short lines `{ text, level }` for the sampler node (at most about
 * 50 characters, so they fit a node's width); level is "ok", "error" (will not fit: drawn
 * red), "info" or "hint" (notes from the server).
 */
export function planLines(response) {
  if (!response) return [{ text: "VRAM plan: …", level: "info" }];
  if (response.error) return [{ text: `plan: ${response.error}`, level: "error" }];
  const plan = response.plan ?? {};
  const device = response.device ?? {};
  const state = fitState(response);
  const gib = (bytes) => (Number(bytes) / GiB).toFixed(1);
  const blocks = `${plan.blocks_on_device}/${plan.num_blocks} blocks on GPU`;
  const cfg = plan.batch_cfg === false && response.request?.guided ? ", CFG 1 by 1" : "";
  const label = device.assumed_free_bytes != null ? "assumed" : "free";
  const free = `${gib(plan.free_bytes)} GiB ${label}`;
  const lines = [];
  const add = (text, level = "info") => lines.push({ text, level });
  if (state === "unknown") {
    add(`${String(device.type ?? "cpu").toUpperCase()} server: no VRAM to plan`);
    add(`a GPU needs ${formatBytes(plan.peak_bytes)} + ${formatBytes(plan.reserve_bytes)} reserve`);
  } else if (state === "fits") {
    add(`✓ ${blocks}${plan.streamed_blocks ? `, ${plan.streamed_blocks} streamed` : ""}${cfg}`, "ok");
    add(`VRAM ${gib(plan.peak_bytes)} + ${gib(plan.reserve_bytes)} reserve of ${free}`);
  } else {
    add(`✗ WILL NOT FIT: needs ${gib(plan.peak_bytes + plan.reserve_bytes)} GiB, ${gib(plan.free_bytes)} ${label}`,
      "error");
    add(`${blocks}${cfg}`, "error");
    add(advice(response), "error");
  }
  add(`${response.weight_format} weights: ${formatBytes(response.weights_bytes)} in RAM`);
  const time = response.time;
  if (time) add(`≈ ${formatDuration(time.seconds_per_step)}/step, ≈ ${formatDuration(time.seconds)} total (rough)`);
  else add(`${formatFlops(response.flops_per_step)}/step × ${response.steps} steps (no time est.)`);
  for (const note of response.notes ?? []) add(note, "hint");
  return lines;
}

/**
 * Returns the one line shown on the model loader: the verdict for the size of the sampler
 * it feeds (the sampler shows the details), e.g. "992x544x204: ✓ 14/48 blocks on GPU".
 */
export function loaderLine(response) {
  if (!response) return { text: "VRAM plan: …", level: "info" };
  if (response.error) return { text: `plan: ${response.error}`, level: "error" };
  const { plan = {}, request = {} } = response;
  const size = `${request.width}x${request.height}x${request.frames}`;
  const state = fitState(response);
  if (state === "fits") {
    return { text: `${size}: ✓ ${plan.blocks_on_device}/${plan.num_blocks} blocks on GPU`, level: "ok" };
  }
  if (state === "no") {
    const need = ((plan.peak_bytes + plan.reserve_bytes) / GiB).toFixed(1);
    return { text: `${size}: ✗ WILL NOT FIT (needs ${need} GiB)`, level: "error" };
  }
  return { text: `${size}: no VRAM to plan (CPU server)`, level: "info" };
}

/** Returns the plan's lines joined as plain text (what the widget's value holds). */
export function planText(response) {
  return planLines(response).map((line) => line.text).join("\n");
}

/** Returns the tooltip: every line in full, the device, tokens and how the time was estimated. */
export function planTooltip(response) {
  if (!response || response.error) return response?.error ?? "";
  const parts = [planText(response)];
  if (response.model?.error) parts.push(`model: ${response.model.error}`);
  if (response.device?.name) parts.push(`device: ${response.device.name}`);
  if (response.plan?.tokens != null) parts.push(`${Number(response.plan.tokens).toLocaleString("en-US")} video tokens`);
  if (response.time?.basis) parts.push(`time: ${response.time.basis}`);
  return parts.join("\n");
}

/**
 * Returns the warnings to show when a prompt is queued: one message per sampler whose
 * plan says it will not fit. `entries` are `{ title, response }`.
 */
export function queueWarnings(entries) {
  const out = [];
  for (const { title, response } of entries ?? []) {
    if (fitState(response) !== "no") continue;
    const plan = response.plan ?? {};
    const label = response.device?.assumed_free_bytes != null ? "assumed free" : "free";
    out.push(`${title}: needs about ${formatBytes(plan.peak_bytes + plan.reserve_bytes)} of VRAM, `
      + `${formatBytes(plan.free_bytes)} ${label}; the run will likely fail with out of memory (${advice(response)})`);
  }
  return out;
}
