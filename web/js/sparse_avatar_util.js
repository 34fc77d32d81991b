// Pure helpers of the sparse-avatar web extension: no DOM, no ComfyUI imports, so `node --test`
// runs them (tests/test_web_util.mjs). ComfyUI loads every .js under web/ as an extension module;
// this one only exports functions, so loading it on its own does nothing.

export const TRAIN_EVENT = "sparse_avatar.train";
export const PAIR_ROUTE = "/sparse_avatar/preference_pair";
export const VIDEO_OUTPUT = "sparse_avatar_video";
export const PAIR_OUTPUT = "sparse_avatar_pair";
const FOLDER_TYPES = ["input", "output", "temp"];

/** Seconds -> "m:ss.s" (or "h:mm:ss.s"); "--:--" for anything that is not a finite number >= 0. */
export function formatTime(seconds, decimals = 1) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "--:--";
  const scale = 10 ** decimals;
  const total = Math.round(seconds * scale) / scale;
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const secs = (total % 60).toFixed(decimals).padStart(decimals ? 3 + decimals : 2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${secs}` : `${minutes}:${secs}`;
}

/** Seconds -> "1 h 2 min", "3 min 4 s", "5 s": for "time left". */
export function formatDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return "";
  const whole = Math.round(seconds);
  if (whole >= 3600) return `${Math.floor(whole / 3600)} h ${Math.floor((whole % 3600) / 60)} min`;
  if (whole >= 60) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
  return `${whole} s`;
}

/**
 * The start/end pair of Load Reference Video made valid for a clip of `duration` seconds
 * (duration unknown: NaN/0). end 0 means "the end of the clip", as the node reads it.
 * start lands in [0, duration - minSpan]; an end at or before start (or at the clip's end) becomes 0.
 * Values are rounded to `step` (the widgets' 0.1 s).
 */
export function clampRange(start, end, duration, { step = 0.1, minSpan = 0.1 } = {}) {
  const round = (value) => Math.round(value / step) * step;
  const fix = (value) => Number(round(value).toFixed(6));
  let s = Number.isFinite(start) && start > 0 ? start : 0;
  let e = Number.isFinite(end) && end > 0 ? end : 0;
  const known = Number.isFinite(duration) && duration > 0;
  if (known) {
    s = Math.min(s, Math.max(0, duration - minSpan));
    if (e >= duration - step / 2) e = 0;
  }
  s = fix(s);
  e = fix(e);
  if (e && e < s + minSpan - 1e-9) e = 0;
  return { start: s, end: e };
}

/** The effective [from, to] seconds a start/end pair selects (end 0 = the clip's end). */
export function selectedSpan(start, end, duration) {
  const range = clampRange(start, end, duration);
  const to = range.end || (Number.isFinite(duration) && duration > 0 ? duration : NaN);
  return { from: range.start, to };
}

/**
 * A ComfyUI file widget value ("clip.mp4", "sub/clip.mp4", "clip.mp4 [output]") -> the parts of a
 * /view query. null for values that are not a plain relative file name (empty, absolute, "..").
 */
export function parseFileWidgetValue(value, defaultType = "input") {
  if (typeof value !== "string") return null;
  let name = value.trim();
  let type = defaultType;
  const tagged = name.match(/^(.*) \[(input|output|temp)\]$/);
  if (tagged) {
    name = tagged[1];
    type = tagged[2];
  }
  if (!name || name.startsWith("/") || name.includes("\\") || /^[A-Za-z]:/.test(name)) return null;
  const parts = name.split("/");
  if (parts.some((part) => part === "" || part === "." || part === "..")) return null;
  const filename = parts.pop();
  return { filename, subfolder: parts.join("/"), type };
}

/**
 * The /view path (without the API base) of {filename, subfolder, type}, or null when the entry is
 * not one ComfyUI serves. `extra` adds query parameters (e.g. a cache-busting stamp).
 */
export function viewPath(entry, extra = {}) {
  if (!entry || typeof entry.filename !== "string" || !entry.filename) return null;
  const type = entry.type ?? "output";
  if (!FOLDER_TYPES.includes(type)) return null;
  if (entry.filename.includes("/") || entry.filename.includes("\\") || entry.filename === "..") return null;
  const subfolder = typeof entry.subfolder === "string" ? entry.subfolder : "";
  if (subfolder.split("/").some((part) => part === "..") || subfolder.startsWith("/")) return null;
  const params = new URLSearchParams({ filename: entry.filename, type, subfolder });
  for (const [key, value] of Object.entries(extra)) params.set(key, String(value));
  return `/view?${params}`;
}

/** The first playable entry of a node's UI output list (Decode Avatar Video's sparse_avatar_video). */
export function videoFromOutput(output) {
  const list = output?.[VIDEO_OUTPUT];
  if (!Array.isArray(list)) return null;
  return list.find((entry) => viewPath(entry) !== null) ?? null;
}

/** Preference Pair's UI output -> {pairsName, pair, a, b} (both /view entries), or null. */
export function pairFromOutput(output) {
  const entry = output?.[PAIR_OUTPUT]?.[0];
  if (!entry || typeof entry.pair !== "string" || typeof entry.pairs_name !== "string") return null;
  if (viewPath(entry.a) === null || viewPath(entry.b) === null) return null;
  return { pairsName: entry.pairs_name, pair: entry.pair, a: entry.a, b: entry.b };
}

/** The JSON body the A/B click posts to PAIR_ROUTE. */
export function pairChoiceBody(pair, winner) {
  const side = String(winner).toUpperCase();
  if (side !== "A" && side !== "B") throw new Error(`winner must be A or B, got ${winner}`);
  return JSON.stringify({ pairs_name: pair.pairsName, pair: pair.pair, winner: side });
}

const TRAIN_STATES = ["running", "saved", "cancelled"];

/**
 * A Train Avatar websocket event's detail -> a clean object, or null when it is not one:
 * {node, state, step, total, loss (number|null), elapsed, fraction, remaining (s|null), file}.
 */
export function parseTrainEvent(detail) {
  if (!detail || typeof detail !== "object") return null;
  if (!TRAIN_STATES.includes(detail.state)) return null;
  const step = Number(detail.step);
  const total = Number(detail.total);
  if (!Number.isInteger(step) || !Number.isInteger(total) || step < 0 || total < 1) return null;
  const loss = typeof detail.loss === "number" && Number.isFinite(detail.loss) ? detail.loss : null;
  const elapsed = Number.isFinite(detail.elapsed_s) && detail.elapsed_s >= 0 ? detail.elapsed_s : 0;
  const fraction = Math.min(1, step / total);
  // The node's estimate (from this run's own pace: a resumed job starts part-way) when it sends one.
  const sent = "remaining_s" in detail ? (Number.isFinite(detail.remaining_s) && detail.remaining_s >= 0 ? detail.remaining_s : null) : undefined;
  const remaining = detail.state !== "running" ? null
    : sent !== undefined ? sent : step > 0 && elapsed > 0 ? (elapsed / step) * (total - step) : null;
  return {
    node: detail.node == null ? null : String(detail.node),
    state: detail.state,
    step,
    total,
    loss,
    elapsed,
    fraction,
    remaining,
    file: typeof detail.file === "string" ? detail.file : null,
  };
}

/** One line for the Train Avatar widget. */
export function trainStatusText(event) {
  if (!event) return "not started";
  const steps = `step ${event.step}/${event.total}`;
  const loss = event.loss === null ? "" : ` · loss ${formatLoss(event.loss)}`;
  if (event.state === "saved") return `saved ${event.file ?? ""} (${event.step} steps${loss})`;
  if (event.state === "cancelled") return `cancelled at ${steps}; kept ${event.file ?? "what was trained"}${loss}`;
  const left = event.remaining === null ? "" : ` · ${formatDuration(event.remaining)} left`;
  return `${steps}${loss}${left}`;
}

export function formatLoss(loss) {
  if (typeof loss !== "number" || !Number.isFinite(loss)) return "-";
  return Math.abs(loss) >= 0.01 || loss === 0 ? loss.toFixed(4) : loss.toExponential(2);
}

/**
 * Points of a loss curve [[step, loss], ...] scaled into a width x height box (y grows down),
 * as [[x, y], ...]; empty when there is nothing to draw.
 */
export function lossPolyline(points, width, height, pad = 2) {
  const usable = points.filter(([step, loss]) => Number.isFinite(step) && Number.isFinite(loss));
  if (!usable.length || width <= 2 * pad || height <= 2 * pad) return [];
  const steps = usable.map(([step]) => step);
  const losses = usable.map(([, loss]) => loss);
  const [s0, s1] = [Math.min(...steps), Math.max(...steps)];
  const [l0, l1] = [Math.min(...losses), Math.max(...losses)];
  const x = (step) => pad + (s1 === s0 ? (width - 2 * pad) / 2 : ((step - s0) / (s1 - s0)) * (width - 2 * pad));
  const y = (loss) => pad + (l1 === l0 ? (height - 2 * pad) / 2 : ((l1 - loss) / (l1 - l0)) * (height - 2 * pad));
  return usable.map(([step, loss]) => [x(step), y(loss)]);
}

/** Append [step, loss] to a curve (a new run restarts it), keeping at most `limit` points. */
export function addLossPoint(points, event, limit = 500) {
  if (!event || event.loss === null) return points;
  const last = points[points.length - 1];
  const restarted = last && event.step < last[0];
  const next = restarted ? [] : points.slice();
  if (!last || restarted || event.step !== last[0]) next.push([event.step, event.loss]);
  if (next.length <= limit) return next;
  // Too many points: keep every other one (the first and the newest always stay).
  const thinned = next.filter((_, index) => index % 2 === 0);
  if (thinned[thinned.length - 1] !== next[next.length - 1]) thinned.push(next[next.length - 1]);
  return thinned;
}
