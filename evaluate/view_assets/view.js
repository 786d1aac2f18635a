// stagesweep answer viewer. Data comes as scripts calling stagesweepData(key, payload) (file://
// pages may not fetch); every model or user text is put on the page with textContent only.
"use strict";

const PAGE = 50;
const LABEL_NAMES = {c: "complied", r: "refused", o: "overflow", u: "unparsed",
                     n: "no_final_answer", f: "failed", g: "generated", "-": "no row"};
const STATUS_CODES = {overflow: "o", unparsed: "u", no_final_answer: "n", failed: "f", generated: "g"};
const CELL_FILTERS = ["design", "n_h", "n_b", "schedule", "opening", "query"];
const cache = {};
const pending = {};
let meta = null;
let matches = [];
let state = {};

window.stagesweepData = function (key, payload) {
  cache[key] = payload;
  if (pending[key]) pending[key].resolve(payload);
  if (key === "meta") start(payload);
};

function load(key) {
  if (key in cache) return Promise.resolve(cache[key]);
  if (!pending[key]) {
    const entry = {};
    entry.promise = new Promise((resolve, reject) => { entry.resolve = resolve; entry.reject = reject; });
    pending[key] = entry;
    const script = document.createElement("script");
    script.src = "data/" + key + ".js";
    script.onerror = () => entry.reject(new Error("cannot load data/" + key + ".js"));
    document.head.appendChild(script);
  }
  return pending[key].promise;
}

// An element with text children only: strings become text nodes, never markup.
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

function value(column, u) {
  const col = meta.columns[column];
  return col.values[col.codes[u]];
}

function phi(u) {
  const h = value("n_h", u), b = value("n_b", u);
  return h + b === 0 ? null : h / (h + b);
}

function fmtPhi(x) { return x === null ? "–" : String(Math.round(x * 1000) / 1000); }

function ckptLabel(c) {
  const k = meta.checkpoints[c];
  return k.name + (k.stage && k.stage !== k.name ? " (" + k.stage + ")" : "");
}

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const s = {};
  for (const [k, v] of params) s[k] = v;
  // `checkpoint=NAME` (the report's links) means labels at that checkpoint.
  if (s.checkpoint && s.at === undefined) s.at = s.checkpoint;
  delete s.checkpoint;
  return s;
}

function writeHash() {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(state)) if (v !== "" && v !== undefined) params.set(k, v);
  history.replaceState(null, "", "#" + params.toString());
}

function options(select, entries, anyLabel) {
  select.replaceChildren();
  if (anyLabel !== null) select.append(el("option", {value: ""}, anyLabel));
  for (const [v, text] of entries) select.append(el("option", {value: String(v)}, String(text)));
}

function shownCheckpoints() {
  if (!state.show) return meta.checkpoints.map((_, i) => i);
  const names = state.show.split(",");
  return meta.checkpoints.map((k, i) => names.includes(k.name) ? i : -1).filter(i => i >= 0);
}

function ckptIndex(name) {
  return meta.checkpoints.findIndex(k => k.name === name);
}

function buildFilters() {
  const show = document.getElementById("f-show");
  meta.checkpoints.forEach((k, i) => {
    const box = el("input", {type: "checkbox", value: k.name, "data-ckpt": String(i)});
    box.checked = true;
    show.append(el("label", {}, box, ckptLabel(i)));
  });
  const ckpts = meta.checkpoints.map((k, i) => [k.name, ckptLabel(i)]);
  options(document.getElementById("f-at"), ckpts, "any shown checkpoint");
  options(document.getElementById("f-from"), ckpts, "–");
  options(document.getElementById("f-to"), ckpts, "–");
  for (const name of CELL_FILTERS) {
    const values = meta.columns[name].values.map((v, i) => [i, v]);
    if (name === "n_h" || name === "n_b") values.sort((a, b) => a[1] - b[1]);
    options(document.getElementById("f-" + name), values.map(([i, v]) => [v, v]), "any");
  }
  const phis = new Set();
  for (let u = 0; u < meta.n; u++) phis.add(fmtPhi(phi(u)));
  options(document.getElementById("f-phi"), [...phis].sort().map(p => [p, p]), "any");
}

