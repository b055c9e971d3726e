// Snapping of the sampler's size widgets to values the model accepts. Pure (no app.js import),
// so node's test runner loads it; the browser extension uses the same functions.

/** Step, lower and upper bound of each snapped widget (the Python sampler's limits). */
export const SNAP_RULES = Object.freeze({
  width: Object.freeze({ step: 16, min: 16, max: 4096 }),
  height: Object.freeze({ step: 16, min: 16, max: 4096 }),
  frames: Object.freeze({ step: 17, min: 17, max: 1020 }),
});

/** Frames per second of the videos the pack writes (used only in the hint text). */
export const FPS = 25;

/**
 * Returns the multiple of `step` nearest to `value` (halves round up), kept within
 * [min, max] rounded inwards to multiples of `step`. Non-finite input returns `min`.
 */
export function snapToStep(value, { step, min = step, max = Infinity }) {
  const low = Math.ceil(min / step) * step;
  const high = Number.isFinite(max) ? Math.floor(max / step) * step : Infinity;
  const number = Number(value);
  if (!Number.isFinite(number)) return low;
  const snapped = Math.floor(number / step + 0.5) * step;
  return Math.min(high, Math.max(low, snapped));
}

/** Returns the short explanation of a snapped value, e.g. "width 1000 → 1008 (multiple of 16)". */
export function snapHint(name, from, to) {
  const rule = SNAP_RULES[name];
  if (!rule) return "";
  if (name === "frames") {
    return `frames ${from} → ${to} (multiple of 17, ${(to / FPS).toFixed(1)} s)`;
  }
  return `${name} ${from} → ${to} (multiple of ${rule.step})`;
}

/**
 * Snaps a widget value by name. Returns `{ value, changed, hint }`; widgets without a
 * rule, and values that are already valid, come back unchanged with an empty hint.
 */
export function snapWidgetValue(name, value) {
  const rule = SNAP_RULES[name];
  if (!rule) return { value, changed: false, hint: "" };
  const snapped = snapToStep(value, rule);
  if (snapped === Number(value)) return { value: snapped, changed: false, hint: "" };
  return { value: snapped, changed: true, hint: snapHint(name, value, snapped) };
}
