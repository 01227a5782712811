// Job detail: live state and stage timeline (polled every 2 s until the job ends), cancel / retry, then the
// artifacts with presigned download links, the evaluation report, the plots and the per-layer table.
import {
  api, ApiError, badge, clearAlerts, el, every, fmtBytes, fmtDate, fmtDuration, fmtNumber, jobTiming, listAll, rateLabel,
  requireKey, showError, showNotice,
} from "./api.js";
import { bitsPerLayerPlot, pplVsBitsPlot } from "./charts.js";

const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const STAGE_LABEL = { fetch: "Fetch the model", plan: "Plan", compress: "Compress", verify: "Verify (decode, load, evaluate)", publish: "Publish" };

if (requireKey()) main();

function main() {
  const jobId = document.getElementById("job-root").dataset.jobId;
  const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const cancelBtn = document.getElementById("cancel-job");
  const retryBtn = document.getElementById("retry-job");
  let job = null;
  let model = null;
  let stop = null;
  let lastEvent = null;
  let resultsShown = false;

  function summaryItem(term, value) {
    return [el("dt", {}, term), el("dd", {}, value)];
  }

  function renderJob() {
    document.getElementById("job-title").textContent =
      `${job.method.toUpperCase()} ${rateLabel(job)}${model ? ` · ${model.name}` : ""}`;
    document.title = `Job ${job.id.slice(0, 12)} · NWC`;
    const t = job.tuning;
    document.getElementById("job-summary").replaceChildren(
      ...summaryItem("State", badge(job.state)),
      ...summaryItem("Model", model ? el("span", {}, model.name) : job.model_id),
      ...summaryItem("Method", `${job.method.toUpperCase()}, ${job.target_bits == null ? rateLabel(job) : `target ${job.target_bits} bits/weight`}`),
      ...summaryItem("Calibration", job.calibration === "none" ? "none (model-free)" : job.calibration),
      ...summaryItem("Outputs", job.outputs.join(", ")),
      ...summaryItem("Evaluation tokens", String(t.eval_tokens)),
      ...summaryItem("Created", fmtDate(job.created_at)),
      ...summaryItem("Attempts", String(job.attempts)),
    );
    const bar = document.getElementById("job-progress");
    bar.value = job.progress;
    bar.textContent = `${Math.round(100 * job.progress)} %`;
    document.getElementById("job-percent").textContent = `${Math.floor(100 * job.progress)} %`;
    document.getElementById("job-eta").textContent =
      `${job.stage && job.state === "running" ? `Stage: ${job.stage}. ` : ""}${jobTiming(job)}`;

    const errBox = document.getElementById("job-error");
    if (job.state === "failed") {
      errBox.replaceChildren(el("p", {}, el("strong", {}, "This job failed. "),
        job.error ? `Reason: ${job.error}` : "The worker gave no reason."),
      el("p", {}, "Fix the cause (model, method or settings) and start a new job, or retry this one if the cause was temporary."));
      errBox.hidden = false;
    } else if (job.state === "cancelled") {
      errBox.replaceChildren(el("p", {}, "This job was cancelled."));
      errBox.hidden = false;
    } else {
      errBox.hidden = true;
    }
    cancelBtn.hidden = !(job.state === "queued" || job.state === "running");
    retryBtn.hidden = !(job.state === "failed" || job.state === "cancelled");

    document.getElementById("stage-timeline").replaceChildren(...job.stages.map((s) => {
      const p = s.state === "done" ? 1 : s.progress ?? 0;
      const info = s.state === "running"
        ? `running for ${fmtDuration(s.duration_s)}${s.eta_seconds != null ? `, about ${fmtDuration(s.eta_seconds)} left` : ""}`
        : s.state === "done" ? `done in ${fmtDuration(s.duration_s)}` : `stopped after ${fmtDuration(s.duration_s)}`;
      return el("li", { class: `stage stage-${s.state}` },
        el("span", { class: "stage-name" }, STAGE_LABEL[s.name] || s.name),
        el("span", { class: "stage-info" }, info),
        el("progress", { max: "1", value: String(p), "aria-label": `${s.name} progress` }, `${Math.round(100 * p)} %`));
    }));
    if (!job.stages.length) {
      document.getElementById("stage-timeline").replaceChildren(el("li", { class: "stage" }, job.state === "queued" ? "Waiting for a worker to pick the job up." : "No stage started."));
    }
  }

  async function followEvents() {
    const events = await api(`${base}/events${lastEvent != null ? `?after=${lastEvent}` : ""}`);
    const list = document.getElementById("events-list");
    for (const e of events) {
      lastEvent = e.id;
      list.append(el("li", {}, el("time", { datetime: e.created_at }, new Date(e.created_at).toLocaleTimeString()),
        ` ${e.stage ? `[${e.stage}] ` : ""}${e.message}`));
    }
  }

  async function tick() {
    try {
      job = await api(base);
    } catch (e) {
      if (e.status !== 404) throw e; // shown by every(); polling goes on
      stop();
      stop = null;
      showError(e, "Could not load this job");
      return;
    }
    if (!model) {
      try {
        model = await api(`/v1/models/${encodeURIComponent(job.model_id)}`);
      } catch {
        model = null; // deleted since: the id is shown instead
      }
    }
    renderJob();
    await followEvents();
    if (TERMINAL.has(job.state)) {
      stop();
      stop = null;
      if (job.state === "succeeded" && !resultsShown) {
        resultsShown = true;
        await showResults();
      }
    }
  }

  function startPolling() {
    if (!stop) stop = every(POLL_MS, tick);
  }

  /** A button that POSTs one action of the job, says what happened and follows the job again. */
  function actionButton(button, action, notice, failure, after = () => {}) {
    button.addEventListener("click", async () => {
      clearAlerts();
      button.disabled = true;
      try {
        await api(`${base}/${action}`, { method: "POST" });
        showNotice(notice);
        after();
        startPolling();
      } catch (e) {
        showError(e, failure);
      } finally {
        button.disabled = false;
      }
    });
  }
  actionButton(cancelBtn, "cancel", "Cancel requested: the worker stops the job within a few seconds.",
    "Could not cancel the job");
  actionButton(retryBtn, "retry", "The job is queued again.", "Could not retry the job", () => {
    resultsShown = false;
  });

  // ------------------------------------------------------------ results

  async function showResults() {
    const [artifacts, report] = await Promise.all([
      api(`${base}/artifacts`),
      job.outputs.includes("report") ? api(`${base}/report`).catch((e) => {
        showError(e, "Could not load the evaluation report");
        return null;
      }) : null,
    ]);
    renderArtifacts(artifacts);
    if (report) {
      renderEvaluation(report);
      renderLayers(report);
      await renderPlots(report);
    }
  }

  function renderArtifacts(artifacts) {
    const order = { bundle: 0, report: 1, dense: 2, plot: 3 };
    artifacts.sort((a, b) => order[a.kind] - order[b.kind] || a.name.localeCompare(b.name));
    document.getElementById("artifacts-body").replaceChildren(...artifacts.map((a) => {
      const link = el("a", { class: "button small", href: a.url, download: a.name.split("/").pop(),
        "data-artifact-id": a.id, "aria-label": `Download ${a.name}` }, "Download");
      let expires = new Date(a.url_expires_at);
      // An old page's URL may have expired: ask for a fresh one first.
      link.addEventListener("click", async (ev) => {
        if (expires - Date.now() > 30_000) return;
        ev.preventDefault();
        try {
          const fresh = await api(`${base}/artifacts/${encodeURIComponent(a.id)}`);
          link.href = fresh.url;
          expires = new Date(fresh.url_expires_at);
          location.assign(fresh.url);
        } catch (e) {
          showError(e, `Could not download ${a.name}`);
        }
      });
      return el("tr", { "data-artifact": a.name },
        el("th", { scope: "row", "data-label": "File" }, el("code", {}, a.name)),
        el("td", { "data-label": "Kind" }, a.kind),
        el("td", { "data-label": "Size" }, fmtBytes(a.size)),
        el("td", { "data-label": "sha256" }, el("code", { class: "hash", title: a.sha256 }, a.sha256)),
        el("td", { "data-label": "Download" }, link));
    }));
    document.getElementById("downloads-section").hidden = artifacts.length === 0;
  }

  function renderEvaluation(r) {
    const v = r.verification || {};
    const e = v.evaluation;
    const items = [
      ...summaryItem("Measured bits/weight", `${fmtNumber(r.measured_bits, 3)} (${job.target_bits == null ? rateLabel(job) : `target ${r.target_bits}`})`),
      ...summaryItem("Compressed size", `${fmtBytes(r.file_bytes)} for ${fmtNumber(r.total_params, 0)} parameters`),
      ...summaryItem("Compression time", `${fmtDuration(r.seconds)} on ${r.device}`),
      ...summaryItem("Verification", v.ok ? `passed in a fresh process (${fmtDuration(v.seconds)})` : `failed at ${v.stage}: ${v.error}`),
    ];
    if (e) {
      items.push(
        ...summaryItem("Perplexity", `${fmtNumber(e.original.ppl, 3)} original → ${fmtNumber(e.compressed.ppl, 3)} compressed (×${fmtNumber(e.compressed.ppl / e.original.ppl, 4)})`),
        ...summaryItem("KL divergence", `${fmtNumber(e.kl, 5)} nats/token`),
        ...summaryItem("Top-1 agreement", `${fmtNumber(100 * e.top1_agreement, 2)} %`),
        ...summaryItem("Scored tokens", `${fmtNumber(e.original.n_tokens, 0)} (${e.protocol})`),
      );
    } else if (v.ok) {
      items.push(...summaryItem("Evaluation", v.causal_lm ? "not run" : "not a causal language model: every tensor decodes and the model loads (no perplexity)"));
    }
    document.getElementById("eval-summary").replaceChildren(...items);
    const gens = document.getElementById("generations");
    gens.replaceChildren();
    if (e) {
      gens.append(el("h3", {}, "Greedy continuation"),
        el("dl", { class: "summary" },
          ...summaryItem("Prompt", el("q", {}, e.generation_prompt)),
          ...summaryItem("Original", el("q", {}, e.generation_original)),
          ...summaryItem("Compressed", el("q", {}, e.generation_compressed))));
    }
    document.getElementById("eval-section").hidden = false;
  }

  function renderLayers(r) {
    const proxy = new Map((r.layers || []).map((l) => [l.name, l.proxy_error]));
    const tensors = r.tensors || [];
    document.getElementById("layers-body").replaceChildren(...tensors.map((t) => el("tr", {},
      el("th", { scope: "row" }, el("code", {}, t.name)),
      el("td", {}, (t.shape || []).join(" × ")),
      el("td", {}, t.method === "raw" ? "stored as is" : t.method),
      el("td", { class: "num" }, fmtNumber(t.numel, 0)),
      el("td", { class: "num" }, fmtNumber(t.bits_per_weight, 3)),
      el("td", { class: "num" }, t.nmse == null ? "–" : Number(t.nmse).toExponential(2)),
      el("td", { class: "num" }, proxy.get(t.name) == null ? "–" : Number(proxy.get(t.name)).toExponential(2)))));
    document.getElementById("layers-caption").textContent = `Bits and error of each of the ${tensors.length} tensors`;
    document.getElementById("layers-section").hidden = tensors.length === 0;
  }

  /** This job's point, the other finished jobs of the same model measured on the same tokens, the original. */
  async function renderPlots(r) {
    const section = document.getElementById("plots-section");
    section.hidden = false;
    if (!window.Plotly) {
      showError(new ApiError(0, "plotly_missing", "the chart library did not load"), "Cannot draw the plots");
      return;
    }
    const e = r.verification && r.verification.evaluation;
    const points = [];
    if (e) {
      const others = await listAll(`/v1/jobs?model_id=${encodeURIComponent(job.model_id)}&state=succeeded`, 100);
      const reports = await Promise.all(others.filter((j) => j.id !== job.id && j.outputs.includes("report")).slice(0, 40)
        .map((j) => api(`/v1/jobs/${encodeURIComponent(j.id)}/report`).then((rep) => [j, rep]).catch(() => null)));
      for (const item of reports) {
        if (!item) continue;
        const [j, rep] = item;
        const oe = rep.verification && rep.verification.evaluation;
        // Perplexities are comparable only on the same scored tokens.
        if (oe && oe.protocol === e.protocol && oe.original.n_tokens === e.original.n_tokens) {
          points.push({ id: j.id, method: j.method, bits: rep.measured_bits, ppl: oe.compressed.ppl });
        }
      }
    }
    const weightBytes = model ? model.files.filter((f) => f.path.endsWith(".safetensors")).reduce((s, f) => s + f.size, 0) : 0;
    const originalBits = model && model.parameter_count ? (8 * weightBytes) / model.parameter_count : null;
    const caption = document.getElementById("plot-ppl-caption");
    if (e) {
      pplVsBitsPlot("plot-ppl", {
        self: { id: job.id, method: job.method, bits: r.measured_bits, ppl: e.compressed.ppl },
        others: points,
        original: { ppl: e.original.ppl, bits: originalBits },
        tokens: e.original.n_tokens,
      });
      caption.textContent = `Perplexity on ${fmtNumber(e.original.n_tokens, 0)} held-out tokens against measured bits per weight: `
        + `this job, ${points.length} other finished job${points.length === 1 ? "" : "s"} of this model on the same tokens, and the original model.`;
      compareLinks(points);
    } else {
      document.getElementById("plot-ppl").replaceChildren(el("p", { class: "empty" }, "No perplexity: the verification did not evaluate this model (not a causal language model)."));
      caption.textContent = "Perplexity vs bits: not available for this model.";
    }
    bitsPerLayerPlot("plot-bits", r.tensors || [], r.measured_bits);
  }

  /** Links to the new-job form, filled in for a baseline of this model on the same evaluation tokens, for each
   * baseline the plot does not show yet: RTN and GPTQ at this job's bits, or Wanda (and NoWag-P) at this pruning
   * job's sparsity or pattern. */
  function compareLinks(points) {
    const pruning = job.target_bits == null;
    const shown = new Set([job.method, ...points.map((p) => p.method)]);
    const missing = (pruning ? ["wanda", "nowag-p"] : ["rtn", "gptq"]).filter((m) => !shown.has(m));
    const box = document.getElementById("plot-ppl-compare");
    if (!missing.length) return box.replaceChildren();
    const calibration = job.calibration === "none" ? "wiki" : job.calibration; // the baselines need calibration
    const rate = pruning ? { prune: job.tuning.pattern || String(job.tuning.sparsity) } : { bits: String(job.target_bits) };
    const links = missing.map((m) => el("a", {
      href: `/ui/jobs/new?${new URLSearchParams({ model_id: job.model_id, method: m, ...rate, calibration, eval_tokens: String(job.tuning.eval_tokens) })}`,
    }, `${m.toUpperCase()} ${rateLabel(job)}`));
    box.replaceChildren("Compare with a baseline on the same tokens: start ",
      ...links.flatMap((a, i) => (i ? [" or ", a] : [a])), ".");
  }

  startPolling();
}
