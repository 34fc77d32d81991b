// sparse-avatar's ComfyUI web extension (loaded by ComfyUI from the pack's WEB_DIRECTORY):
//   Decode Avatar Video  - an inline player (with the sound) of the rendered video
//   Load Reference Video - a start/end range picker driven by scrubbing the chosen clip
//   Train Avatar         - progress, the loss curve, and a Cancel that keeps what was trained
//   Preference Pair      - both renderings side by side; a click on the better one appends the pair
// Text that comes from files, nodes or the server goes in with textContent only, never as markup.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import {
  PAIR_ROUTE,
  TRAIN_EVENT,
  addLossPoint,
  clampRange,
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
} from "./sparse_avatar_util.js";

const NODES = {
  decode: "SparseAvatarDecodeVideo",
  reference: "SparseAvatarLoadReferenceVideo",
  train: "SparseAvatarTrain",
  pair: "SparseAvatarPreferencePair",
};

const STYLE = `
.sa-box { display: flex; flex-direction: column; gap: 4px; font: 12px sans-serif; color: var(--input-text, #ddd); box-sizing: border-box; }
.sa-box > * { flex-shrink: 0; }
.sa-box video { width: 100%; max-height: 100%; background: #000; border-radius: 4px; min-height: 0; flex-shrink: 1; }
.sa-row { display: flex; gap: 4px; align-items: center; flex-wrap: wrap; }
.sa-row button, .sa-box > button { background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); border: 1px solid var(--border-color, #555); border-radius: 4px; padding: 2px 8px; cursor: pointer; font: 12px sans-serif; }
.sa-row button:disabled, .sa-box > button:disabled { opacity: 0.45; cursor: default; }
.sa-note { opacity: 0.85; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.sa-error { color: #f77; white-space: normal; }
.sa-wrap { white-space: normal; }
.sa-bar { position: relative; height: 16px; background: #333; border-radius: 3px; cursor: pointer; touch-action: none; }
.sa-bar .sa-sel { position: absolute; top: 0; bottom: 0; background: rgba(80, 160, 255, 0.55); border-radius: 3px; }
.sa-bar .sa-head { position: absolute; top: -2px; bottom: -2px; width: 2px; background: #fff; }
.sa-progress { height: 10px; background: #333; border-radius: 3px; overflow: hidden; }
.sa-progress > div { height: 100%; width: 0; background: #4a9; transition: width 0.2s; }
.sa-progress.sa-cancelled > div { background: #c93; }
.sa-ab { display: grid; grid-template-columns: 1fr 1fr; gap: 6px; min-height: 0; }
.sa-ab > div { display: flex; flex-direction: column; gap: 3px; min-width: 0; }
.sa-ab .sa-chosen video { outline: 3px solid #4a9; }
`;

function addStyle() {
  if (document.getElementById("sparse-avatar-style")) return;
  const style = document.createElement("style");
  style.id = "sparse-avatar-style";
  style.textContent = STYLE;
  document.head.append(style);
}

/** Run `callback` after whatever `object[property]` already did (other extensions chain the same way). */
function chainCallback(object, property, callback) {
  const original = object[property];
  object[property] = function (...args) {
    const result = original?.apply(this, args);
    const ours = callback.apply(this, args);
    return ours ?? result;
  };
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick) {
  const node = element("button", "", label);
  node.type = "button";
  node.addEventListener("click", (event) => {
    event.stopPropagation();
    onClick(event);
  });
  return node;
}

function newVideo() {
  const video = element("video");
  video.controls = true;
  video.loop = true;
  video.playsInline = true;
  video.preload = "metadata";
  return video;
}

/** A DOM widget of `height()` pixels (it changes once a video's size is known). */
function addBox(node, name, box, height) {
  const widget = node.addDOMWidget(name, "sparse_avatar", box, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height(),
    getMaxHeight: () => height(),
  });
  widget.serialize = false;
  return widget;
}

function refit(node) {
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas(true, true);
}

function videoHeight(node, video, extra, fallback) {
  const width = Math.max(64, node.size[0] - 20);
  if (video.videoWidth && video.videoHeight) return Math.round(width * (video.videoHeight / video.videoWidth)) + extra;
  return fallback;
}

function setWidgetValue(node, name, value) {
  const widget = node.widgets?.find((candidate) => candidate.name === name);
  if (!widget) return;
  widget.value = value;
  widget.callback?.(value, app.canvas, node);
  node.setDirtyCanvas?.(true, true);
}

function widgetValue(node, name) {
  return node.widgets?.find((candidate) => candidate.name === name)?.value;
}

