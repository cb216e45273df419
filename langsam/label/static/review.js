// The review page. Every user string (class names, labels, reviewer) reaches the page through
// textContent or an Option's text, never as HTML; the server's CSP forbids inline scripts as well.
"use strict";

const STATUS_COLOURS = {
  proposed: [255, 200, 0], accepted: [0, 200, 80], corrected: [0, 140, 255], added: [180, 80, 255],
  rejected: [220, 40, 40],
};
const DRAG_PIXELS = 5;  // a press that moves further than this (screen pixels) draws a box
const RETRIES = 4;

const state = {
  holder: randomId(),  // one per page load: two tabs never share a lease
  apiKey: sessionStorage.getItem("langsam-api-key") || "",
  classes: [], image: null, objects: [], selected: 0, picture: null, masks: new Map(), skipped: [],
  leaseTtl: 120, renewing: null, busy: false, press: null, drag: null,
};
// Click-to-mask times (ms, press to redrawn mask) for the benchmark and the tests.
window.langsamTimings = [];

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);  // crypto.randomUUID needs a secure context; this does not
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const $ = (id) => document.getElementById(id);

function say(text) { $("message").textContent = text; }

// ------------------------------------------------------------------ HTTP
async function api(method, path, body) {
  // A retried request keeps its body, so an action keeps its idempotency key: the server
  // applies it once however many times it arrives.
  let lastError = null;
  for (let attempt = 0; attempt < RETRIES; attempt += 1) {
    let response;
    try {
      const headers = { "Content-Type": "application/json" };
      if (state.apiKey) headers["X-API-Key"] = state.apiKey;
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (error) {
      lastError = error;  // the network: retry
      await new Promise((resolve) => setTimeout(resolve, 200 * 2 ** attempt));
      continue;
    }
    if (response.status === 401) {
      $("key-row").hidden = false;
      throw new Error("this server needs its API key: enter it at the top");
    }
    if (response.status >= 500) {
      lastError = new Error(`server error ${response.status}`);
      await new Promise((resolve) => setTimeout(resolve, 200 * 2 ** attempt));
      continue;
    }
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.detail || `error ${response.status}`);
    return answer;
  }
  throw lastError;
}

async function imageBitmap(imageId) {
  const headers = state.apiKey ? { "X-API-Key": state.apiKey } : {};
  const response = await fetch(`/api/images/${imageId}/pixels`, { headers });
  if (!response.ok) throw new Error(`could not load image ${imageId} (${response.status})`);
  return createImageBitmap(await response.blob());
}

function reviewer() { return $("reviewer").value.trim() || "reviewer"; }

function actionBody(extra) { return { holder: state.holder, reviewer: reviewer(), key: randomId(), ...extra }; }

// ------------------------------------------------------------------ drawing
function maskCanvas(mask, colour) {
  const canvas = document.createElement("canvas");
  canvas.width = mask.width; canvas.height = mask.height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(mask.width, mask.height);
  let offset = 0;
  mask.runs.forEach((run, index) => {
    if (index % 2 === 1) {
      for (let i = offset; i < offset + run; i += 1) {
        pixels.data[4 * i] = colour[0]; pixels.data[4 * i + 1] = colour[1];
        pixels.data[4 * i + 2] = colour[2]; pixels.data[4 * i + 3] = 255;
      }
    }
    offset += run;
  });
  context.putImageData(pixels, 0, 0);
  return canvas;
}

