// duboko studio: the page's own script (no libraries, no network beyond this server).
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // the selected run's details (GET /api/run)
let generation = null; // the AbortController of the running stream

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fillBars(tbody, rows, label) {
  tbody.innerHTML = "";
  rows.forEach((r, i) => {
    const tr = tbody.insertRow();
    if (i === 0) tr.className = "top";
    cell(tr, label(r));
    cell(tr, (100 * r.probability).toFixed(1) + "%");
    const bar = cell(tr, "", "bar");
    const span = document.createElement("span");
    span.style.width = (100 * r.probability).toFixed(1) + "%";
    bar.appendChild(span);
  });
}

// -- runs ------------------------------------------------------------------------------------
async function loadRuns() {
  const data = await api("/api/runs");
  $("roots").textContent = data.roots.join("  ");
  const list = $("run-list");
  list.innerHTML = "";
  $("no-runs").hidden = data.runs.length > 0;
  for (const run of data.runs) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.dataset.name = run.name;
    button.textContent = run.name;
    const sub = document.createElement("span");
    sub.className = "sub";
    sub.textContent = run.error ? run.error : `${run.recipe} · ${run.task}`;
    button.appendChild(sub);
    button.addEventListener("click", () => selectRun(run.name));
    li.appendChild(button);
    list.appendChild(li);
  }
  fillOverview(data.runs);
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (wanted && data.runs.some((r) => r.name === wanted)) selectRun(wanted);
}

// The metrics a run is judged by, when it has them.
const HEADLINE = ["test_accuracy", "exact_match", "val_bpc", "val_perplexity", "fd_mnist", "val_loss", "test_loss"];

function fillOverview(runs) {
  const tbody = $("overview").tBodies[0];
  tbody.innerHTML = "";
  for (const run of runs) {
    const tr = tbody.insertRow();
    const link = document.createElement("button");
    link.textContent = run.name;
    link.addEventListener("click", () => selectRun(run.name));
    tr.insertCell().appendChild(link);
    cell(tr, run.recipe || "");
    cell(tr, run.task || run.error || "");
    cell(tr, run.model || "");
    const shown = HEADLINE.filter((k) => run.metrics && k in run.metrics).slice(0, 2);
    cell(tr, shown.map((k) => `${k} ${Number(run.metrics[k]).toPrecision(4)}`).join(", "));
  }
}

async function selectRun(name) {
  stopGeneration();
  showError("");
  document.querySelectorAll("#run-list button").forEach((b) => b.classList.toggle("active", b.dataset.name === name));
  let run;
  try {
    run = await api("/api/run?name=" + encodeURIComponent(name));
  } catch (err) {
    $("pick").hidden = true;
    $("run").hidden = false;
    showError(err.message);
    return;
  }
  current = run;
  history.replaceState(null, "", "#" + encodeURIComponent(name));
  $("pick").hidden = true;
  $("run").hidden = false;
  $("run-title").textContent = run.name;
  $("run-sub").textContent = `recipe ${run.recipe} · task ${run.task} · model ${run.model}`;
  for (const panel of ["classifier", "language-model", "seq2seq", "diffusion", "none"]) {
    $("panel-" + panel).hidden = run.panel !== panel;
  }
  const metrics = $("metrics").tBodies[0];
  metrics.innerHTML = "";
  for (const [key, value] of Object.entries(run.metrics)) {
    const tr = metrics.insertRow();
    cell(tr, key);
    cell(tr, Number.isInteger(value) ? String(value) : Number(value).toPrecision(5));
  }
  $("config").textContent = JSON.stringify(run.config, null, 2);
  drawCurves(run.history);
  if (run.panel === "classifier") clearCanvas();
  if (run.panel === "language-model") {
    $("attention-box").hidden = !run.attention;
    $("lm-out").textContent = "";
    $("lm-stats").textContent = "";
  }
  if (run.panel === "diffusion") {
    $("dm-prompt-box").hidden = run.conditioning !== "text";
    $("dm-label-box").hidden = run.conditioning !== "class";
    if (run.defaults.steps) $("dm-steps").value = run.defaults.steps;
    if (run.defaults.guidance !== null && run.defaults.guidance !== undefined) $("dm-guidance").value = run.defaults.guidance;
  }
}

