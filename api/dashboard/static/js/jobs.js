// Jobs list: state, progress bar and time left of every job, polled every 2 s. Rows are updated in place
// (not rebuilt), so keyboard focus and screen-reader position survive the refreshes.
import { api, badge, el, every, fmtDate, jobTiming, listAll, rateLabel, requireKey, shortId, showError } from "./api.js";

const POLL_MS = 2000;

if (requireKey()) main();

function main() {
  const body = document.getElementById("jobs-body");
  const empty = document.getElementById("jobs-empty");
  const filter = document.getElementById("filter-state");
  const names = new Map(); // model id -> name
  const rows = new Map(); // job id -> {tr, cells}

  async function modelName(id) {
    if (!names.has(id)) {
      for (const m of await listAll("/v1/models")) names.set(m.id, m.name);
      if (!names.has(id)) names.set(id, id); // deleted since
    }
    return names.get(id);
  }

  function makeRow(job) {
    const cells = {
      job: el("th", { scope: "row", "data-label": "Job" },
        el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, class: "job-link" }, shortId(job.id))),
      model: el("td", { "data-label": "Model" }),
      method: el("td", { "data-label": "Method" }, job.method.toUpperCase()),
      bits: el("td", { "data-label": "Bits" }, job.target_bits == null ? rateLabel(job) : String(job.target_bits)),
      state: el("td", { "data-label": "State" }),
      progress: el("td", { "data-label": "Progress" }),
      time: el("td", { "data-label": "Time" }),
      created: el("td", { "data-label": "Created" }, fmtDate(job.created_at)),
    };
    const bar = el("progress", { max: "1", value: "0", "aria-label": `Progress of job ${shortId(job.id)}` });
    const pct = el("span", { class: "percent" });
    const stage = el("span", { class: "stage" });
    cells.progress.append(el("div", { class: "progress-line" }, bar, pct), stage);
    const tr = el("tr", { "data-job-id": job.id }, ...Object.values(cells));
    return { tr, cells, bar, pct, stage };
  }

  async function refresh() {
    const state = filter.value;
    const jobs = (await api(`/v1/jobs?limit=100${state ? `&state=${state}` : ""}`)).items;
    const seen = new Set();
    let prev = null;
    for (const job of jobs) {
      seen.add(job.id);
      let r = rows.get(job.id);
      if (!r) {
        r = makeRow(job);
        rows.set(job.id, r);
      }
      r.cells.model.textContent = await modelName(job.model_id);
      r.tr.dataset.state = job.state;
      r.cells.state.replaceChildren(badge(job.state));
      if (job.error) r.cells.state.append(el("p", { class: "row-error" }, job.error));
      r.bar.value = job.progress;
      r.bar.textContent = `${Math.round(100 * job.progress)} %`;
      r.pct.textContent = `${Math.floor(100 * job.progress)} %`;
      r.stage.textContent = job.stage && job.state === "running" ? `stage: ${job.stage}` : "";
      r.cells.time.textContent = jobTiming(job);
      // Keep the API's order (newest first) without moving rows that are already in place.
      const want = prev ? prev.nextSibling : body.firstChild;
      if (want !== r.tr) body.insertBefore(r.tr, want);
      prev = r.tr;
    }
    for (const [id, r] of rows) {
      if (!seen.has(id)) {
        r.tr.remove();
        rows.delete(id);
      }
    }
    empty.hidden = jobs.length > 0;
  }

  filter.addEventListener("change", () => refresh().catch((e) => showError(e, "Could not load the jobs")));
  every(POLL_MS, refresh);
}