function draw() {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  if (!state.picture) { context.clearRect(0, 0, canvas.width, canvas.height); return; }
  context.drawImage(state.picture, 0, 0, canvas.width, canvas.height);
  state.objects.forEach((object, index) => {
    const key = `${object.id}:${object.status}:${object.mask.runs.length}:${object.mask.runs[1] || 0}`;
    let layer = state.masks.get(object.id);
    if (!layer || layer.key !== key) {
      layer = { key, canvas: maskCanvas(object.mask, STATUS_COLOURS[object.status] || [128, 128, 128]) };
      state.masks.set(object.id, layer);
    }
    const selected = index === state.selected;
    if (object.status === "rejected" && !selected) return;
    context.globalAlpha = selected ? 0.55 : 0.25;
    context.drawImage(layer.canvas, 0, 0, canvas.width, canvas.height);
  });
  context.globalAlpha = 1;
  const current = state.objects[state.selected];
  if (current) {
    for (const [x, y, label] of current.points || []) {
      context.fillStyle = label === 1 ? "#0c0" : "#e00";
      context.beginPath();
      context.arc(x, y, 5, 0, 2 * Math.PI);
      context.fill();
    }
    if (current.box) {
      const [x0, y0, x1, y1] = current.box;
      context.strokeStyle = "#ff0"; context.lineWidth = 2;
      context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
  }
  if (state.drag) {
    const { x0, y0, x1, y1 } = state.drag;
    context.setLineDash([6, 4]); context.strokeStyle = "#0ff"; context.lineWidth = 2;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    context.setLineDash([]);
  }
}

function fitCanvas() {
  // As large as the stage and the window allow, small images enlarged; clicks map back by ratio.
  const canvas = $("canvas");
  if (!state.image) return;
  const room = $("stage").clientWidth;
  const fit = Math.min(room / canvas.width, (window.innerHeight - 90) / canvas.height);
  canvas.style.width = `${Math.max(1, Math.floor(canvas.width * fit))}px`;
}

function fillSelect(select, values, current) {
  select.replaceChildren();
  const names = values.includes(current) || current === undefined ? values : [current, ...values];
  for (const name of names) select.append(new Option(name, name, false, name === current));
}

function render() {
  const list = $("objects");
  list.replaceChildren();
  state.objects.forEach((object, index) => {
    const item = document.createElement("li");
    item.className = `status-${object.status}` + (index === state.selected ? " selected" : "");
    const score = object.score === null ? "" : ` ${object.score.toFixed(2)}`;
    item.textContent = `${object.label} \u2014 ${object.status}${score}`;
    item.dataset.objectId = String(object.id);
    item.addEventListener("click", () => { state.selected = index; render(); });
    list.append(item);
  });
  const current = state.objects[state.selected];
  fillSelect($("object-label"), state.classes, current ? current.label : undefined);
  $("object-label").disabled = !current;
  const image = state.image;
  $("image-info").textContent = image ? `image ${image.id} (${image.width}\u00d7${image.height})` : "";
  draw();
}

function showProgress(progress) {
  if (!progress) return;
  $("progress-overall").textContent = `${progress.reviewed_images} / ${progress.images} images reviewed`;
  const mine = state.image ? progress.per_image[String(state.image.id)] : null;
  $("progress-image").textContent = mine ? `this image: ${mine[0]} / ${mine[1]} objects reviewed` : "";
}

// ------------------------------------------------------------------ the queue
function filters() {
  const label = $("filter-label").value, status = $("filter-status").value;
  return { labels: label ? [label] : null, statuses: status ? [status] : null };
}

async function show(view) {
  const sameImage = state.image && view.image && state.image.id === view.image.id;
  state.image = view.image;
  state.objects = view.objects;
  if (!sameImage) { state.masks.clear(); state.selected = 0; state.picture = null; }
  state.selected = Math.min(state.selected, Math.max(0, state.objects.length - 1));
  $("empty").hidden = !!state.image;
  if (state.image && !sameImage) {
    state.picture = await imageBitmap(state.image.id);
    const canvas = $("canvas");
    canvas.width = state.image.width; canvas.height = state.image.height;  // image pixels; CSS scales it
    fitCanvas();
  }
  showProgress(view.progress);
  render();
  document.body.dataset.imageId = state.image ? String(state.image.id) : "";
}

async function nextImage(skipCurrent = true) {
  if (state.image) {
    // Moving on passes this image over for the rest of the session (reload the page to see it again).
    if (skipCurrent) state.skipped.push(state.image.id);
    await api("POST", "/api/release", { holder: state.holder, image_id: state.image.id });
  }
  state.image = null;
  await show(await api("POST", "/api/lease", { holder: state.holder, skip: state.skipped, ...filters() }));
}

async function renewLease() {
  if (!state.image || document.visibilityState !== "visible") return;
  const answer = await api("POST", "/api/renew", { holder: state.holder, image_id: state.image.id });
  if (!answer.held) {
    say("this image's lease expired while the tab was hidden; moving to the next image");
    state.image = null;
    await show(await api("POST", "/api/lease", { holder: state.holder, skip: state.skipped, ...filters() }));
  }
}

// ------------------------------------------------------------------ actions
async function act(run) {
  if (state.busy) return;
  state.busy = true;
  document.body.dataset.busy = "1";
  try {
    await run();
    say("");
  } catch (error) {
    say(error.message);
  } finally {
    state.busy = false;
    document.body.dataset.busy = "";
    document.body.dataset.actions = String(Number(document.body.dataset.actions || 0) + 1);
  }
}

function selectedObject() { return state.objects[state.selected]; }

function objectAction(kind, extra, advance) {
  const object = selectedObject();
  if (!object) return;
  act(async () => {
    await show(await api("POST", `/api/objects/${object.id}/${kind}`, actionBody(extra)));
    if (advance) state.selected = Math.min(state.selected + 1, state.objects.length - 1);
    render();
  });
}

function imagePoint(event) {
  const canvas = $("canvas");
  const rect = canvas.getBoundingClientRect();
  // Clamped: a box dragged past the edge ends at the edge.
  const x = Math.min(Math.max(((event.clientX - rect.left) / rect.width) * canvas.width, 0), canvas.width);
  const y = Math.min(Math.max(((event.clientY - rect.top) / rect.height) * canvas.height, 0), canvas.height);
  return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

function addPoint(event, positive) {
  const object = selectedObject();
  if (!object || !state.image) return;
  const started = performance.now();
  const [x, y] = imagePoint(event);
  const points = [...(object.points || []), [x, y, positive ? 1 : 0]];
  act(async () => {
    await show(await api("POST", `/api/objects/${object.id}/points`, actionBody({ points })));
    window.langsamTimings.push(performance.now() - started);
  });
}

function addBox(start, end) {
  if (!state.image) return;
  const box = [start[0], start[1], end[0], end[1]];
  act(async () => {
    const before = state.objects.length;
    await show(await api("POST", `/api/images/${state.image.id}/add`, actionBody({ box, label: $("new-label").value })));
    if (state.objects.length > before) state.selected = state.objects.length - 1;
    render();
  });
}

function undo() {
  if (!state.image) return;
  act(async () => show(await api("POST", "/api/undo", actionBody({ image_id: state.image.id }))));
}

// ------------------------------------------------------------------ input
function onKey(event) {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  const key = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey || event.altKey) && key !== "z") return;  // the browser's own shortcuts
  if (key === "a") objectAction("accept", {}, true);
  else if (key === "r") objectAction("reject", {}, true);
  else if (key === "n" || event.key === "ArrowRight") { state.selected = Math.min(state.selected + 1, state.objects.length - 1); render(); }
  else if (key === "p" || event.key === "ArrowLeft") { state.selected = Math.max(state.selected - 1, 0); render(); }
  else if (key === "z") undo();
  else if (event.key === "Enter") act(() => nextImage(true));
  else return;
  event.preventDefault();
}

