// The job page of `deepe api` (/ui/): the job list, a job with live charts, submit, queues.
// It talks to the same HTTP API as any client, with the token in an Authorization header
// (kept in sessionStorage for this tab), never in a URL.
"use strict";

const TOKEN_KEY = "deepe-token";
const METHOD_KEY = "deepe-last-method";  // the method of the last job submitted from this browser (localStorage)
// The metrics charted when a job logs them: SFT's, then GRPO's.
const CHARTS = [
  ["loss", "Loss"], ["learning_rate", "Learning rate"], ["grad_norm", "Grad norm"],
  ["reward", "Reward"], ["reward_std", "Reward std"], ["kl", "KL"],
];
const PHASES = { loading_model: "loading the model", loading_dataset: "loading the dataset",
                 training: "training", saving: "saving", queued: "queued", started: "started",
                 resumed: "resumed", requeued: "requeued", succeeded: "succeeded", failed: "failed",
                 cancelled: "cancelled" };

const view = document.getElementById("view");
let leave = () => {};  // stops the current view's polling and streams

// ---- the token and the API ---------------------------------------------------------------

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class Unauthorised extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${token() || ""}` };
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorised();
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function showLogin(message = "") {
  leave();
  document.getElementById("login").hidden = false;
  document.getElementById("logout").hidden = true;
  view.replaceChildren();
  document.getElementById("login-error").textContent = message;
  document.getElementById("login-token").focus();
}

document.getElementById("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = document.getElementById("login-token");
  sessionStorage.setItem(TOKEN_KEY, input.value);
  try {
    await api("../jobs?limit=1");
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(err instanceof Unauthorised ? "That token is not one of DEEPE_API_TOKENS; try again."
                                          : `The API did not answer: ${err.message}`);
    return;
  }
  input.value = "";
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  route();
});

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin();
});

// ---- small helpers ---------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function age(ts) {
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  return s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`;
}

function bytes(n) {
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let size = n, unit = "B";
  for (const bigger of units) { if (size < 1024) break; size /= 1024; unit = bigger; }
  return unit === "B" ? `${n} B` : `${size.toFixed(1)} ${unit}`;
}

function fixed(v) { return typeof v === "number" ? (Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(4) : v.toExponential(2)) : "-"; }

function progressBar(step, max) {
  const share = max ? Math.min(1, step / max) : 0;
  return el("span", {}, el("span", { class: "bar" }, el("span", { style: `width:${Math.round(share * 100)}%` })),
            ` ${step ?? 0}/${max ?? "?"}`);
}

function state(s) { return el("span", { class: `state ${s}`, "data-state": s }, s); }

const ENDED = ["succeeded", "failed", "cancelled"];

// The loss at a job's last logged step, from its record (`GET /jobs`, `GET /jobs/{id}`): the
// latest `log` event while it runs; once it ended that event is the trainer's summary, whose
// `train_loss` is the run's average, so the last step's loss is read from the final metrics.
function lastLoss(job) {
  const p = job.progress;
  if (typeof p?.metrics?.loss === "number") return { value: p.metrics.loss, step: p.step };
  if (typeof job.metrics?.loss === "number") return { value: job.metrics.loss, step: p?.step ?? null };
  return null;
}

function lossText(loss) { return loss ? fixed(loss.value) : "-"; }

// A table in a box of its own that scrolls sideways when the screen is narrower than the table.
function scroller(table) { return el("div", { class: "scroll" }, table); }

function poll(fn, ms) {
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    try { await fn(); } catch (err) { if (err instanceof Unauthorised) { showLogin("Your token was refused; sign in again."); return; } }
    if (!stopped) setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; };
}

// ---- the job list ----------------------------------------------------------------------

