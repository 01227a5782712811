// The dashboard's only way to the service: the public REST API (/v1), with the key the user signed in with.
// The key lives in this tab's sessionStorage (never a cookie, never sent anywhere but Authorization headers).

const KEY = "nwc.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function signOut(reason) {
  sessionStorage.removeItem(KEY);
  const q = reason ? `?reason=${encodeURIComponent(reason)}` : "";
  location.assign(`/ui/signin${q}`);
}

export class ApiError extends Error {
  constructor(status, code, message, detail = null, requestId = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.requestId = requestId;
  }
}

/** An ApiError from a response body `{"error": {code, message, detail}}` (or whatever came instead). */
export function errorFromBody(status, text, requestId) {
  let err = null;
  try {
    err = JSON.parse(text).error;
  } catch {
    /* not JSON: a proxy's page, an S3 XML error */
  }
  if (err && err.code) return new ApiError(status, err.code, err.message || err.code, err.detail, requestId);
  const s3 = /<Code>([^<]+)<\/Code>/.exec(text || "");
  return new ApiError(status, s3 ? s3[1] : `http_${status}`, s3 ? `the object store answered ${s3[1]}` :
    `the server answered HTTP ${status}`, null, requestId);
}

export const NETWORK_ERROR = "The service cannot be reached. Check that it is running and your connection, then try again.";

/**
 * Call the API. `json` is sent as a JSON body; `body` as is. Resolves to the parsed JSON (null for 204);
 * rejects with ApiError. A 401 means the key is no longer valid: back to the sign-in page (unless `key`
 * was given explicitly, i.e. the sign-in page is checking one).
 */