function onPress(event) {
  if (event.button !== 0 && event.button !== 2) return;
  state.press = { clientX: event.clientX, clientY: event.clientY, button: event.button, shift: event.shiftKey,
                  point: imagePoint(event) };
}

function onMove(event) {
  if (!state.press || state.press.button !== 0) return;
  const moved = Math.hypot(event.clientX - state.press.clientX, event.clientY - state.press.clientY);
  if (moved < DRAG_PIXELS && !state.drag) return;
  const [x1, y1] = imagePoint(event);
  const [x0, y0] = state.press.point;
  state.drag = { x0, y0, x1, y1 };
  draw();
}

function onRelease(event) {
  const press = state.press;
  state.press = null;
  if (!press) return;
  if (state.drag) {
    state.drag = null;
    addBox(press.point, imagePoint(event));
    return;
  }
  if (event.target === $("canvas")) addPoint(event, press.button === 0 && !press.shift);
}

async function start() {
  $("reviewer").value = localStorage.getItem("langsam-reviewer") || "";
  $("reviewer").addEventListener("change", () => localStorage.setItem("langsam-reviewer", $("reviewer").value));
  $("api-key").addEventListener("change", () => {
    state.apiKey = $("api-key").value.trim();
    sessionStorage.setItem("langsam-api-key", state.apiKey);
    act(boot);
  });
  document.addEventListener("keydown", onKey);
  window.addEventListener("resize", fitCanvas);
  const canvas = $("canvas");
  canvas.addEventListener("mousedown", onPress);
  window.addEventListener("mousemove", onMove);  // a drag may leave the canvas
  window.addEventListener("mouseup", onRelease);
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  $("object-label").addEventListener("change", () => {
    const object = selectedObject();
    if (object && $("object-label").value !== object.label) objectAction("relabel", { label: $("object-label").value }, false);
    $("canvas").focus();
  });
  for (const id of ["filter-label", "filter-status"]) {
    $(id).addEventListener("change", () => { state.skipped = []; $("canvas").focus(); act(() => nextImage(false)); });
  }
  window.addEventListener("pagehide", () => {
    if (!state.image) return;
    const headers = { "Content-Type": "application/json" };
    if (state.apiKey) headers["X-API-Key"] = state.apiKey;
    fetch("/api/release", { method: "POST", headers, keepalive: true,
                            body: JSON.stringify({ holder: state.holder, image_id: state.image.id }) });
  });
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") renewLease(); });
  await act(boot);
}