function jobList() {
  const filter = el("select", { id: "state-filter" },
    ...["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => el("option", { value: s }, s || "all states")));
  const body = el("tbody");
  const table = el("table", { id: "jobs-table" },
    el("thead", {}, el("tr", {}, ...["", "job", "state", "method", "progress", "last loss", "age"].map((h) =>
      el("th", h === "last loss" ? { title: "The loss at the job's last logged step" } : {}, h)))), body);
  const chosen = new Set();  // the jobs ticked for a comparison; kept across refreshes
  const compare = el("button", { id: "compare", onclick: () => {
    if (chosen.size >= 2) location.hash = `#/compare/${[...chosen].join(",")}`;
  } }, "Compare the ticked jobs");
  view.replaceChildren(el("h1", {}, "Jobs"), el("div", { class: "toolbar" }, filter, " ", compare), scroller(table));
  const refresh = async () => {
    const q = filter.value ? `&status=${filter.value}` : "";
    const list = await api(`../jobs?limit=100${q}`);
    body.replaceChildren(...list.jobs.map((j) => {
      const p = j.progress;
      const loss = lastLoss(j);
      const pick = el("input", { type: "checkbox", class: "pick", "data-pick": j.id,
                                 onchange: (e) => (e.target.checked ? chosen.add(j.id) : chosen.delete(j.id)) });
      pick.checked = chosen.has(j.id);
      return el("tr", { "data-job": j.id },
        el("td", {}, pick),
        el("td", { class: "mono id" }, el("a", { href: `#/jobs/${j.id}`, title: j.id }, j.id)),
        el("td", {}, state(j.status)),
        el("td", {}, j.method + (j.gpus > 1 ? ` (${j.gpus} devices)` : "")),
        el("td", {}, p ? progressBar(p.step, p.max_steps) : "-"),
        el("td", { class: "loss", title: loss?.step ? `the loss at step ${loss.step}` : null }, lossText(loss)),
        el("td", {}, age(j.submitted_at)));
    }));
    if (!list.jobs.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No jobs.")));
  };
  filter.addEventListener("change", refresh);
  return poll(refresh, 2000);
}

// ---- one job: its record, its phase, live charts ------------------------------------------

// A Server-Sent Events stream read with fetch, so that the token goes in a header. After a
// dropped connection it asks again from the last id it got: nothing is missed or repeated.
function followEvents(jobId, onEvent, onEnd) {
  const controller = new AbortController();
  let last = "0";
  let ended = false;
  const run = async () => {
    while (!ended && !controller.signal.aborted) {
      try {
        const headers = { Authorization: `Bearer ${token() || ""}` };
        if (last !== "0") headers["Last-Event-ID"] = last;
        const response = await fetch(`../jobs/${encodeURIComponent(jobId)}/events`, { headers, signal: controller.signal });
        if (response.status === 401) { showLogin("Your token was refused; sign in again."); return; }
        if (response.status === 404) return;  // the job is gone (expired): nothing more will come
        if (response.status === 429 || response.status === 503) {
          // Too many open streams for this token, or Redis away: come back when the server says.
          const after = Number(response.headers.get("Retry-After")) || 5;
          await new Promise((r) => setTimeout(r, Math.min(after, 60) * 1000));
          continue;
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let id = null, data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("id: ")) id = line.slice(4);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (!data) continue;  // a keepalive comment
            if (id) last = id;
            const event = JSON.parse(data);
            onEvent(event);
            if (ENDED.includes(event.kind)) ended = true;
          }
        }
        if (ended || controller.signal.aborted) break;  // the server ends the stream when the job ends
      } catch (err) {
        if (controller.signal.aborted) return;
      }
      await new Promise((r) => setTimeout(r, 1000));  // dropped: ask again from the last id
    }
    if (ended) onEnd();
  };
  run();
  return () => controller.abort();
}

// A cancel asks first: what it does differs with the button and with the job's state.
function cancelQuestion(save, status) {
  if (status === "queued") return "Take this job off its queue? It has not started; nothing is trained.";
  return save ? "Stop this job at its next step and publish the model it has trained so far (a partial model)?"
              : "Stop this job at its next step? What it has trained so far is not saved.";
}

// The model a job published (`model` in GET /jobs/{id}): its files, name and size, and their
// total; or the sentence that says why there is none.
function modelView(model) {
  if (!model) return [];
  if (!model.published) return [el("p", { class: "muted", id: "model-none" }, model.note || "No model is published.")];
  const rows = model.files.map((f) => el("tr", { "data-file": f.name }, el("td", { class: "mono" }, f.name),
                                          el("td", { class: "size" }, bytes(f.size))));
  return [el("p", { class: "mono", id: "model-url" }, model.url, model.partial ? " (partial)" : ""),
          scroller(el("table", { id: "model-files" },
            el("thead", {}, el("tr", {}, el("th", {}, "file"), el("th", { class: "size" }, "size"))), el("tbody", {}, ...rows),
            el("tfoot", {}, el("tr", {}, el("td", {}, `${model.files.length} files`),
                               el("td", { class: "size", id: "model-total" }, bytes(model.total_bytes))))))];
}

// A cancelled job whose model was saved: its deepe.json says so (`model`, read once the job
// ended); until that is read, the sentence the runner ends such a job with.
function publishedPartial(record) {
  if (record.model) return Boolean(record.model.published && record.model.partial);
  return record.status === "cancelled" && /the partial model was saved/.test(record.error || "");
}

function jobPage(jobId) {
  const summary = el("div", { class: "summary" });
  const error = el("p", { class: "error", id: "job-error" });
  const charts = el("div", { class: "charts", id: "charts" });
  const metricsHeading = el("h2", { id: "metrics-heading", hidden: "" }, "Metrics");
  const params = el("tbody");
  const modelBox = el("div", { id: "model" });
  const notice = el("span", { id: "action-result", class: "muted" });
  const question = el("span", { id: "confirm-text" });
  const yes = el("button", { id: "confirm-yes", class: "danger", onclick: () => { confirmBar.hidden = true; cancel(asking); } });
  const confirmBar = el("div", { id: "confirm", class: "confirm", role: "alertdialog", hidden: "" }, question, yes,
    el("button", { id: "confirm-no", onclick: () => { confirmBar.hidden = true; } }, "No, keep it"));
  let asking = false;  // which cancel the confirmation is for: false (plain) or true (save the model)
  const ask = (save) => {
    asking = save;
    question.textContent = cancelQuestion(save, record?.status);
    yes.textContent = save ? "Yes, cancel and save" : "Yes, cancel";
    confirmBar.hidden = false;
    notice.textContent = "";
  };
  const cancelSave = el("button", { id: "cancel-save", onclick: () => ask(true) }, "Cancel and save the model");
  const actions = el("div", { class: "toolbar" },
    el("button", { id: "cancel", class: "danger", onclick: () => ask(false) }, "Cancel"), cancelSave, notice);
  view.replaceChildren(el("h1", {}, "Job ", el("span", { class: "mono" }, jobId)), summary, error, actions, confirmBar,
                       el("h2", {}, "Model"), modelBox, metricsHeading, charts, el("h2", {}, "Parameters"),
                       scroller(el("table", { id: "params" },
                                   el("thead", {}, el("tr", {}, el("th", {}, "name"), el("th", {}, "value"))), params)));
  const series = new Map();
  let phase = "-", latest = null, latestLoss = null, latestEval = null, record = null;
  // The loss chart carries the eval loss as a second series; the others one each.
  const chartFor = (key, title) => {
    metricsHeading.hidden = false;
    return makeChart(charts, title, key, key === "loss" ? [["eval loss", "#e8590c"]] : []);
  };

  function cell(label, value, id) { return el("div", {}, el("b", {}, label), el("span", { id }, value)); }
  function output() {
    if (record.status === "succeeded") return record.output_dir;
    if (publishedPartial(record)) return el("span", {}, record.output_dir, " ", el("span", { class: "muted" }, "(partial model)"));
    return "-";
  }
  function render() {
    if (!record) return;
    const p = latest || record.progress;
    const merge = record.kind === "merge";
    const from = record.params.MERGED_FROM;
    const loss = latestLoss ? { value: latestLoss.metrics.loss, step: latestLoss.step } : lastLoss(record);
    summary.replaceChildren(...[  // (a merge has no steps: no progress, ETA or losses)
      cell("state", state(record.status), "job-state"), cell("method", record.method),
      merge && from ? cell("merged from", el("a", { href: `#/jobs/${from}`, class: "mono", title: from }, from.slice(0, 12)),
                           "job-merged-from") : null,
      cell("phase", phase, "job-phase"),
      merge ? null : cell("progress", p ? progressBar(p.step, p.max_steps) : "-", "job-progress"),
      merge ? null : cell("ETA", record.status === "running" ? duration(p?.eta_s) : "-", "job-eta"),
      merge ? null : cell("last loss", loss ? `${lossText(loss)}${loss.step ? ` (step ${loss.step})` : ""}` : "-", "job-loss"),
      merge ? null : cell("eval loss", latestEval ? `${(+latestEval.metrics.eval_loss).toPrecision(4)} (step ${latestEval.step})`
                                                  : "-", "job-eval"),
      cell("devices", String(record.gpus || 1)), cell("attempts", String(record.attempts)),
      cell("worker", record.worker || "-"),
      cell("output", output(), "job-output"),
      cell("MLflow", record.mlflow_url ? el("a", { href: record.mlflow_url, target: "_blank", rel: "noopener", id: "mlflow-run" },
                                            "the run") : "-"),
    ].filter(Boolean));
    error.textContent = record.error || "";
    error.className = record.status === "failed" ? "error" : "muted";  // a cancel's sentence is no error
    const ended = ENDED.includes(record.status);
    cancelSave.hidden = merge;  // a merge has no partial model to save
    for (const b of actions.querySelectorAll("button")) b.disabled = ended;
    if (ended) { notice.textContent = ""; confirmBar.hidden = true; }  // "it stops at its next step" is over
  }
  async function load() {
    record = await api(`../jobs/${encodeURIComponent(jobId)}`);
    params.replaceChildren(...Object.entries(record.params).map(([k, v]) =>
      el("tr", {}, el("td", { class: "mono" }, k), el("td", { class: "mono" }, JSON.stringify(v)))));
    modelBox.replaceChildren(...modelView(record.model));
    render();
  }
  async function cancel(save) {
    try {
      const answer = await api(`../jobs/${encodeURIComponent(jobId)}/cancel${save ? "?save=true" : ""}`, { method: "POST" });
      // (a queued job is cancelled at once: its state says so, and the notice goes with the next render)
      notice.textContent = answer.status === "running"
        ? `Asked: it stops at its next step${save ? " and saves its model" : ""}.` : `Now ${answer.status}.`;
      await load();
    } catch (err) {
      notice.textContent = err.message;
    }
  }
  function onEvent(event) {
    if (PHASES[event.kind]) phase = PHASES[event.kind];
    if (event.kind === "log") {
      latest = event;
      if (typeof event.metrics.loss === "number" && event.step !== null) latestLoss = event;
      for (const [key, title] of CHARTS) {
        const value = event.metrics[key];
        if (typeof value !== "number" || event.step === null) continue;
        if (!series.has(key)) series.set(key, chartFor(key, title));
        series.get(key).add(event.step, value);
      }
    }
    if (event.kind === "eval" && typeof event.metrics.eval_loss === "number" && event.step !== null) {
      // The evaluation on the held-out data, on the loss chart beside the training loss
      if (!series.has("loss")) series.set("loss", chartFor("loss", "Loss"));
      series.get("loss").add(event.step, event.metrics.eval_loss, 2);
      latestEval = event;
    }
    render();
  }
  // An ended job's record changes no more: read once more (with its model's files), then no more.
  let stopPolling = () => {};
  stopPolling = poll(async () => { await load(); if (ENDED.includes(record.status)) stopPolling(); }, 3000);
  const stopEvents = followEvents(jobId, onEvent, () => load());
  return () => { stopPolling(); stopEvents(); };
}

// ---- submit ------------------------------------------------------------------------------

function submitPage() {
  const methods = el("select", { id: "method" });
  const form = el("form", { class: "submit", id: "submit-form" });
  const result = el("p", { class: "error", id: "submit-error" });
  view.replaceChildren(el("h1", {}, "Submit a job"), el("div", { class: "toolbar" }, el("label", {}, "Method "), methods),
                       form, result);
  let current = null;
  // Each parameter's input, by name: held, never looked up with a selector built from a name.
  let inputs = new Map();
  async function showMethod() {
    const name = methods.value;
    const found = await api(`../methods/${encodeURIComponent(name)}`);
    if (name !== methods.value) return;  // another method was chosen meanwhile: its form comes next
    current = found;
    inputs = new Map();
    const fields = [];
    for (const p of current.params) {
      if (p.name === "OUTPUT_DIR") continue;
      // el() sets attributes and text through the DOM: no name or help text is ever parsed as HTML.
      const input = el("input", { name: p.name, id: `param-${p.name}`, placeholder: p.default === null ? "" : String(p.default) });
      inputs.set(p.name, input);
      fields.push(el("label", { for: `param-${p.name}` }, p.name + (p.declared_by === "method" ? " (method)" : "")), input,
                  el("div", { class: "help" }, `${p.type}. ${p.help}`));
    }
    fields.push(el("label", { for: "queue" }, "queue"), el("input", { id: "queue", placeholder: "the default queue" }),
                el("label", { for: "gpus" }, "devices"), el("input", { id: "gpus", type: "number", min: "1", value: "1" }),
                el("span"), el("button", { type: "submit", class: "primary", id: "submit" }, "Submit"));
    form.replaceChildren(...fields);
    form.dataset.method = name;  // the method whose form this is, once its fields are there
  }
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const params = {};
    for (const [name, input] of inputs) {
      if (input.value !== "") params[name] = input.value;  // typed and checked by the server
    }
    const body = { method: current.name, params, gpus: Number(document.getElementById("gpus").value || 1) };
    const queue = document.getElementById("queue").value;
    if (queue) body.queue = queue;
    try {
      const job = await api("../jobs", { method: "POST", body: JSON.stringify(body) });
      localStorage.setItem(METHOD_KEY, current.name);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      result.textContent = err.message;
    }
  });
  methods.addEventListener("change", showMethod);
  api("../methods").then((list) => {
    methods.replaceChildren(...list.map((m) => el("option", { value: m.name }, `${m.name} (${m.kind})`)));
    // The form opens on the method used last, else on the demo that trains out of the box.
    const names = list.map((m) => m.name);
    const last = localStorage.getItem(METHOD_KEY);
    methods.value = names.includes(last) ? last : names.includes("sft-demo") ? "sft-demo" : (names[0] ?? "");
    if (list.length) showMethod();
  }).catch((err) => { if (err instanceof Unauthorised) showLogin(); else result.textContent = err.message; });
  return () => {};
}

