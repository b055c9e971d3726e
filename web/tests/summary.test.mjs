import { test } from "node:test";
import assert from "node:assert/strict";

import { LOADER_NODE_ID, SUMMARY_WIDGET, findWidget, rowsFor, summaryText } from "../lib/summary.js";

test("the node id matches the Python loader's id", () => {
  assert.equal(LOADER_NODE_ID, "StepVideoModelLoader");
  assert.match(SUMMARY_WIDGET, /^stepvideo_/);
});

test("summaryText takes the loader's text list", () => {
  const output = { text: ["Step-Video DiT: tiny\n2 layers, width 64 (2 heads x 32)"] };
  assert.equal(summaryText(output), "Step-Video DiT: tiny\n2 layers, width 64 (2 heads x 32)");
});

test("summaryText flattens strings and nested lists, dropping blanks and non-strings", () => {
  assert.equal(summaryText({ text: "one" }), "one");
  assert.equal(summaryText({ text: [["a", "  "], ["b"], 3, null, { x: 1 }] }), "a\nb");
});

test("summaryText is empty when there is nothing to show", () => {
  assert.equal(summaryText(undefined), "");
  assert.equal(summaryText({}), "");
  assert.equal(summaryText({ images: [] }), "");
  assert.equal(summaryText({ text: [] }), "");
});

test("rowsFor counts lines within bounds", () => {
  assert.equal(rowsFor("a\nb\nc\nd\ne"), 5);
  assert.equal(rowsFor(""), 2);
  assert.equal(rowsFor("x".repeat(10) + "\n".repeat(40)), 12);
  assert.equal(rowsFor("a\nb\nc", { min: 1, max: 2 }), 2);
});

test("findWidget finds by name and tolerates nodes without widgets", () => {
  const node = { widgets: [{ name: "model" }, { name: SUMMARY_WIDGET, value: "v" }] };
  assert.equal(findWidget(node, SUMMARY_WIDGET).value, "v");
  assert.equal(findWidget(node, "missing"), undefined);
  assert.equal(findWidget({}, SUMMARY_WIDGET), undefined);
  assert.equal(findWidget(null, SUMMARY_WIDGET), undefined);
});