function figure(value) { return value === null || value === undefined ? "-" : Number(value).toFixed(3); }

async function showRounds() {
  const { rounds } = await api("GET", "/api/rounds");
  if (!rounds.length) return;
  const body = $("rounds-table").tBodies[0];
  body.replaceChildren();
  for (const round of rounds) {
    const row = body.insertRow();
    for (const value of [String(round.round), figure(round.review.acceptance_rate),
                         figure(round.review.corrections_per_object), figure(round.review.clicks_per_mask),
                         figure(round.eval.before.miou_click_1), figure(round.eval.after.miou_click_1)]) {
      row.insertCell().textContent = value;
    }
  }
  const newest = rounds[rounds.length - 1];
  if (newest.plot) {
    const headers = state.apiKey ? { "X-API-Key": state.apiKey } : {};
    const response = await fetch(`/api/rounds/${newest.round}/plot`, { headers });
    if (response.ok) {
      const plot = document.createElement("img");
      plot.alt = `report of round ${newest.round}`;
      plot.src = URL.createObjectURL(await response.blob());
      $("rounds-plot").replaceChildren(plot);
    }
  }
  $("rounds").hidden = false;
}

async function boot() {
  const config = await api("GET", "/api/config");
  state.classes = config.classes;
  state.leaseTtl = config.lease_ttl_s;
  $("filter-label").replaceChildren(new Option("all classes", ""));
  for (const name of config.classes) $("filter-label").append(new Option(name, name));
  $("filter-status").replaceChildren(new Option("any status", ""));
  for (const name of config.statuses) $("filter-status").append(new Option(name, name, false, name === "proposed"));
  fillSelect($("new-label"), config.classes, config.classes[0]);
  if (!state.renewing) {
    state.renewing = setInterval(() => renewLease().catch((error) => say(error.message)), (state.leaseTtl * 1000) / 3);
  }
  await show(await api("POST", "/api/lease", { holder: state.holder, ...filters() }));
  await showRounds();
  document.body.dataset.ready = "1";
}

start();
