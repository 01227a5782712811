// New job: model, method, target bits (with the predicted output size), calibration, outputs, tuning.
import { api, ApiError, clearAlerts, el, fmtBytes, fmtNumber, listAll, requireKey, showError, showNotice } from "./api.js";


if (requireKey()) main();

async function main() {
  const form = document.getElementById("job-form");
  // The API's accepted bits per method (api/schemas/jobs.py METHOD_BITS), rendered into the page by the server.
  const BITS = JSON.parse(form.dataset.methodBits);
  const PRUNE = JSON.parse(form.dataset.pruneMethods); // no target bits: a sparsity or an N:M pattern
  const MODEL_FREE = JSON.parse(form.dataset.modelFreeMethods); // run without calibration text too
  const pruneInput = document.getElementById("job-prune");
  const modelSel = document.getElementById("job-model");
  const methodSel = document.getElementById("job-method");
  const bitsInput = document.getElementById("job-bits");
  const calSel = document.getElementById("job-calibration");
  const predicted = document.getElementById("predicted-size");
  const query = new URLSearchParams(location.search);
  // One key per form: pressing "Start job" twice (or a retry after a lost answer) makes one job.
  const idempotencyKey = `ui-${crypto.randomUUID()}`;
  let detail = null; // ModelDetail of the selected model

  function updatePrediction() {
    const bits = parseFloat(bitsInput.value);
    if (PRUNE.includes(methodSel.value)) {
      predicted.textContent = "no rate target: pruning keeps the kept weights in the model's dtype";
    } else if (!detail) {
      predicted.textContent = "select a model";
    } else if (!detail.parameter_count) {
      predicted.textContent = "unknown (the service could not count this model's parameters)";
    } else if (!isFinite(bits)) {
      predicted.textContent = "enter the target bits";
    } else {
      const bytes = (bits * detail.parameter_count) / 8;
      const weights = detail.files.filter((f) => f.path.endsWith(".safetensors")).reduce((s, f) => s + f.size, 0);
      predicted.textContent = `about ${fmtBytes(bytes)} (${bits} bits × ${fmtNumber(detail.parameter_count, 0)} parameters ÷ 8; `
        + `the original weights take ${fmtBytes(weights)})`;
    }
  }

  async function selectModel() {
    detail = null;
    updatePrediction();
    if (!modelSel.value) return;
    try {
      detail = await api(`/v1/models/${encodeURIComponent(modelSel.value)}`);
    } catch (e) {
      showError(e, "Could not read the model");
    }
    updatePrediction();
  }

  function updateMethod() {
    const pruning = PRUNE.includes(methodSel.value);
    document.getElementById("prune-field").hidden = !pruning;
    document.getElementById("bits-field").hidden = pruning;
    if (!pruning) {
      const [lo, hi] = BITS[methodSel.value];
      bitsInput.min = lo;
      bitsInput.max = hi;
    }
    const none = calSel.querySelector("option[value=none]");
    none.disabled = !MODEL_FREE.includes(methodSel.value);
    if (none.disabled && calSel.value === "none") calSel.value = "wiki";
    updatePrediction();
  }

  /** Settings from the address (the job page's "compare with a baseline" links): method, bits, calibration and
   * evaluation tokens, each taken only when the form offers it. */
  function prefill() {
    const method = query.get("method");
    if (method && method in BITS) methodSel.value = method;
    const bits = query.get("bits");
    if (bits) bitsInput.value = bits;
    const cal = query.get("calibration");
    if (cal && [...calSel.options].some((o) => o.value === cal)) calSel.value = cal;
    const prune = query.get("prune");
    if (prune) pruneInput.value = prune;
    const evalTokens = query.get("eval_tokens");
    if (evalTokens) form.elements.eval_tokens.value = evalTokens;
  }

  modelSel.addEventListener("change", selectModel);
  methodSel.addEventListener("change", updateMethod);
  bitsInput.addEventListener("input", updatePrediction);

  async function loadCalibration(selectId) {
    const texts = await api("/v1/calibration-texts");
    for (const o of [...calSel.querySelectorAll("option[data-uploaded]")]) o.remove();
    for (const t of texts) {
      calSel.append(el("option", { value: t.id, "data-uploaded": "1" }, `Your text: ${t.name} (${fmtBytes(t.size)})`));
    }
    if (selectId) calSel.value = selectId;
  }

  try {
    const models = (await listAll("/v1/models?state=ready")).sort((a, b) => a.name.localeCompare(b.name));
    modelSel.replaceChildren(el("option", { value: "" }, models.length ? "Choose a model…" : "No ready models: upload one first"),
      ...models.map((m) => el("option", { value: m.id }, `${m.name} (${fmtBytes(m.total_bytes)})`)));
    const want = query.get("model_id");
    if (want && models.some((m) => m.id === want)) modelSel.value = want;
    else if (models.length === 1) modelSel.value = models[0].id;
    await loadCalibration();
  } catch (e) {
    showError(e, "Could not load your models");
  }
  prefill();
  updateMethod();
  selectModel();

  function intField(name) {
    const v = form.elements[name].value.trim();
    return v === "" ? undefined : Number(v);
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearAlerts();
    for (const x of form.querySelectorAll("[aria-invalid]")) x.removeAttribute("aria-invalid");
    if (!modelSel.value) {
      modelSel.setAttribute("aria-invalid", "true");
      modelSel.focus();
      return showError(new ApiError(0, "missing_model", "choose a model first"), "Cannot start the job");
    }
    const outputs = [...form.querySelectorAll("input[name=outputs]:checked")].map((x) => x.value);
    const tuning = {};
    for (const name of ["calib_seqs", "calib_len", "finetune_epochs", "allocation_strength", "eval_tokens", "seed"]) {
      const v = intField(name);
      if (v !== undefined) tuning[name] = v;
    }
    const allocation = form.elements.allocation.value;
    if (allocation) tuning.allocation = allocation;
    if (form.elements.act_order.checked) tuning.act_order = true;
    if (PRUNE.includes(methodSel.value)) {
      const v = pruneInput.value.trim();
      if (v.includes(":")) tuning.pattern = v;
      else tuning.sparsity = Number(v);
    }
    const body = {
      model_id: modelSel.value,
      method: methodSel.value,
      calibration: calSel.value,
      outputs,
      tuning,
    };
    if (!PRUNE.includes(methodSel.value)) body.target_bits = Number(bitsInput.value);
    const webhook = form.elements.webhook_url.value.trim();
    if (webhook) body.webhook_url = webhook;
    const button = document.getElementById("create-job");
    button.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: body, headers: { "Idempotency-Key": idempotencyKey } });
      location.assign(`/ui/jobs/${encodeURIComponent(job.id)}`);
    } catch (e) {
      // Point at the field the API names, when it names one.
      const loc = e.detail && Array.isArray(e.detail) && e.detail[0] && e.detail[0].loc;
      const field = loc && form.elements[loc[loc.length - 1]];
      if (field && field.setAttribute) field.setAttribute("aria-invalid", "true");
      showError(e, "Could not start the job");
      button.disabled = false;
    }
  });

  // Calibration text upload: the returned cal_… id becomes this form's calibration.
  const calForm = document.getElementById("cal-form");
  calForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearAlerts();
    const file = document.getElementById("cal-file").files[0];
    if (!file) return showError(new ApiError(0, "missing_file", "choose a .txt or .jsonl file"), "Cannot upload yet");
    const button = calForm.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const cal = await api(`/v1/calibration-texts?name=${encodeURIComponent(file.name)}`, {
        method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
      });
      await loadCalibration(cal.id);
      showNotice(`Calibration text ${cal.name} uploaded and selected.`);
    } catch (e) {
      showError(e, `Could not upload ${file.name}`);
    } finally {
      button.disabled = false;
    }
  });
}
