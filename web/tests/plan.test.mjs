import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import { ASSUMED_VRAM_SETTING, LOADER_FIELDS, PLAN_ROUTE, PLAN_WIDGET, SAMPLER_FIELDS, advice, fitState,
  formatBytes, formatDuration, formatFlops, loaderLine, planLines, planParams, planQuery, planText, planTooltip,
  queueWarnings } from "../lib/plan.js";

// Real answers of GET /stepvideo/plan, written by tests/nodes/test_routes.py (which fails when
// they drift from what the route returns).
const fixture = (name) => JSON.parse(readFileSync(new URL(`./fixtures/${name}.json`, import.meta.url), "utf8"));
const FITS = fixture("plan_gpu_fits");        // H100, fp8_scaled, everything on the GPU
const STREAMS = fixture("plan_gpu_streams");  // RTX 4090, bf16, 102 frames: 5 blocks + streaming
const NO_FIT = fixture("plan_gpu_no_fit");    // RTX 4090, bf16, blocks_on_device all
const CPU = fixture("plan_cpu_tiny");         // CPU server, tiny model
const BAD = fixture("plan_bad_size");         // HTTP 400 body

test("constants name the route, the widget and the setting", () => {
  assert.equal(PLAN_ROUTE, "/stepvideo/plan");
  assert.match(PLAN_WIDGET, /^stepvideo_/);
  assert.match(ASSUMED_VRAM_SETTING, /^StepVideo\./);
  assert.deepEqual(SAMPLER_FIELDS, ["width", "height", "frames", "preset", "steps", "cfg"]);
  assert.deepEqual(LOADER_FIELDS, ["model", "weight_dtype", "attention", "blocks_on_device"]);
});

test("planParams merges sampler and loader values and the assumed VRAM", () => {
  const params = planParams({ width: 512, height: 320, frames: 51, seed: 3, cfg: 0 },
    { model: "stepvideo-t2v", weight_dtype: "fp8_scaled", blocks_on_device: "auto", extra: 1 }, 24);
  assert.deepEqual(params, { width: 512, height: 320, frames: 51, cfg: 0, model: "stepvideo-t2v",
    weight_dtype: "fp8_scaled", blocks_on_device: "auto", free_gb: 24 });
});

test("planParams falls back to the official size and ignores a zero or bad assumed VRAM", () => {
  assert.deepEqual(planParams({}, {}, 0), { width: 992, height: 544, frames: 204 });
  assert.deepEqual(planParams(undefined, undefined, "x"), { width: 992, height: 544, frames: 204 });
  assert.equal(planParams({}, {}, -3).free_gb, undefined);
});

test("planQuery has a fixed order, encodes values and skips empty ones", () => {
  const query = planQuery({ model: "sub dir/a+b.safetensors", frames: 17, width: 64, height: 64, cfg: 0,
    attention: "", preset: null, free_gb: 24 });
  assert.equal(query, "width=64&height=64&frames=17&cfg=0&model=sub+dir%2Fa%2Bb.safetensors&free_gb=24");
  assert.equal(new URLSearchParams(query).get("model"), "sub dir/a+b.safetensors");
  assert.equal(planQuery({}), "");
});

test("fitState reads the route's verdict", () => {
  assert.equal(fitState(FITS), "fits");
  assert.equal(fitState(STREAMS), "fits");
  assert.equal(fitState(NO_FIT), "no");
  assert.equal(fitState(CPU), "unknown");
  assert.equal(fitState(BAD), "error");
  assert.equal(fitState(undefined), "error");
});

test("formatters pick readable units", () => {
  assert.equal(formatBytes(21.6 * 2 ** 30), "21.6 GiB");
  assert.equal(formatBytes(14.7 * 2 ** 20), "14.7 MiB");
  assert.equal(formatBytes(512 * 1024), "512 KiB");
  assert.equal(formatBytes(undefined), "?");
  assert.equal(formatDuration(0.42), "0.4 s");
  assert.equal(formatDuration(45.2), "45 s");
  assert.equal(formatDuration(38 * 60), "38 min");
  assert.equal(formatDuration(3 * 3600), "3.0 h");
  assert.equal(formatDuration(-1), "?");
  assert.equal(formatFlops(2.14e16), "21.4 PFLOP");
  assert.equal(formatFlops(856096768), "856 MFLOP");
  assert.equal(formatFlops(3.1e12), "3.1 TFLOP");
  assert.equal(formatFlops(12), "12 FLOP");
});

test("a plan that fits says how many blocks stay on the GPU", () => {
  const lines = planLines(FITS);
  assert.deepEqual(lines[0], { text: "✓ 48/48 blocks on GPU", level: "ok" });
  assert.match(lines[1].text, /^VRAM 46\.5 \+ \d+\.\d reserve of 79\.0 GiB free$/);
  assert.equal(lines[2].text, "fp8_scaled weights: 27.7 GiB in RAM");
  assert.match(lines[3].text, /^≈ 43 s\/step, ≈ 36 min total \(rough\)$/);
  assert.ok(lines.every((line) => line.level !== "error"));
});