// -- training curves: a small line chart per column of history.csv --------------------------
function drawCurves(rows) {
  const canvas = $("curves");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const keys = rows.length ? Object.keys(rows[0]).filter((k) => /loss/.test(k)) : [];
  if (!keys.length) {
    ctx.fillStyle = "#5b6673";
    ctx.fillText("no history.csv rows", 20, 30);
    return;
  }
  const pad = 40, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
  const values = rows.flatMap((r) => keys.map((k) => Number(r[k]))).filter(Number.isFinite);
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const colors = ["#3a7bd5", "#d5533a", "#2f9e44", "#9c36b5"];
  ctx.strokeStyle = "#c8ced6";
  ctx.strokeRect(pad, pad, w, h);
  ctx.fillStyle = "#5b6673";
  ctx.fillText(hi.toPrecision(3), 4, pad + 4);
  ctx.fillText(lo.toPrecision(3), 4, pad + h);
  ctx.fillText("epoch", pad + w / 2, canvas.height - 10);
  keys.forEach((key, j) => {
    ctx.strokeStyle = colors[j % colors.length];
    ctx.beginPath();
    rows.forEach((r, i) => {
      const x = pad + (rows.length > 1 ? (i / (rows.length - 1)) * w : w / 2);
      const y = pad + h - ((Number(r[key]) - lo) / span) * h;
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = colors[j % colors.length];
    rows.forEach((r, i) => { // a dot per epoch: a one-epoch run still shows its point
      const x = pad + (rows.length > 1 ? (i / (rows.length - 1)) * w : w / 2);
      const y = pad + h - ((Number(r[key]) - lo) / span) * h;
      if (Number.isFinite(y)) { ctx.beginPath(); ctx.arc(x, y, 3, 0, 2 * Math.PI); ctx.fill(); }
    });
    ctx.fillText(key, pad + 8 + j * 110, pad - 10);
  });
}

// -- classifier: the canvas -------------------------------------------------------------------
let drawing = false, pending = false, queued = false;

function clearCanvas() {
  const ctx = $("draw").getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, 280, 280);
  $("probs").tBodies[0].innerHTML = "";
  $("seen").removeAttribute("src");
}

function pointerAt(event) {
  const rect = $("draw").getBoundingClientRect();
  return [(event.clientX - rect.left) * (280 / rect.width), (event.clientY - rect.top) * (280 / rect.height)];
}

async function classify(image) {
  if (pending) { queued = true; return; } // one request in flight; the latest drawing follows
  pending = true;
  try {
    const data = await api("/api/classify", { run: current.name, image: image || $("draw").toDataURL("image/png"), top: 10 });
    showError("");
    fillBars($("probs").tBodies[0], data.top, (r) => r.class);
    $("seen").src = data.input;
    $("seen-size").textContent = data.input_size.join("×") + (data.inverted ? ", inverted" : "");
  } catch (err) {
    showError(err.message);
  } finally {
    pending = false;
    if (queued) { queued = false; classify(); }
  }
}

function setupCanvas() {
  const canvas = $("draw");
  const ctx = canvas.getContext("2d");
  let last = 0;
  canvas.addEventListener("pointerdown", (e) => {
    drawing = true;
    canvas.setPointerCapture(e.pointerId);
    const [x, y] = pointerAt(e);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 20;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(x, y);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const [x, y] = pointerAt(e);
    ctx.lineTo(x, y);
    ctx.stroke();
    const now = performance.now();
    if (now - last > 120) { last = now; classify(); } // update while drawing
  });
  const end = () => { if (drawing) { drawing = false; classify(); } };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("clear").addEventListener("click", clearCanvas);
  $("upload").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => classify(reader.result);
    reader.readAsDataURL(file);
  });
}

// -- language models: streamed text over server-sent events ----------------------------------
function stopGeneration() {
  if (generation) generation.abort();
  generation = null;
  $("lm-go").disabled = false;
  $("lm-stop").disabled = true;
}

function numberOr(id, fallback) {
  const text = $(id).value.trim();
  return text === "" ? fallback : Number(text);
}

async function generate() {
  stopGeneration();
  showError("");
  const prompt = $("lm-prompt").value;
  const body = {
    run: current.name, prompt,
    temperature: numberOr("lm-temperature", 0.8), top_k: numberOr("lm-top-k", 0),
    top_p: numberOr("lm-top-p", 1), max_new_tokens: numberOr("lm-max", 200), seed: numberOr("lm-seed", null),
  };
  const out = $("lm-out");
  out.textContent = prompt;
  generation = new AbortController();
  $("lm-go").disabled = true;
  $("lm-stop").disabled = false;
  nextTokens(prompt);
  if (current.attention) attention(prompt);
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: generation.signal,
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data.error || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) { // one server-sent event
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const kind = (event.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((event.match(/^data: (.*)$/m) || [])[1] || "{}");
        if (kind === "token") out.textContent += data.text;
        else if (kind === "done") {
          $("lm-stats").textContent = `${data.tokens} tokens in ${data.seconds.toFixed(2)} s ` +
            `(first after ${(data.first_token_seconds || 0).toFixed(3)} s, ${data.tokens_per_second} tokens/s)`;
        } else if (kind === "error") showError(data.error);
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    $("lm-go").disabled = false;
    $("lm-stop").disabled = true;
    generation = null;
  }
}