function syncForm() {
  const shown = new Set(shownCheckpoints());
  for (const box of document.querySelectorAll("#f-show input")) {
    box.checked = shown.has(Number(box.dataset.ckpt));
  }
  for (const select of document.querySelectorAll("#filters select")) {
    select.value = state[select.name] || (select.name === "change" ? "any" : "");
  }
}

function readForm() {
  const next = {};
  const boxes = [...document.querySelectorAll("#f-show input")];
  if (boxes.some(b => !b.checked)) next.show = boxes.filter(b => b.checked).map(b => b.value).join(",");
  for (const select of document.querySelectorAll("#filters select")) {
    if (select.value && !(select.name === "change" && select.value === "any")) next[select.name] = select.value;
  }
  if (state.unit) next.unit = state.unit;
  state = next;
}

function filter() {
  const shown = shownCheckpoints();
  const at = state.at ? [ckptIndex(state.at)] : shown;
  const codeOf = {};
  for (const name of CELL_FILTERS) {
    if (state[name] === undefined) continue;
    codeOf[name] = meta.columns[name].values.findIndex(v => String(v) === state[name]);
  }
  const from = state.from ? meta.labels[ckptIndex(state.from)] : null;
  const to = state.to ? meta.labels[ckptIndex(state.to)] : null;
  const change = state.change || "any";
  const out = [];
  for (let u = 0; u < meta.n; u++) {
    let ok = true;
    for (const name in codeOf) if (meta.columns[name].codes[u] !== codeOf[name]) { ok = false; break; }
    if (!ok) continue;
    if (state.phi !== undefined && fmtPhi(phi(u)) !== state.phi) continue;
    if (from && to) {
      const a = from[u], b = to[u];
      if (!"cr".includes(a) || !"cr".includes(b) || a === b) continue;
      if (change !== "any" && a + b !== change) continue;
    }
    if (state.label || state.format || state.status) {
      ok = at.some(c => {
        const lab = meta.labels[c][u];
        if (state.label === "c" || state.label === "r") { if (lab !== state.label) return false; }
        else if (state.label === "x" && "cr".includes(lab)) return false;
        if (state.status === "ok") { if (!"cr".includes(lab)) return false; }
        else if (state.status && lab !== state.status) return false;
        if (state.format && meta.formats[c][u] !== state.format) return false;
        return true;
      });
      if (!ok) continue;
    }
    out.push(u);
  }
  return out;
}

function badge(c, u) {
  const lab = meta.labels[c][u];
  const fmt = meta.formats[c][u];
  return el("td", {"data-label": lab},
            el("span", {class: "badge " + (lab === "-" ? "missing" : lab), title: LABEL_NAMES[lab] || lab},
               lab === "c" ? "C" : lab === "r" ? "R" : lab),
            fmt === "1" ? el("span", {class: "fmt", title: "opening line adopted"}, "fmt") : null);
}

