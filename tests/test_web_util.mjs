// The web extension's pure functions (web/js/sparse_avatar_util.js), run with `node --test`
// (tests/test_web_js.py runs this file from pytest when node is installed).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  addLossPoint,
  clampRange,
  formatDuration,
  formatLoss,
  formatTime,
  lossPolyline,
  pairChoiceBody,
  pairFromOutput,
  parseFileWidgetValue,
  parseTrainEvent,
  selectedSpan,
  trainStatusText,
  videoFromOutput,
  viewPath,
} from "../web/js/sparse_avatar_util.js";

test("formatTime", () => {
  assert.equal(formatTime(0), "0:00.0");
  assert.equal(formatTime(5.04), "0:05.0");
  assert.equal(formatTime(65.26), "1:05.3");
  assert.equal(formatTime(59.96), "1:00.0"); // rounding carries into the minutes
  assert.equal(formatTime(3725.5), "1:02:05.5");
  assert.equal(formatTime(7, 0), "0:07");
  for (const bad of [NaN, -1, Infinity, undefined, "3"]) assert.equal(formatTime(bad), "--:--");
});

test("formatDuration and formatLoss", () => {
  assert.equal(formatDuration(4.4), "4 s");
  assert.equal(formatDuration(125), "2 min 5 s");
  assert.equal(formatDuration(3 * 3600 + 120), "3 h 2 min");
  assert.equal(formatDuration(NaN), "");
  assert.equal(formatLoss(0.12345), "0.1235");
  assert.equal(formatLoss(0.000123), "1.23e-4");
  assert.equal(formatLoss(null), "-");
});

test("clampRange keeps start before end inside the clip; end 0 is the clip's end", () => {
  assert.deepEqual(clampRange(1.04, 3.97, 10), { start: 1, end: 4 });
  assert.deepEqual(clampRange(-2, 0, 10), { start: 0, end: 0 });
  assert.deepEqual(clampRange(4, 2, 10), { start: 4, end: 0 }, "an end before the start means the clip's end");
  assert.deepEqual(clampRange(12, 0, 10), { start: 9.9, end: 0 }, "start stays inside the clip");
  assert.deepEqual(clampRange(2, 10, 10), { start: 2, end: 0 }, "an end at the clip's end is written as 0");
  assert.deepEqual(clampRange(2, 30, NaN), { start: 2, end: 30 }, "unknown duration: only the order is checked");
  assert.deepEqual(clampRange(NaN, NaN, 10), { start: 0, end: 0 });
  assert.deepEqual(selectedSpan(2, 0, 10), { from: 2, to: 10 });
  assert.deepEqual(selectedSpan(2, 5, 10), { from: 2, to: 5 });
  assert.ok(Number.isNaN(selectedSpan(2, 0, NaN).to));
});

test("parseFileWidgetValue refuses paths that leave ComfyUI's folders", () => {
  assert.deepEqual(parseFileWidgetValue("clip.mp4"), { filename: "clip.mp4", subfolder: "", type: "input" });
  assert.deepEqual(parseFileWidgetValue("people/anna.mov [output]"), { filename: "anna.mov", subfolder: "people", type: "output" });
  for (const bad of ["", "../x.mp4", "/etc/passwd", "a/../../b.mp4", "C:\\x.mp4", "a//b.mp4", null, 3]) {
    assert.equal(parseFileWidgetValue(bad), null, String(bad));
  }
});

test("viewPath builds ComfyUI /view queries and only for its folders", () => {
  assert.equal(viewPath({ filename: "a b&c.mp4", subfolder: "x/y", type: "temp" }),
    "/view?filename=a+b%26c.mp4&type=temp&subfolder=x%2Fy");
  assert.equal(viewPath({ filename: "a.mp4" }, { t: 5 }), "/view?filename=a.mp4&type=output&subfolder=&t=5");
  assert.equal(viewPath({ filename: "a.mp4", type: "models" }), null);
  assert.equal(viewPath({ filename: "../a.mp4" }), null);
  assert.equal(viewPath({ filename: "a.mp4", subfolder: "../../etc" }), null);
  assert.equal(viewPath({ filename: "" }), null);
  assert.equal(viewPath(null), null);
});