// --- Decode Avatar Video: the rendered video, with its sound -------------------------------------

function addPlayer(node) {
  const box = element("div", "sa-box");
  const video = newVideo();
  const note = element("div", "sa-note", "Queue the graph: the result plays here, with its sound.");
  video.hidden = true;
  box.append(video, note);
  const widget = addBox(node, "sparse_avatar_player", box, () => (video.hidden ? 40 : videoHeight(node, video, 30, 200)));
  video.addEventListener("loadedmetadata", () => refit(node));
  video.addEventListener("error", () => {
    note.textContent = "The preview could not be played (its file is gone or the browser cannot decode it).";
    note.className = "sa-note sa-error";
  });
  node.sparseAvatarPlayer = {
    widget,
    video,
    show(entry) {
      const path = viewPath(entry, { t: Date.now() });
      if (!path) return;
      video.hidden = false;
      note.className = "sa-note";
      note.textContent = `${entry.filename} · ${entry.frame_rate ? `${entry.frame_rate} fps` : ""}`;
      video.src = api.apiURL(path);
      refit(node);
    },
  };
}

// --- Load Reference Video: a start/end range picked on the clip --------------------------------

function addRangePicker(node) {
  const box = element("div", "sa-box");
  const ownVideo = newVideo();
  ownVideo.muted = false;
  ownVideo.hidden = true;
  const bar = element("div", "sa-bar");
  const selection = element("div", "sa-sel");
  const head = element("div", "sa-head");
  bar.append(selection, head);
  bar.title = "Click or drag to scrub the clip";
  const label = element("div", "sa-note", "");
  const row = element("div", "sa-row");
  box.append(ownVideo, bar, row, label);

  let bound = null;
  let stopAt = null;
  const clipVideo = () => {
    // ComfyUI's upload widget already shows the chosen clip ("video-preview"); use that player
    // when it is there, else our own.
    const core = node.videoContainer?.querySelector?.("video");
    if (core) {
      ownVideo.hidden = true;
      if (!ownVideo.paused) ownVideo.pause();
      return core;
    }
    const entry = parseFileWidgetValue(widgetValue(node, "video"));
    const path = entry && viewPath(entry);
    if (!path) return null;
    const src = api.apiURL(path);
    if (ownVideo.dataset.path !== path) {
      ownVideo.dataset.path = path;
      ownVideo.src = src;
    }
    if (ownVideo.hidden) {
      ownVideo.hidden = false;
      refit(node);
    }
    return ownVideo;
  };
  const duration = () => {
    const video = clipVideo();
    return video && Number.isFinite(video.duration) ? video.duration : NaN;
  };
  const range = () => clampRange(Number(widgetValue(node, "start_seconds")), Number(widgetValue(node, "end_seconds")), duration());

  const draw = () => {
    const video = clipVideo();
    if (video && video !== bound) {
      video.addEventListener("timeupdate", () => {
        if (stopAt !== null && video.currentTime >= stopAt) {
          video.pause();
          stopAt = null;
        }
        draw();
      });
      video.addEventListener("loadedmetadata", () => {
        draw();
        refit(node);
      });
      bound = video;
    }
    const total = duration();
    const { start, end } = range();
    const { from, to } = selectedSpan(start, end, total);
    if (Number.isFinite(total) && total > 0) {
      selection.style.left = `${(100 * from) / total}%`;
      selection.style.width = `${(100 * Math.max(0, to - from)) / total}%`;
      head.style.left = `${(100 * Math.min(video.currentTime, total)) / total}%`;
      label.textContent = `range ${formatTime(from)} → ${formatTime(to)} (${formatTime(to - from)} of ${formatTime(total)}) · at ${formatTime(video.currentTime)}`;
    } else {
      selection.style.width = "0";
      label.textContent = video ? "loading the clip…" : "pick or upload a video to choose its range";
    }
  };
  const seekTo = (event) => {
    const video = clipVideo();
    const total = duration();
    if (!video || !(total > 0)) return;
    const rect = bar.getBoundingClientRect();
    const fraction = Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width));
    video.currentTime = fraction * total;
    stopAt = null;
    draw();
  };
  bar.addEventListener("pointerdown", (event) => {
    event.stopPropagation();
    event.preventDefault();
    bar.setPointerCapture?.(event.pointerId);
    seekTo(event);
  });
  bar.addEventListener("pointermove", (event) => {
    if (event.buttons & 1) {
      event.stopPropagation();
      seekTo(event);
    }
  });
  const setEnds = (start, end) => {
    const fixed = clampRange(start, end, duration());
    setWidgetValue(node, "start_seconds", fixed.start);
    setWidgetValue(node, "end_seconds", fixed.end);
    draw();
  };
  row.append(
    button("Set start", () => {
      const video = clipVideo();
      if (video) setEnds(video.currentTime, range().end);
    }),
    button("Set end", () => {
      const video = clipVideo();
      if (video) setEnds(range().start, video.currentTime);
    }),
    button("Play range", () => {
      const video = clipVideo();
      const { from, to } = selectedSpan(range().start, range().end, duration());
      if (!video || !Number.isFinite(to)) return;
      video.currentTime = from;
      stopAt = to;
      video.play().catch(() => {});
    }),
    button("Whole clip", () => setEnds(0, 0)),
  );
  for (const name of ["start_seconds", "end_seconds", "video"]) {
    const widget = node.widgets?.find((candidate) => candidate.name === name);
    if (widget) chainCallback(widget, "callback", () => draw());
  }
  const widget = addBox(node, "sparse_avatar_range", box, () => (ownVideo.hidden ? 0 : videoHeight(node, ownVideo, 0, 160)) + 76);
  const belowPreview = () => {
    // ComfyUI adds its clip preview once the clip loads, after our widget: keep the picker under it.
    const widgets = node.widgets ?? [];
    const ours = widgets.indexOf(widget);
    const preview = widgets.findIndex((candidate) => candidate.name === "video-preview");
    if (ours >= 0 && preview > ours) {
      widgets.splice(ours, 1);
      widgets.push(widget);
      refit(node);
    }
  };
  // The playhead follows playback (timeupdate) and the other widgets; this catches a new clip.
  const timer = setInterval(() => {
    belowPreview();
    if (clipVideo() !== bound) draw();
  }, 500);
  chainCallback(node, "onRemoved", () => clearInterval(timer));
  node.sparseAvatarRange = { draw, setEnds, clipVideo };
  draw();
}