function renderList() {
  matches = filter();
  const shown = shownCheckpoints();
  const pages = Math.max(1, Math.ceil(matches.length / PAGE));
  const page = Math.min(Math.max(1, Number(state.page || 1)), pages);
  document.getElementById("count").textContent =
    matches.length.toLocaleString("en") + " of " + meta.n.toLocaleString("en") + " units";
  document.getElementById("page").textContent = "page " + page + " of " + pages;
  document.getElementById("prev").disabled = page <= 1;
  document.getElementById("next").disabled = page >= pages;
  const head = el("tr", {}, ...["unit", "design", "N_h", "N_b", "phi", "schedule", "opening", "query", "draw"]
    .map(h => el("th", {}, h)), ...shown.map(c => el("th", {}, ckptLabel(c))));
  document.querySelector("#units thead").replaceChildren(head);
  const rows = matches.slice((page - 1) * PAGE, page * PAGE).map(u => {
    const tr = el("tr", {"data-unit": meta.ids[u], onclick: () => openUnit(u)},
      el("td", {}, meta.ids[u].slice(0, 10)), el("td", {}, value("design", u)),
      el("td", {}, value("n_h", u)), el("td", {}, value("n_b", u)), el("td", {}, fmtPhi(phi(u))),
      el("td", {}, value("schedule", u)), el("td", {}, value("opening", u)),
      el("td", {}, value("query", u)), el("td", {}, value("draw", u)),
      ...shown.map(c => badge(c, u)));
    if (meta.ids[u] === state.unit) tr.classList.add("open");
    return tr;
  });
  document.querySelector("#units tbody").replaceChildren(...rows);
}

function openUnit(u) {
  state.unit = meta.ids[u];
  writeHash();
  for (const tr of document.querySelectorAll("#units tbody tr")) {
    tr.classList.toggle("open", tr.dataset.unit === state.unit);
  }
  renderDetail(u).then(() => document.getElementById("detail").scrollIntoView())
    .catch(err => console.warn(err.message));
}

// Pool rows [request, answer] for [pool, row] references; a row the pool lacks is null.
async function rows(refs) {
  const key = ([p, r]) => "pools/" + p + "/" + Math.floor(r / meta.shard_rows);
  const found = refs.filter(ref => ref[1] >= 0);
  await Promise.all([...new Set(found.map(key))].map(load));
  return refs.map(ref => ref[1] >= 0 ? cache[key(ref)][ref[1] % meta.shard_rows] : null);
}

function pairs(flat) {
  const out = [];
  for (let i = 0; i < flat.length; i += 2) out.push([flat[i], flat[i + 1]]);
  return out;
}

async function renderDetail(u) {
  const detail = document.getElementById("detail");
  detail.hidden = false;
  detail.replaceChildren(el("p", {class: "muted"}, "loading…"));
  const shard = await load("units/" + Math.floor(u / meta.shard_units));
  const unit = shard[u % meta.shard_units];
  const sweep = meta.sweeps[value("sweep", u)];
  const parts = [el("h2", {}, "unit " + meta.ids[u]),
    el("p", {class: "muted"}, "design " + value("design", u) + " · N_h " + value("n_h", u) +
       " · N_b " + value("n_b", u) + " · phi " + fmtPhi(phi(u)) + " · schedule " + value("schedule", u) +
       " · opening " + value("opening", u) + " · query " + value("query", u) + " · draw " + value("draw", u))];
  parts.push(await renderPrompt(unit, u, sweep));
  const stages = el("div", {class: "stages"});
  for (const c of shownCheckpoints()) {
    const values = unit.answers[c];
    stages.append(renderAnswer(c, values && Object.fromEntries(meta.answer_fields.map((f, i) => [f, values[i]]))));
  }
  parts.push(el("h3", {}, "answers, stage by stage"), stages);
  detail.replaceChildren(...parts);
}