test("UI outputs of Decode Avatar Video and Preference Pair", () => {
  const clip = { filename: "sparse_avatar_preview_00001.mp4", subfolder: "", type: "temp", format: "video/mp4" };
  assert.deepEqual(videoFromOutput({ sparse_avatar_video: [{ filename: "../x", type: "temp" }, clip] }), clip);
  assert.equal(videoFromOutput({ images: [clip] }), null);
  const a = { filename: "pair_00001_a.mp4", subfolder: "sparse-avatar/preferences/s", type: "output" };
  const b = { ...a, filename: "pair_00001_b.mp4" };
  const pair = pairFromOutput({ sparse_avatar_pair: [{ pairs_name: "s", pair: "pair_00001", a, b }] });
  assert.deepEqual(pair, { pairsName: "s", pair: "pair_00001", a, b });
  assert.equal(pairFromOutput({ sparse_avatar_pair: [{ pairs_name: "s", pair: "p", a, b: { filename: "" } }] }), null);
  assert.deepEqual(JSON.parse(pairChoiceBody(pair, "b")), { pairs_name: "s", pair: "pair_00001", winner: "B" });
  assert.throws(() => pairChoiceBody(pair, "c"), /winner/);
});

test("parseTrainEvent and the status line", () => {
  const running = parseTrainEvent({ node: 7, state: "running", step: 25, total: 100, loss: 0.5, elapsed_s: 10 });
  assert.deepEqual(running, { node: "7", state: "running", step: 25, total: 100, loss: 0.5, elapsed: 10,
    fraction: 0.25, remaining: 30, file: null });
  assert.equal(trainStatusText(running), "step 25/100 · loss 0.5000 · 30 s left");
  // A resumed job: 25 of 100 after 10 s of this run, which began at step 20: the node's estimate wins.
  assert.equal(parseTrainEvent({ state: "running", step: 25, total: 100, elapsed_s: 10, remaining_s: 150 }).remaining, 150);
  assert.equal(parseTrainEvent({ state: "running", step: 25, total: 100, elapsed_s: 10, remaining_s: null }).remaining, null);
  const cancelled = parseTrainEvent({ node: "7", state: "cancelled", step: 30, total: 100, loss: null, file: "a_00001.safetensors" });
  assert.equal(cancelled.remaining, null);
  assert.equal(trainStatusText(cancelled), "cancelled at step 30/100; kept a_00001.safetensors");
  const saved = parseTrainEvent({ state: "saved", step: 100, total: 100, loss: 0.1, file: "a_00002.safetensors" });
  assert.equal(trainStatusText(saved), "saved a_00002.safetensors (100 steps · loss 0.1000)");
  for (const bad of [null, "x", { state: "exploded", step: 1, total: 2 }, { state: "running", step: 1.5, total: 2 },
    { state: "running", step: 1, total: 0 }]) {
    assert.equal(parseTrainEvent(bad), null);
  }
});

test("the loss curve: points, restarts, thinning and scaling", () => {
  let points = [];
  for (const [step, loss] of [[1, 1.0], [2, null], [3, 0.5], [3, 0.5], [4, 0.25]]) {
    points = addLossPoint(points, parseTrainEvent({ state: "running", step, total: 10, loss }));
  }
  assert.deepEqual(points, [[1, 1], [3, 0.5], [4, 0.25]]);
  assert.deepEqual(addLossPoint(points, parseTrainEvent({ state: "running", step: 1, total: 5, loss: 2 })), [[1, 2]]);
  let many = [];
  for (let step = 1; step <= 50; step += 1) many = addLossPoint(many, { step, loss: 1 / step }, 10);
  assert.ok(many.length <= 10 && many[0][0] === 1 && many[many.length - 1][0] === 50);
  const line = lossPolyline([[0, 1], [10, 0]], 104, 54, 2);
  assert.deepEqual(line, [[2, 2], [102, 52]]); // highest loss at the top left, lowest at the bottom right
  assert.deepEqual(lossPolyline([[5, 0.3]], 100, 50), [[50, 25]]);
  assert.deepEqual(lossPolyline([], 100, 50), []);
});