// --- Train Avatar: progress, loss curve, Cancel that keeps the weights --------------------------

function addTrainPanel(node) {
  const box = element("div", "sa-box");
  const progress = element("div", "sa-progress");
  const fill = element("div");
  progress.append(fill);
  const status = element("div", "sa-note sa-wrap", "not started");
  const canvas = element("canvas");
  canvas.height = 48;
  canvas.style.width = "100%";
  canvas.style.height = "48px";
  const cancel = button("Cancel (keeps what is trained)", async () => {
    cancel.disabled = true;
    cancel.textContent = "Cancelling after this step…";
    try {
      await api.interrupt(state.promptId ?? null);
    } catch (error) {
      status.textContent = `Cancel failed: ${error?.message ?? error}`;
    }
  });
  cancel.disabled = true;
  box.append(progress, status, canvas, cancel);
  addBox(node, "sparse_avatar_training", box, () => 130);

  const state = { points: [], last: null, promptId: null };
  const drawCurve = () => {
    const width = Math.max(60, Math.round(canvas.clientWidth || node.size[0] - 20));
    canvas.width = width;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, width, canvas.height);
    const line = lossPolyline(state.points, width, canvas.height);
    if (!line.length) return;
    context.strokeStyle = "#4a9";
    context.fillStyle = "#4a9";
    context.lineWidth = 1.5;
    context.beginPath();
    line.forEach(([x, y], index) => (index ? context.lineTo(x, y) : context.moveTo(x, y)));
    context.stroke();
    const [lastX, lastY] = line[line.length - 1];
    context.beginPath();
    context.arc(lastX, lastY, 2.5, 0, 2 * Math.PI); // the newest loss (the only mark while there is one point)
    context.fill();
  };
  node.sparseAvatarTrain = {
    update(event) {
      if (state.last?.state !== "running" && event.state === "running") state.points = [];
      state.points = addLossPoint(state.points, event);
      state.last = event;
      fill.style.width = `${Math.round(event.fraction * 100)}%`;
      progress.classList.toggle("sa-cancelled", event.state === "cancelled");
      status.className = "sa-note sa-wrap";
      status.textContent = trainStatusText(event);
      status.title = status.textContent;
      const running = event.state === "running";
      cancel.disabled = !running;
      cancel.textContent = "Cancel (keeps what is trained)";
      drawCurve();
    },
    started(promptId) {
      state.promptId = promptId;
    },
    failed(message) {
      cancel.disabled = true;
      status.className = "sa-note sa-error";
      status.textContent = `failed: ${message}`;
    },
    state,
  };
}

function nodeById(id) {
  // ComfyUI's node ids: numbers in the root graph ("outer:inner" inside a subgraph, not looked up here).
  if (id === null || id === undefined || !/^\d+$/.test(String(id))) return null;
  return app.graph?.getNodeById?.(Number(id)) ?? null;
}