test("a streamed plan names the streamed blocks", () => {
  assert.equal(planLines(STREAMS)[0].text, "✓ 8/48 blocks on GPU, 40 streamed");
});

test("a plan that does not fit is red and says what to change", () => {
  const lines = planLines(NO_FIT);
  assert.equal(lines[0].level, "error");
  assert.equal(lines[0].text, "✗ WILL NOT FIT: needs 67.1 GiB, 23.0 free");
  assert.equal(lines[1].level, "error");
  assert.deepEqual(lines[1], { text: "48/48 blocks on GPU, CFG 1 by 1", level: "error" });
  assert.deepEqual(lines[2], { text: "try fp8_scaled, blocks auto, smaller video", level: "error" });
  assert.equal(advice(FITS), "try smaller video");
});

test("a CPU server shows what a GPU would need and no time", () => {
  const lines = planLines(CPU);
  assert.equal(lines[0].text, "CPU server: no VRAM to plan");
  assert.match(lines[1].text, /^a GPU needs 14\.5 MiB \+ 1\.0 GiB reserve$/);
  assert.equal(lines[2].text, "fp32 weights: 10.6 MiB in RAM");
  assert.equal(lines[3].text, "856 MFLOP/step × 50 steps (no time est.)");
  assert.ok(lines.every((line) => line.level === "info"));
});

test("the loader gets one verdict line for its sampler's size", () => {
  assert.deepEqual(loaderLine(FITS), { text: "992x544x204: ✓ 48/48 blocks on GPU", level: "ok" });
  assert.deepEqual(loaderLine(STREAMS), { text: "992x544x102: ✓ 8/48 blocks on GPU", level: "ok" });
  assert.deepEqual(loaderLine(NO_FIT), { text: "992x544x204: ✗ WILL NOT FIT (needs 67.1 GiB)", level: "error" });
  assert.deepEqual(loaderLine(CPU), { text: "64x64x17: no VRAM to plan (CPU server)", level: "info" });
  assert.equal(loaderLine(BAD).level, "error");
  assert.equal(loaderLine(undefined).text, "VRAM plan: …");
});

test("errors and pending answers have one line", () => {
  assert.deepEqual(planLines(BAD), [{ text: `plan: ${BAD.error}`, level: "error" }]);
  assert.match(BAD.error, /nearest valid: 992 or 1008/);
  assert.deepEqual(planLines(undefined), [{ text: "VRAM plan: …", level: "info" }]);
});

test("server notes become hint lines", () => {
  const lines = planLines({ ...CPU, notes: ["no model chosen: planned for the 30B release"] });
  assert.deepEqual(lines.at(-1), { text: "no model chosen: planned for the 30B release", level: "hint" });
});

test("lines stay short enough for a node", () => {
  const notes = ["no model chosen: planned for the 30B release", "model not read: planned for the 30B release",
    "auto dtype, format unknown: planned as fp32"];
  for (const response of [FITS, STREAMS, NO_FIT, { ...CPU, notes }]) {
    for (const line of [...planLines(response), loaderLine(response)]) assert.ok(line.text.length <= 50, line.text);
  }
});

test("planText and the tooltip carry every line, the device and the time basis", () => {
  assert.equal(planText(FITS), planLines(FITS).map((l) => l.text).join("\n"));
  const tip = planTooltip(FITS);
  assert.ok(tip.startsWith(planText(FITS)));
  assert.match(tip, /device: NVIDIA H100 80GB HBM3/);
  assert.match(tip, /75,888 video tokens/);
  assert.match(tip, /time: FLOPs \/ \(50% of 989 TFLOPS datasheet BF16\)/);
  assert.equal(planTooltip(BAD), BAD.error);
});

test("queueWarnings lists only samplers that will not fit", () => {
  const warnings = queueWarnings([
    { title: "StepVideo Sampler #7", response: NO_FIT },
    { title: "StepVideo Sampler #8", response: FITS },
    { title: "StepVideo Sampler #9", response: CPU },
    { title: "StepVideo Sampler #10", response: BAD },
  ]);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /^StepVideo Sampler #7: needs about 67\.1 GiB of VRAM, 23\.0 GiB free; .*out of memory/);
  assert.deepEqual(queueWarnings(undefined), []);
  const assumed = { ...NO_FIT, device: { ...NO_FIT.device, assumed_free_bytes: 24 * 2 ** 30 } };
  assert.match(queueWarnings([{ title: "S", response: assumed }])[0], /23\.0 GiB assumed free;/);
});
