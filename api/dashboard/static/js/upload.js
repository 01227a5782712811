// Uploading a model directory through the API, as api/client.py does: create the model, send each file
// (one streamed PUT, or above MULTIPART_THRESHOLD a multipart upload through presigned part URLs), finalize.
// XMLHttpRequest rather than fetch: only XHR reports upload progress.

import { api, ApiError, errorFromBody, getKey, NETWORK_ERROR } from "./api.js";

// One part of the service's multipart uploads (api/services/models.py DEFAULT_PART_SIZE): bigger files go in parts.
export const MULTIPART_THRESHOLD = 64 * 1024 * 1024;
const PART_ATTEMPTS = 4;
const URL_BATCH = 16;

// The files a model directory may hold (api/schemas/models.py ALLOWED_SUFFIXES / PICKLE_SUFFIXES).
const ALLOWED = [".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken", ".md"];
const PICKLE = [".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"];

const suffix = (name) => {
  const i = name.lastIndexOf(".");
  return i < 0 ? "" : name.slice(i).toLowerCase();
};

/** Sort dropped or chosen files into the ones to send and the ones left out (with why). */
export function classify(path) {
  if (path.split("/").some((p) => p.startsWith("."))) return "hidden file";
  const s = suffix(path);
  if (PICKLE.includes(s)) return "pickle checkpoint: refused (upload .safetensors instead)";
  if (!ALLOWED.includes(s)) return "not a model file";
  return null;
}

/** A PUT with upload progress; resolves to the XHR, rejects with ApiError. */
function xhrPut(url, blob, headers, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (ev) => onProgress(ev.loaded);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(blob.size);
        resolve(xhr);
      } else {
        reject(errorFromBody(xhr.status, xhr.responseText, xhr.getResponseHeader("X-Request-ID")));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, "network_error", NETWORK_ERROR));
    xhr.onabort = () => reject(new ApiError(0, "aborted", "the upload was stopped"));
    xhr.send(blob);
  });
}

const filePath = (modelId, path) =>
  `/v1/models/${encodeURIComponent(modelId)}/files/${path.split("/").map(encodeURIComponent).join("/")}`;

// Local-store part URLs point at this API's own /v1/store route under NWC_PUBLIC_URL; the page may have been
// opened under another name for the same server (localhost vs 127.0.0.1), which would make the PUT cross-origin.
function sameOriginStoreUrl(url) {
  const u = new URL(url, location.href);
  return u.pathname.startsWith("/v1/store/") ? `${location.origin}${u.pathname}${u.search}` : u.href;
}

async function putSingle(modelId, path, file, onBytes) {
  await xhrPut(filePath(modelId, path), file,
    { Authorization: `Bearer ${getKey()}`, "Content-Type": "application/octet-stream" }, onBytes);
}

async function putMultipart(modelId, path, file, onBytes) {
  const base = `/v1/models/${encodeURIComponent(modelId)}/uploads`;
  const up = await api(base, { method: "POST", json: { path, size: file.size } });
  const uploadBase = `${base}/${encodeURIComponent(up.upload_id)}`;
  const etags = {};
  let sentBefore = 0; // bytes of finished parts
  try {
    for (let first = 1; first <= up.part_count; first += URL_BATCH) {
      const numbers = [];
      for (let n = first; n < first + URL_BATCH && n <= up.part_count; n += 1) numbers.push(n);
      let urls = await partUrls(uploadBase, numbers);
      for (const n of numbers) {
        const start = (n - 1) * up.part_size;
        const blob = file.slice(start, Math.min(start + up.part_size, file.size));
        for (let attempt = 1; ; attempt += 1) {
          try {
            const xhr = await xhrPut(sameOriginStoreUrl(urls[n]), blob, {}, (b) => onBytes(sentBefore + b));
            const etag = xhr.getResponseHeader("ETag");
            if (!etag) throw new ApiError(0, "no_etag", "the store returned no ETag for a part (S3 CORS must expose the ETag header)");
            etags[n] = etag;
            break;
          } catch (e) {
            if (attempt >= PART_ATTEMPTS || (e.status >= 400 && e.status < 500 && e.status !== 403)) throw e;
            urls = { ...urls, ...(await partUrls(uploadBase, [n])) }; // a 403 is an expired URL: ask again
          }
        }
        sentBefore += blob.size;
      }
    }
    const parts = Object.keys(etags).map(Number).sort((a, b) => a - b).map((n) => ({ part_number: n, etag: etags[n] }));
    await api(`${uploadBase}/complete`, { method: "POST", json: { parts } });
  } catch (e) {
    // Drop the parts already stored; the model stays open for another try.
    api(uploadBase, { method: "DELETE" }).catch(() => {});
    throw e;
  }
}

async function partUrls(uploadBase, numbers) {
  const out = await api(`${uploadBase}/parts`, { method: "POST", json: { part_numbers: numbers } });
  return Object.fromEntries(out.parts.map((p) => [p.part_number, p.url]));
}

/**
 * Upload `files` ([{path, file}]) as a new model called `name` and finalize it.
 * `onProgress(bytesSent, totalBytes)`; `onFile(path, status)` with status "sending" | "done" | "failed".
 * Resolves to the ready model (ModelDetail); rejects with ApiError, with `.modelId` when the model exists.
 */
export async function uploadModel(name, files, { onProgress = () => {}, onFile = () => {} } = {}) {
  const total = files.reduce((s, f) => s + f.file.size, 0);
  let done = 0;
  const model = await api("/v1/models", { method: "POST", json: { name } });
  try {
    for (const { path, file } of files) {
      onFile(path, "sending");
      const onBytes = (b) => onProgress(done + Math.min(b, file.size), total);
      try {
        if (file.size > MULTIPART_THRESHOLD) await putMultipart(model.id, path, file, onBytes);
        else await putSingle(model.id, path, file, onBytes);
      } catch (e) {
        onFile(path, "failed");
        e.message = `${path}: ${e.message}`;
        throw e;
      }
      done += file.size;
      onProgress(done, total);
      onFile(path, "done");
    }
    return await api(`/v1/models/${encodeURIComponent(model.id)}/finalize`, { method: "POST" });
  } catch (e) {
    e.modelId = model.id;
    throw e;
  }
}