// ---- queues and workers ------------------------------------------------------------------

function queuesPage() {
  const queues = el("tbody");
  const workers = el("tbody");
  view.replaceChildren(
    el("h1", {}, "Queues"),
    scroller(el("table", { id: "queues-table" }, el("thead", {}, el("tr", {}, ...["queue", "devices", "waiting", "running",
      "workers", "next up"].map((h) => el("th", {}, h)))), queues)),
    el("h2", {}, "Workers online"),
    scroller(el("table", { id: "workers-table" }, el("thead", {}, el("tr", {}, el("th", {}, "worker"), el("th", {}, "devices"),
      el("th", {}, "last seen"))), workers)));
  return poll(async () => {
    const data = await api("../queues");
    queues.replaceChildren(...data.queues.map((q) => el("tr", { "data-queue": q.name },
      el("td", { class: "mono" }, q.name), el("td", {}, String(q.gpus)), el("td", {}, String(q.length)),
      el("td", {}, String(q.running.length)), el("td", {}, q.workers.join(", ") || (q.length ? "none" : "-")),
      el("td", { class: "mono" }, q.waiting.slice(0, 3).map((w) => `${w.id} (p${w.priority})`).join(", ") || "-"))));
    workers.replaceChildren(...data.workers.map((w) => el("tr", { "data-worker": w.name },
      el("td", { class: "mono" }, w.name), el("td", {}, String(w.devices)), el("td", {}, `${age(w.seen)} ago`))));
  }, 3000);
}