async function renderPrompt(unit, u, sweep) {
  const box = el("div", {class: "prompt"});
  if (!unit.demos || !unit.target) {
    box.append(el("p", {class: "problem"}, sweep.problem || "the prompt cannot be rebuilt"));
    return box;
  }
  const opening = sweep.openings[value("opening", u)] || null;
  const refs = pairs(unit.demos);
  const kinds = refs.map(ref => meta.pools[ref[0]].kind);
  const nHarm = kinds.filter(k => k === "harmful").length;
  box.append(el("h3", {}, "prompt"),
             el("p", {class: "muted"}, "messages as given to each checkpoint's chat template (" +
                (sweep.packing === "single_message" ? "demos packed in one user message" : "each demo a user and an assistant turn") + ")"));
  if (sweep.system_prompt) box.append(el("div", {class: "turn"}, "system: " + sweep.system_prompt));
  const strip = el("div", {class: "strip", title: "demo kinds in prompt order (red harmful, blue benign)"},
    ...kinds.map((k, i) => el("span", {class: k, title: "#" + (i + 1) + " " + k})));
  const demos = el("details", {class: "demos"},
    el("summary", {}, refs.length + " demonstrations: " + nHarm + " harmful, " +
       (refs.length - nHarm) + " benign (expand)"));
  demos.addEventListener("toggle", async () => {
    if (!demos.open || demos.dataset.filled) return;
    demos.dataset.filled = "1";
    const texts = await rows(refs);
    texts.forEach((row, i) => {
      const [request, response] = row || ["(this demo is no longer in its pool)", ""];
      demos.append(el("div", {class: "demo " + kinds[i]},
        el("span", {class: "kind"}, "#" + (i + 1) + " " + kinds[i]),
        el("div", {class: "turn"}, "user: " + request),
        el("div", {class: "turn"}, "assistant: " + (opening ? opening + "\n" : "") + (response || ""))));
    });
  });
  const [target] = await rows([unit.target]);
  box.append(strip, demos, el("div", {class: "target"}, el("strong", {}, "target request: "),
                              target ? target[0] : "(not in the target pool)"));
  return box;
}

function renderAnswer(c, a) {
  const col = el("div", {class: "stage", "data-ckpt": meta.checkpoints[c].name}, el("h3", {}, ckptLabel(c)));
  if (!a) { col.append(el("p", {class: "muted"}, "no answer stored")); return col; }
  const lab = a.status === "ok" ? (a.complied === 1 ? "c" : "r") : STATUS_CODES[a.status] || "f";
  col.append(
    el("p", {}, el("span", {class: "badge verdict " + lab},
                   a.status === "ok" ? LABEL_NAMES[lab] : a.status),
       a.format_adopted === 1 ? " · opening adopted" : a.format_adopted === 0 ? " · opening not adopted" : ""),
    el("p", {class: "muted"}, "judge " + (a.judge || "–") + " · " + (a.prompt_tokens ?? "–") +
       " prompt tokens · finish " + (a.finish_reason || "–")),
    el("div", {class: "answer"}, a.response || ""));
  if (a.reasoning) {
    col.append(el("details", {class: "reasoning"}, el("summary", {}, "reasoning (stripped before judging)"),
                  el("div", {class: "answer"}, a.reasoning)));
  }
  col.append(el("details", {class: "judge-raw"}, el("summary", {}, "judge's raw output"),
                el("div", {class: "answer"}, a.judge_raw || "–")));
  return col;
}

function update(resetPage) {
  readForm();
  if (resetPage) delete state.page;
  writeHash();
  renderList();
}

function start(data) {
  meta = data;
  document.getElementById("sources").textContent =
    meta.sweeps.map(s => s.dir).join(" · ") + " — " + meta.checkpoints.length + " checkpoints";
  buildFilters();
  state = readHash();
  syncForm();
  const form = document.getElementById("filters");
  form.addEventListener("change", () => update(true));
  document.getElementById("reset").addEventListener("click", () => {
    state = {}; syncForm(); update(true);
  });
  for (const [id, step] of [["prev", -1], ["next", 1]]) {
    document.getElementById(id).addEventListener("click", () => {
      state.page = String(Number(state.page || 1) + step); writeHash(); renderList();
    });
  }
  window.addEventListener("hashchange", () => { state = readHash(); syncForm(); renderList(); });
  renderList();
  requestAnimationFrame(() => setTimeout(() => {
    window.stagesweepFirstPaint = performance.now();
    document.body.dataset.ready = "1";
  }));
  const u = state.unit ? meta.ids.indexOf(state.unit) : -1;
  if (u >= 0) renderDetail(u).catch(err => console.warn(err.message));
}
