// sfumato's page: queue a job (POST api/jobs), poll its state for progress and previews, show the gallery.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // id of the job this page is following
const NUMBERS = ["width", "height", "steps", "guidance", "seed", "batch"];

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && (body.detail || (body.error && body.error.message) || body.error);
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function figure(entry) {
  const fig = document.createElement("figure");
  fig.className = "result";
  const img = document.createElement("img");
  img.src = entry.url;
  img.alt = entry.parameters.split("\n")[0];
  const caption = document.createElement("figcaption");
  caption.textContent = entry.parameters;
  const link = document.createElement("a");
  link.href = entry.url;
  link.download = entry.file;
  link.textContent = "download PNG";
  fig.append(img, link, caption);
  return fig;
}

async function loadGallery() {
  const entries = await api("api/outputs?limit=48");
  const gallery = $("gallery");
  gallery.replaceChildren(...entries.map(figure));
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

async function follow(id) {
  while (current === id) {
    const state = await api(`api/jobs/${id}`);
    $("progress").value = state.progress;
    if (["queued", "running"].includes(state.status)) {
      const waiting = state.status === "queued" ? "waiting in the queue" : `step ${state.step}/${state.steps}`;
      const call = state.job_count > 1 ? `, batch ${state.job_no + 1}/${state.job_count}` : "";
      $("status").textContent = `${state.status}: ${waiting}${call}`;
    }
    if (state.preview) {
      $("preview").src = "data:image/png;base64," + state.preview;
      $("preview").hidden = false;
    }
    if (!["queued", "running"].includes(state.status)) {
      if (state.images.length) $("preview").src = state.images[0].url;
      await loadGallery(); // first, so that "done" means the gallery shows the new images
      $("status").textContent = state.status === "failed" ? `failed: ${state.error}` :
        `${state.status}: ${state.images.length} image(s), seed ${state.request.seed}`;
      if (state.status === "failed") showError(state.error);
      break;
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, sampler: $("sampler").value };
  for (const name of NUMBERS) body[name] = Number($(name).value);
  setBusy(true);
  try {
    const job = await api("api/jobs", { method: "POST", body: JSON.stringify(body) });
    current = job.id;
    $("status").textContent = "queued";
    await follow(job.id);
  } catch (e) {
    showError(e.message);
    $("status").textContent = "idle";
  } finally {
    current = null;
    setBusy(false);
  }
}

async function cancel() {
  if (current) {
    try { await api(`api/jobs/${current}/cancel`, { method: "POST" }); } catch (e) { showError(e.message); }
  }
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  try {
    const info = await api("api/info");
    $("model").textContent = `model: ${info.model}` + (info.model_hash ? ` [${info.model_hash}]` : "") +
      ` · up to ${info.limits.max_pixels} px, ${info.limits.max_steps} steps, ${info.limits.max_images} images`;
    for (const name of info.samplers) $("sampler").add(new Option(name, name));
    for (const side of ["width", "height"]) {
      $(side).value = info.default_size;
      $(side).step = info.size_multiple;
      $(side).min = info.size_multiple;
    }
    $("guidance").value = info.default_guidance;
    $("steps").max = info.limits.max_steps;
    $("batch").max = info.limits.max_images;
    await loadGallery();
  } catch (e) {
    showError(e.message);
  }
}

document.addEventListener("DOMContentLoaded", init);