// ---- jobs side by side -------------------------------------------------------------------

const COLOURS = ["#2f6fed", "#e8590c", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285"];

function comparePage(ids) {
  const out = el("div", { id: "comparison" }, el("p", { class: "muted" }, "Loading…"));
  view.replaceChildren(el("h1", {}, "Comparison"), out);
  let stopped = false;
  (async () => {
    let found;
    try {
      found = await api(`../compare?jobs=${encodeURIComponent(ids)}&curves=true`);
    } catch (err) {
      out.replaceChildren(el("p", { class: "error" }, err.message));
      return;
    }
    if (stopped) return;
    const diff = found.differing_params;
    const num = (v) => (typeof v === "number" ? v.toPrecision(4) : "-");
    const table = el("table", { id: "compare-table" },
      el("thead", {}, el("tr", {}, ...["job", "method", "state", ...diff, "train loss", "eval loss"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...found.jobs.map((j) => el("tr", { "data-job": j.id },
        el("td", { class: "mono" }, el("a", { href: `#/jobs/${j.id}` }, j.id.slice(0, 12))), el("td", {}, j.method),
        el("td", {}, state(j.status)), ...diff.map((k) => el("td", { class: "mono" }, JSON.stringify(j.params[k]))),
        el("td", {}, num(j.train_loss)), el("td", {}, j.eval ? `${num(j.eval.eval_loss)} (step ${j.eval.step})` : "-")))));
    // One chart: each job's training loss (a line) and eval loss (points), on the union of their steps.
    const steps = [...new Set(found.jobs.flatMap((j) => [...j.curves.train, ...j.curves.eval].map((p) => p[0])))].sort((a, b) => a - b);
    const data = [steps];
    const series = [{ label: "step" }];
    found.jobs.forEach((j, i) => {
      for (const [kind, points] of [["train", j.curves.train], ["eval", j.curves.eval]]) {
        if (!points.length) continue;
        const at = new Map(points);
        data.push(steps.map((s) => (at.has(s) ? at.get(s) : null)));
        series.push({ label: `${j.id.slice(0, 8)} ${kind}`, stroke: COLOURS[i % COLOURS.length], width: 1.5,
                      dash: kind === "eval" ? [6, 4] : undefined, spanGaps: true, points: { show: kind === "eval", size: 5 } });
      }
    });
    const box = el("div", { class: "chart", id: "compare-chart", "data-series": String(series.length - 1) },
                   el("h3", {}, "Loss (train and eval)"));
    const parts = [scroller(table), box];
    for (const group of found.evaluations) {
      const jobsHere = Object.keys(group.results);
      parts.push(el("h2", {}, `Evaluations on ${group.dataset}`), scroller(el("table", { class: "evaluations" },
        el("thead", {}, el("tr", {}, ...["job", "loss", "perplexity", "exact match", "ROUGE-L"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...jobsHere.map((id) => {
          const r = group.results[id];
          return el("tr", {}, el("td", { class: "mono" }, id.slice(0, 12)), el("td", {}, num(r.loss)),
                    el("td", {}, num(r.perplexity)), el("td", {}, num(r.exact_match)), el("td", {}, num(r.rouge_l)));
        })))));
      // The same prompts, each model's answer beside the expected one (as DeepExtension's assessment shows them)
      const count = Math.max(0, ...jobsHere.map((id) => (group.results[id].samples || []).length));
      const first = group.results[jobsHere[0]].samples || [];
      parts.push(scroller(el("table", { class: "samples" },
        el("thead", {}, el("tr", {}, el("th", {}, "prompt"), el("th", {}, "expected"),
                                   ...jobsHere.map((id) => el("th", { class: "mono" }, id.slice(0, 12))))),
        el("tbody", {}, ...Array.from({ length: count }, (_, n) => el("tr", { class: "sample" },
          el("td", {}, first[n]?.prompt ?? ""), el("td", {}, first[n]?.expected ?? ""),
          ...jobsHere.map((id) => el("td", { class: "generated" }, (group.results[id].samples || [])[n]?.generated ?? ""))))))));
    }
    out.replaceChildren(...parts);
    comparisonChart(box, series, data);
  })();
  return () => { stopped = true; };
}

// ---- routing -----------------------------------------------------------------------------

function route() {
  leave();
  if (!token()) { showLogin(); return; }
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  const hash = location.hash || "#/";
  const job = hash.match(/^#\/jobs\/([A-Za-z0-9_.-]+)$/);
  const compared = hash.match(/^#\/compare\/([A-Za-z0-9_.,-]+)$/);
  if (job) leave = jobPage(job[1]);
  else if (compared) leave = comparePage(compared[1]);
  else if (hash === "#/submit") leave = submitPage();
  else if (hash === "#/queues") leave = queuesPage();
  else leave = jobList();
}

window.addEventListener("hashchange", route);
route();
