// Models: upload (drag and drop or file pickers, real progress), Hub import, and the list with sizes.
import {
  api, badge, clearAlerts, el, every, fmtBytes, fmtDate, listAll, requireKey, showError, showNotice,
} from "./api.js";
import { classify, uploadModel } from "./upload.js";

if (requireKey()) main();

function main() {
  const selected = new Map(); // path in the model -> File
  const skipped = new Map(); // path -> why it is left out

  const form = document.getElementById("upload-form");
  const nameInput = document.getElementById("model-name");
  const progress = document.getElementById("upload-progress");
  const percent = document.getElementById("upload-percent");
  const tbody = document.getElementById("selected-files");
  const summary = document.getElementById("selected-summary");
  const uploadButton = document.getElementById("upload-button");
  const rows = new Map(); // path -> status cell

  function setProgress(sent, total) {
    const p = total > 0 ? Math.floor((100 * sent) / total) : 0;
    progress.value = p;
    progress.textContent = `${p} %`;
    percent.textContent = `${p} %`;
  }

  function renderSelection() {
    tbody.replaceChildren();
    rows.clear();
    const paths = [...selected.keys()].sort();
    for (const path of paths) {
      const status = el("td", { "data-label": "Status" }, "waiting");
      rows.set(path, status);
      tbody.append(el("tr", {}, el("td", { "data-label": "File" }, el("code", {}, path)),
        el("td", { "data-label": "Size" }, fmtBytes(selected.get(path).size)), status));
    }
    for (const [path, why] of [...skipped.entries()].sort()) {
      tbody.append(el("tr", { class: "skipped" }, el("td", {}, el("code", {}, path)), el("td", {}, "–"),
        el("td", {}, `left out: ${why}`)));
    }
    const bytes = [...selected.values()].reduce((s, f) => s + f.size, 0);
    summary.textContent = selected.size
      ? `${selected.size} file${selected.size > 1 ? "s" : ""} selected, ${fmtBytes(bytes)}${skipped.size ? `; ${skipped.size} left out` : ""}.`
      : "No files selected.";
    setProgress(0, 1);
  }

  // `path` is the name inside the model: a chosen or dropped folder's own name is dropped from the front.
  function add(path, file, folder) {
    if (!nameInput.value && folder) nameInput.value = folder;
    const why = classify(path);
    if (why) skipped.set(path, why);
    else selected.set(path, file);
  }

  function addFileList(list) {
    for (const f of list) {
      const rel = f.webkitRelativePath || f.name;
      const parts = rel.split("/");
      add(parts.length > 1 ? parts.slice(1).join("/") : rel, f, parts.length > 1 ? parts[0] : null);
    }
    renderSelection();
  }

  for (const id of ["upload-files-input", "upload-folder-input"]) {
    const input = document.getElementById(id);
    input.addEventListener("change", () => {
      addFileList(input.files);
      input.value = "";
    });
  }

  document.getElementById("clear-button").addEventListener("click", () => {
    selected.clear();
    skipped.clear();
    renderSelection();
  });

  // Drag and drop: files, or whole folders walked through the entries API.
  const zone = document.getElementById("dropzone");
  zone.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    const items = [...(ev.dataTransfer.items || [])];
    const entries = items.map((i) => (i.webkitGetAsEntry ? i.webkitGetAsEntry() : null)).filter(Boolean);
    if (entries.length) {
      for (const entry of entries) {
        if (entry.isDirectory) await walk(entry, "", entry.name);
        else add(entry.name, await new Promise((res, rej) => entry.file(res, rej)), null);
      }
      renderSelection();
    } else {
      addFileList(ev.dataTransfer.files);
    }
  });

  async function walk(dir, prefix, folder) {
    const reader = dir.createReader();
    for (;;) {
      const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
      if (!batch.length) break;
      for (const entry of batch) {
        const path = prefix ? `${prefix}/${entry.name}` : entry.name;
        if (entry.isDirectory) await walk(entry, path, folder);
        else add(path, await new Promise((res, rej) => entry.file(res, rej)), folder);
      }
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearAlerts();
    const name = nameInput.value.trim();
    if (!selected.size) return showError(new Error("no files"), "Choose the model's files first");
    if (![...selected.keys()].some((p) => p.endsWith(".safetensors"))) {
      return showError(new Error("no .safetensors file among them"), "Cannot upload these files");
    }
    if (!name) {
      nameInput.setAttribute("aria-invalid", "true");
      nameInput.focus();
      return showError(new Error("the model needs a name"), "Cannot upload yet");
    }
    nameInput.removeAttribute("aria-invalid");
    uploadButton.disabled = true;
    const files = [...selected.entries()].map(([path, file]) => ({ path, file }));
    try {
      const model = await uploadModel(name, files, {
        onProgress: setProgress,
        onFile: (path, status) => {
          const cell = rows.get(path);
          if (cell) cell.textContent = { sending: "sending…", done: "uploaded", failed: "failed" }[status];
        },
      });
      setProgress(1, 1);
      summary.textContent = `${files.length} file${files.length > 1 ? "s" : ""} uploaded to “${model.name}”.`;
      showNotice(`Model “${model.name}” is uploaded and ready (${fmtBytes(model.total_bytes)}).`);
      selected.clear();
      skipped.clear();
      reload();
    } catch (e) {
      const where = e.modelId ? " (the partly uploaded model stays in the list; delete it or try again)" : "";
      showError(e, `The upload failed${where}`);
      reload();
    } finally {
      uploadButton.disabled = false;
    }
  });

  // Hub import: checked by the API at once, then downloaded in the background (the list follows it).
  const importForm = document.getElementById("import-form");
  importForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearAlerts();
    const hubId = document.getElementById("hub-id").value.trim();
    const revision = document.getElementById("hub-revision").value.trim() || "main";
    const token = document.getElementById("hub-token").value.trim();
    if (!hubId) return showError(new Error("enter a model ID such as owner/name"), "Cannot import yet");
    const button = importForm.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const m = await api("/v1/models/import", { method: "POST", json: { hub_id: hubId, revision, ...(token ? { token } : {}) } });
      document.getElementById("hub-token").value = "";
      showNotice(`Importing ${m.hub_id}: the list below shows when it is ready.`);
      reload();
    } catch (e) {
      showError(e, `Could not import ${hubId}`);
    } finally {
      button.disabled = false;
    }
  });

  // The list.
  const body = document.getElementById("models-body");
  const empty = document.getElementById("models-empty");

  async function remove(m) {
    if (!confirm(`Delete model “${m.name}” and its files?`)) return;
    try {
      await api(`/v1/models/${encodeURIComponent(m.id)}`, { method: "DELETE" });
      showNotice(`Model “${m.name}” deleted.`);
      reload();
    } catch (e) {
      showError(e, `Could not delete “${m.name}”`);
    }
  }

  let busy = false;
  async function refresh() {
    const models = await listAll("/v1/models");
    body.replaceChildren(...models.map((m) => {
      const del = el("button", { type: "button", class: "button small secondary", "aria-label": `Delete model ${m.name}` }, "Delete");
      del.addEventListener("click", () => remove(m));
      const actions = el("td", { class: "actions-cell", "data-label": "Actions" },
        m.state === "ready" ? el("a", { class: "button small", href: `/ui/jobs/new?model_id=${encodeURIComponent(m.id)}`,
          "aria-label": `New job for ${m.name}` }, "New job") : null, del);
      return el("tr", { "data-model-id": m.id },
        el("th", { scope: "row", "data-label": "Name" }, m.name, m.error ? el("p", { class: "row-error" }, m.error) : null),
        el("td", { "data-label": "State" }, badge(m.state)),
        el("td", { "data-label": "Source" }, m.source === "hub" ? `Hub ${m.hub_id}${m.hub_revision ? ` @ ${m.hub_revision.slice(0, 8)}` : ""}` : "upload"),
        el("td", { "data-label": "Size" }, fmtBytes(m.total_bytes)),
        el("td", { "data-label": "Files" }, String(m.file_count)),
        el("td", { "data-label": "Created" }, fmtDate(m.created_at)),
        actions);
    }));
    empty.hidden = models.length > 0;
    busy = models.some((m) => m.state === "importing");
  }

  function reload() {
    refresh().catch((e) => showError(e, "Could not load the models"));
  }

  document.getElementById("refresh-models").addEventListener("click", reload);
  // Follow imports while one runs; otherwise the list changes only by what this page does.
  let first = true;
  every(3000, async () => {
    if (first || busy) {
      first = false;
      await refresh();
    }
  });
}