export async function api(path, { method = "GET", json, body, headers = {}, key } = {}) {
  const h = { Accept: "application/json", ...headers };
  const k = key ?? getKey();
  if (k) h.Authorization = `Bearer ${k}`;
  let payload = body;
  if (json !== undefined) {
    h["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  }
  let r;
  try {
    r = await fetch(path, { method, headers: h, body: payload, cache: "no-store" });
  } catch {
    throw new ApiError(0, "network_error", NETWORK_ERROR);
  }
  const text = await r.text();
  if (!r.ok) {
    const e = errorFromBody(r.status, text, r.headers.get("X-Request-ID"));
    if (r.status === 401 && key === undefined) signOut("expired");
    throw e;
  }
  if (r.status === 204 || !text) return null;
  return JSON.parse(text);
}

/** Every item of a paginated list (follows next_cursor; at most `max` items). */
export async function listAll(path, max = 1000) {
  const out = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=200${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    out.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && out.length < max);
  return out;
}

// ------------------------------------------------------------------ plain words for errors

const PLAIN = {
  unauthorized: "The API key was not accepted: it is unknown, revoked or mistyped.",
  network_error: NETWORK_ERROR,
  not_found: "It no longer exists (or belongs to another tenant).",
  concurrent_job_limit: "You already have as many queued and running jobs as your plan allows. Wait for one to finish or cancel one, then try again.",
  storage_quota_exceeded: "Your storage quota is used up. Delete models or finished jobs to make room.",
  upload_too_large: "The file is larger than this service accepts.",
  pickle_refused: "Pickle checkpoints (.bin, .pt, …) can run code when loaded, so they are refused. Upload the model's .safetensors files instead.",
  file_type_not_allowed: "This type of file is not accepted in a model.",
  invalid_safetensors: "The .safetensors file is damaged or not in a format the codec reads.",
  trust_remote_code_refused: "The model needs custom code (trust_remote_code), which the service does not run.",
  queue_unavailable: "The job queue cannot be reached right now; nothing was started. Try again in a moment.",
  store_unavailable: "The object store cannot be reached right now. Try again in a moment.",
  url_expired: "The download or upload link expired. Try again: the dashboard asks for a fresh one.",
  report_not_ready: "The evaluation report is not ready yet.",
  internal_error: "The service hit an unexpected error.",
};

// Codes whose general sentence says it all (the service's own message speaks to API programmers).
const GENERAL_ONLY = new Set(["unauthorized", "network_error"]);

/** A validation error's field messages: "target_bits for nwc must be in 1..8, got 9", "tuning.seed: …". */
function fieldErrors(detail) {
  return detail.map((d) => {
    const field = (d.loc || []).filter((p) => p !== "body").join(".");
    const msg = String(d.msg || "").replace(/^Value error, /, "");
    return field ? `${field}: ${msg}` : msg;
  }).join("; ");
}

/** A sentence for people: what went wrong, in plain words, then the service's own message. */
export function plainError(e) {
  if (!(e instanceof ApiError)) return `Something went wrong in the page: ${e && e.message ? e.message : e}`;
  if (e.code === "validation_error" && Array.isArray(e.detail) && e.detail.length) {
    return `Some values were not accepted: ${fieldErrors(e.detail)}.`;
  }
  const general = PLAIN[e.code];
  const own = e.message && e.message !== general && !GENERAL_ONLY.has(e.code) ? e.message : "";
  const msg = general ? (own ? `${general} (${own})` : general) : own || `Error ${e.status}.`;
  return msg.charAt(0).toUpperCase() + msg.slice(1);
}

// ------------------------------------------------------------------ alerts

export function clearAlerts() {
  document.getElementById("alerts").replaceChildren();
}

/** Show an error in the page's alert region (role="alert"): "<context>: <plain words>". */
export function showError(e, context) {
  const box = document.getElementById("alerts");
  const text = context ? `${context}: ${plainError(e)}` : plainError(e);
  const ref = e instanceof ApiError ? [e.code, e.requestId && `request ${e.requestId}`].filter(Boolean).join(", ") : "";
  const close = el("button", { type: "button", class: "button small secondary", "aria-label": "Dismiss this message" }, "Dismiss");
  const item = el("div", { class: "alert error" }, el("p", {}, text), ref ? el("p", { class: "ref" }, ref) : null, close);
  close.addEventListener("click", () => item.remove());
  box.replaceChildren(item);
  item.scrollIntoView({ block: "nearest" });
}

export function showNotice(text) {
  const box = document.getElementById("notices");
  box.replaceChildren(el("div", { class: "alert notice" }, text));
}

// ------------------------------------------------------------------ DOM and formatting helpers

/** createElement with attributes and children (strings become text: nothing from the API is parsed as HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k in node && typeof v !== "string") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function fmtDate(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function fmtNumber(x, digits = 2) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return Number(x).toLocaleString(undefined, { maximumFractionDigits: digits });
}

export function shortId(id) {
  return id ? id.slice(0, 12) : "";
}

export const STATE_LABEL = {
  queued: "Queued", running: "Running", succeeded: "Succeeded", failed: "Failed", cancelled: "Cancelled",
  uploading: "Uploading", importing: "Importing", ready: "Ready",
};

export function badge(state) {
  return el("span", { class: `badge state-${state}` }, STATE_LABEL[state] || state);
}

/** "at 4 bits", or for a pruning job its sparsity ("50 % sparse") or N:M pattern ("2:4 sparse"). */
export function rateLabel(job) {
  if (job.target_bits != null) return `at ${job.target_bits} bits`;
  const t = job.tuning || {};
  return t.pattern ? `${t.pattern} sparse` : `${Math.round(100 * (t.sparsity || 0))} % sparse`;
}

/** Time left or taken, in words, for a job. */
export function jobTiming(job) {
  if (job.state === "running") {
    if (job.eta_at) return `about ${fmtDuration((new Date(job.eta_at) - Date.now()) / 1000)} left`;
    return "estimating time left…";
  }
  if (job.state === "queued") return "waiting for a worker";
  if (job.started_at && job.finished_at) return `took ${fmtDuration((new Date(job.finished_at) - new Date(job.started_at)) / 1000)}`;
  return "–";
}

/** Run `fn` now and every `ms` (skipped while the tab is hidden); returns a stop function. */
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await fn();
      } catch (e) {
        showError(e, "Could not refresh");
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

/** Every page but sign-in: no key in this tab means sign in first (and come back here). */
export function requireKey() {
  if (!getKey()) {
    location.replace(`/ui/signin?next=${encodeURIComponent(location.pathname + location.search)}`);
    return false;
  }
  const out = document.getElementById("sign-out");
  if (out) out.addEventListener("click", () => signOut("signed-out"));
  return true;
}
