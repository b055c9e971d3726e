import { test } from "node:test";
import assert from "node:assert/strict";

import { downstreamSamplers, nodeClass, socketTypes, upstreamLoader, widgetValues } from "../lib/graph.js";

// Tiny stand-ins for litegraph nodes: only the API the helpers use.
function node(type, { inputs = [], outputs = [], widgets = {} } = {}) {
  const n = {
    comfyClass: type,
    inputs: inputs.map((name) => ({ name })),
    outputs: outputs.map((type) => ({ type, targets: [] })),
    widgets: Object.entries(widgets).map(([name, value]) => ({ name, value })),
    sources: {},
    getInputNode(slot) { return this.sources[slot] ?? null; },
    getOutputNodes(slot) { return this.outputs[slot]?.targets ?? null; },
  };
  return n;
}
function link(from, slot, to, inputName) {
  from.outputs[slot].targets.push(to);
  to.sources[to.inputs.findIndex((i) => i.name === inputName)] = from;
}

function chain() {
  const loader = node("StepVideoModelLoader", { outputs: ["STEPVIDEO_MODEL"],
    widgets: { weight_dtype: "fp8_scaled" } });
  const lora = node("StepVideoLoraLoader", { inputs: ["model"], outputs: ["STEPVIDEO_MODEL,MODEL"] });
  const sampler = node("StepVideoSampler", { inputs: ["model", "positive", "negative"], outputs: ["LATENT"],
    widgets: { width: 992, height: 544, frames: 204, seed: 1 } });
  link(loader, 0, lora, "model");
  link(lora, 0, sampler, "model");
  return { loader, lora, sampler };
}

test("nodeClass prefers comfyClass, then type", () => {
  assert.equal(nodeClass({ comfyClass: "A", type: "B" }), "A");
  assert.equal(nodeClass({ type: "B" }), "B");
  assert.equal(nodeClass(null), "");
});

test("widgetValues picks the named widgets", () => {
  const { sampler } = chain();
  assert.deepEqual(widgetValues(sampler, ["width", "frames", "nope"]), { width: 992, frames: 204 });
  assert.deepEqual(widgetValues({}, ["width"]), {});
});

test("upstreamLoader follows the model socket through a LoRA loader", () => {
  const { loader, lora, sampler } = chain();
  assert.equal(upstreamLoader(sampler), loader);
  assert.equal(upstreamLoader(lora), loader);
});

test("upstreamLoader is null for an unconnected sampler or a foreign source", () => {
  const sampler = node("StepVideoSampler", { inputs: ["model"] });
  assert.equal(upstreamLoader(sampler), null);
  const other = node("SomethingElse", { outputs: ["STEPVIDEO_MODEL"] });
  link(other, 0, sampler, "model");
  assert.equal(upstreamLoader(sampler), null);
});

test("upstreamLoader survives a cycle", () => {
  const a = node("StepVideoLoraLoader", { inputs: ["model"], outputs: ["STEPVIDEO_MODEL"] });
  const b = node("StepVideoLoraLoader", { inputs: ["model"], outputs: ["STEPVIDEO_MODEL"] });
  link(a, 0, b, "model");
  link(b, 0, a, "model");
  assert.equal(upstreamLoader(a), null);
});

test("downstreamSamplers finds samplers behind LoRA loaders, ignoring other outputs", () => {
  const { loader, sampler } = chain();
  const second = node("StepVideoSampler", { inputs: ["model"] });
  link(loader, 0, second, "model");
  assert.deepEqual(downstreamSamplers(loader), [second, sampler]);
  assert.deepEqual(downstreamSamplers(sampler), []);
});

test("socketTypes splits ComfyUI's union types", () => {
  assert.deepEqual(socketTypes("STEPVIDEO_MODEL,MODEL"), ["STEPVIDEO_MODEL", "MODEL"]);
  assert.deepEqual(socketTypes(" MODEL "), ["MODEL"]);
  assert.deepEqual(socketTypes(undefined), []);
});