async function nextTokens(text) {
  try {
    const data = await api("/api/next-token", { run: current.name, text: text || "\n", top: 10 });
    fillBars($("next").tBodies[0], data.rows, (r) => JSON.stringify(r.token));
  } catch (err) {
    showError(err.message);
  }
}

let attentionData = null;

async function attention(text) {
  try {
    attentionData = await api("/api/attention", { run: current.name, text: text || "\n" });
  } catch (err) {
    showError(err.message);
    return;
  }
  const select = $("att-head");
  select.innerHTML = "";
  attentionData.heads.forEach((_, i) => select.add(new Option(`head ${i}`, String(i))));
  drawAttention();
}

function drawAttention() {
  if (!attentionData) return;
  const canvas = $("attention");
  const ctx = canvas.getContext("2d");
  const weights = attentionData.heads[Number($("att-head").value) || 0];
  const n = weights.length, margin = 40, size = (canvas.width - margin) / Math.max(n, 1);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = `${Math.min(12, size)}px monospace`;
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      const v = Math.sqrt(weights[q][k]); // a square root shows the small weights too
      ctx.fillStyle = `rgba(58, 123, 213, ${v})`;
      ctx.fillRect(margin + k * size, margin + q * size, size, size);
    }
    ctx.fillStyle = "#1d232a";
    const label = JSON.stringify(attentionData.tokens[q]).slice(1, -1).slice(0, 4);
    ctx.fillText(label, 2, margin + (q + 0.75) * size);
    ctx.save();
    ctx.translate(margin + (q + 0.75) * size, margin - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(label, 0, 0);
    ctx.restore();
  }
}

// -- seq2seq and diffusion --------------------------------------------------------------------
async function translate() {
  showError("");
  try {
    const data = await api("/api/translate", { run: current.name, text: $("s2s-in").value, beam: numberOr("s2s-beam", 1) });
    $("s2s-out").textContent = data.output;
  } catch (err) {
    showError(err.message);
  }
}

let frames = [];

async function sample() {
  showError("");
  const body = {
    run: current.name, guidance: numberOr("dm-guidance", 3), steps: numberOr("dm-steps", 50),
    n: numberOr("dm-n", 16), seed: numberOr("dm-seed", 0), frames: 8,
  };
  if (current.conditioning === "text") body.prompt = $("dm-prompt").value;
  if (current.conditioning === "class") body.label = numberOr("dm-label", null);
  $("dm-go").disabled = true;
  $("dm-stats").textContent = "denoising...";
  try {
    const data = await api("/api/sample", body);
    $("dm-grid").src = data.grid;
    $("dm-grid").hidden = false;
    $("dm-stats").textContent = `${data.n} images, ${data.steps} DDIM steps, guidance ${data.guidance}, ${data.seconds.toFixed(2)} s`;
    frames = data.frames;
    $("dm-frame").max = String(Math.max(0, frames.length - 1));
    $("dm-frame").value = $("dm-frame").max;
    showFrame();
  } catch (err) {
    $("dm-stats").textContent = "";
    showError(err.message);
  } finally {
    $("dm-go").disabled = false;
  }
}

function showFrame() {
  const frame = frames[Number($("dm-frame").value)];
  if (!frame) return;
  $("dm-frame-img").src = frame.image;
  $("dm-frame-img").hidden = false;
  $("dm-frame-t").textContent = frame.t < 0 ? "final images" : `x_t at t = ${frame.t}`;
}

window.addEventListener("DOMContentLoaded", () => {
  setupCanvas();
  $("lm-go").addEventListener("click", generate);
  $("lm-stop").addEventListener("click", stopGeneration);
  $("att-head").addEventListener("change", drawAttention);
  $("s2s-go").addEventListener("click", translate);
  $("dm-go").addEventListener("click", sample);
  $("dm-frame").addEventListener("input", showFrame);
  loadRuns().catch((err) => showError(err.message));
});
