import { test } from "node:test";
import assert from "node:assert/strict";

import { SNAP_RULES, snapHint, snapToStep, snapWidgetValue } from "../lib/snap.js";

test("rules match the Python sampler's widgets", () => {
  assert.deepEqual({ ...SNAP_RULES.width }, { step: 16, min: 16, max: 4096 });
  assert.deepEqual({ ...SNAP_RULES.height }, { step: 16, min: 16, max: 4096 });
  assert.deepEqual({ ...SNAP_RULES.frames }, { step: 17, min: 17, max: 1020 });
});

test("snapToStep picks the nearest multiple, halves rounding up", () => {
  const rule = { step: 16, min: 16, max: 4096 };
  assert.equal(snapToStep(992, rule), 992);
  assert.equal(snapToStep(1000, rule), 1008); // exactly half way: up
  assert.equal(snapToStep(999, rule), 992);
  assert.equal(snapToStep(1001, rule), 1008);
  assert.equal(snapToStep("540", rule), 544);
});

test("snapToStep stays within the bounds, rounded inwards to multiples", () => {
  assert.equal(snapToStep(0, { step: 16, min: 16, max: 4096 }), 16);
  assert.equal(snapToStep(-50, { step: 17, min: 17, max: 1020 }), 17);
  assert.equal(snapToStep(5000, { step: 16, min: 16, max: 4096 }), 4096);
  assert.equal(snapToStep(1100, { step: 17, min: 17, max: 1020 }), 1020);
  assert.equal(snapToStep(100, { step: 16, min: 20, max: 90 }), 80);
  assert.equal(snapToStep(1, { step: 16, min: 20, max: 90 }), 32);
});

test("snapToStep returns the lowest valid value for garbage", () => {
  assert.equal(snapToStep("abc", { step: 17, min: 17, max: 1020 }), 17);
  assert.equal(snapToStep(NaN, { step: 16, min: 16 }), 16);
  assert.equal(snapToStep(Infinity, { step: 16, min: 16, max: 4096 }), 16);
});

test("frames snap to multiples of 17", () => {
  assert.equal(snapWidgetValue("frames", 100).value, 102);
  assert.equal(snapWidgetValue("frames", 93).value, 85);
  assert.equal(snapWidgetValue("frames", 204).changed, false);
});

test("snapWidgetValue reports a change with a short hint", () => {
  assert.deepEqual(snapWidgetValue("width", 1000),
    { value: 1008, changed: true, hint: "width 1000 → 1008 (multiple of 16)" });
  assert.deepEqual(snapWidgetValue("height", 544), { value: 544, changed: false, hint: "" });
  const frames = snapWidgetValue("frames", 100);
  assert.equal(frames.hint, "frames 100 → 102 (multiple of 17, 4.1 s)");
});

test("widgets without a rule pass through untouched", () => {
  assert.deepEqual(snapWidgetValue("steps", 33), { value: 33, changed: false, hint: "" });
  assert.deepEqual(snapWidgetValue("seed", 1001), { value: 1001, changed: false, hint: "" });
  assert.equal(snapHint("steps", 1, 2), "");
});

test("hints stay short enough for a node", () => {
  for (const [name, value] of [["width", 4095], ["height", 17], ["frames", 1019]]) {
    const { hint } = snapWidgetValue(name, value);
    assert.ok(hint.length <= 48, hint);
  }
});