// --- Preference Pair: A/B side by side, click the better one ---------------------------------

function addPairChooser(node) {
  const box = element("div", "sa-box");
  const grid = element("div", "sa-ab");
  const sides = {};
  for (const side of ["A", "B"]) {
    const column = element("div");
    const video = newVideo();
    video.loop = false;
    video.hidden = true;
    const choose = button(`${side} is better`, () => choosePair(side));
    choose.disabled = true;
    choose.dataset.side = side;
    column.append(element("div", "sa-note", side), video, choose);
    grid.append(column);
    sides[side] = { column, video, choose };
    video.addEventListener("loadedmetadata", () => refit(node));
  }
  const row = element("div", "sa-row");
  const playBoth = button("Play both", () => {
    for (const side of ["A", "B"]) {
      const { video } = sides[side];
      video.currentTime = 0;
      video.muted = side === "B"; // the same speech: one sound track is enough
      video.play().catch(() => {});
    }
  });
  playBoth.disabled = true;
  const status = element("div", "sa-note", "Queue the graph with winner = choose: both renderings play here.");
  row.append(playBoth);
  box.append(grid, row, status);
  addBox(node, "sparse_avatar_pair", box, () => {
    const video = sides.A.video;
    if (video.hidden) return 96;
    const width = Math.max(64, (node.size[0] - 26) / 2);
    const ratio = video.videoWidth ? video.videoHeight / video.videoWidth : 1;
    return Math.round(width * ratio) + 100;
  });

  let pair = null;
  async function choosePair(side) {
    if (!pair) return;
    for (const { choose } of Object.values(sides)) choose.disabled = true;
    status.className = "sa-note";
    status.textContent = `recording ${side}…`;
    try {
      const response = await api.fetchApi(PAIR_ROUTE, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: pairChoiceBody(pair, side),
      });
      const result = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(result.error ?? `the server answered ${response.status}`);
      sides[side].column.classList.add("sa-chosen");
      status.textContent = `${result.pair}: ${result.winner} preferred · ${result.count} pairs in ${result.pairs_file}`;
      pair = null;
    } catch (error) {
      status.className = "sa-note sa-error";
      status.textContent = `not recorded: ${error?.message ?? error}`;
      for (const { choose } of Object.values(sides)) choose.disabled = !pair;
    }
  }
  node.sparseAvatarPair = {
    show(next) {
      pair = next;
      for (const side of ["A", "B"]) {
        const { column, video, choose } = sides[side];
        column.classList.remove("sa-chosen");
        video.hidden = false;
        video.src = api.apiURL(viewPath(next[side.toLowerCase()], { t: Date.now() }));
        choose.disabled = false;
      }
      playBoth.disabled = false;
      status.className = "sa-note";
      status.textContent = `${next.pair}: play both, then click the better one`;
      refit(node);
    },
    sides,
    status,
  };
}

app.registerExtension({
  name: "sparse_avatar.web",
  setup() {
    addStyle();
    api.addEventListener(TRAIN_EVENT, ({ detail }) => {
      const event = parseTrainEvent(detail);
      if (!event) return;
      nodeById(event.node)?.sparseAvatarTrain?.update(event);
    });
    api.addEventListener("execution_start", ({ detail }) => {
      for (const node of app.graph?.nodes ?? []) node.sparseAvatarTrain?.started(detail?.prompt_id ?? null);
    });
    api.addEventListener("execution_error", ({ detail }) => {
      nodeById(detail?.node_id)?.sparseAvatarTrain?.failed(String(detail?.exception_message ?? "error"));
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (name === NODES.decode) {
      chainCallback(nodeType.prototype, "onNodeCreated", function () {
        addPlayer(this);
      });
      chainCallback(nodeType.prototype, "onExecuted", function (output) {
        const entry = videoFromOutput(output);
        if (entry) this.sparseAvatarPlayer?.show(entry);
      });
    } else if (name === NODES.reference) {
      chainCallback(nodeType.prototype, "onNodeCreated", function () {
        addRangePicker(this);
      });
    } else if (name === NODES.train) {
      chainCallback(nodeType.prototype, "onNodeCreated", function () {
        addTrainPanel(this);
      });
    } else if (name === NODES.pair) {
      chainCallback(nodeType.prototype, "onNodeCreated", function () {
        addPairChooser(this);
      });
      chainCallback(nodeType.prototype, "onExecuted", function (output) {
        const next = pairFromOutput(output);
        if (next) this.sparseAvatarPair?.show(next);
      });
    }
  },
});
