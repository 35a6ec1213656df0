// The play page. Every text from the server (rules, the agent's messages, echoes of moves) is
// untrusted and set with textContent only: nothing here parses a server string as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let session = null;
let maxMoveChars = 600;

function setText(id, text) {
  $(id).textContent = text == null ? "" : String(text);
}

function option(select, value) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = value;
  select.appendChild(o);
}

async function call(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const error = (data && data.error) || {message: "HTTP " + response.status};
    throw Object.assign(new Error(String(error.message)), {detail: error});
  }
  return data;
}

function showError(err) {
  const d = err.detail || {};
  let text = err.message;
  if (typeof d.text === "string") {
    text = "Your move \u201c" + d.text + "\u201d does not parse. Expected format: " + d.format;
  }
  setText("error", text);
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text != null) node.textContent = String(text);
  return node;
}

function fill(template, values) {
  return template.replace(/\{(\w+)\}/g, (m, key) => (key in values ? String(values[key]) : m));
}

// The controls of the pending decision (state.controls from the server): each composes exactly the
// text a model must write and plays it like a typed answer.
function renderControls(c) {
  const box = $("controls");
  box.replaceChildren();
  if (!c) return;
  if (c.type === "choice") {
    for (const choice of c.choices) {
      const b = el("button", {type: "button", class: "choice", "data-answer": choice.answer});
      b.append(el("span", {class: "answer"}, choice.answer), el("span", {class: "meaning"}, choice.meaning));
      b.addEventListener("click", () => play(choice.answer));
      box.appendChild(b);
    }
  } else if (c.type === "numbers") {
    const form = el("form", {id: "numbers-form"});
    for (const f of c.fields) {
      const label = el("label", {}, f.label + " ");
      const input = el("input", {type: "number", id: "field-" + f.name, name: f.name, min: f.min, max: f.max,
                                 step: 1, value: f.min, required: ""});
      label.append(input, el("span", {class: "range"}, f.min + " to " + f.max));
      form.appendChild(label);
    }
    form.appendChild(el("button", {type: "submit", id: "propose"}, "Propose"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const values = {};
      for (const f of c.fields) {
        const n = Number($("field-" + f.name).value);
        if (!Number.isInteger(n) || n < f.min || n > f.max) {
          setText("error", f.label + ": an integer from " + f.min + " to " + f.max + ".");
          return;
        }
        values[f.name] = n;
      }
      play(fill(c.template, values));
    });
    box.appendChild(form);
  } else if (c.type === "message") {
    const form = el("form", {id: "message-form"});
    const claim = el("select", {id: "claim"});
    claim.appendChild(el("option", {value: ""}, "add a claim\u2026"));
    c.claims.forEach((text) => claim.appendChild(el("option", {value: text}, text)));
    claim.addEventListener("change", () => {
      if (claim.value) {
        const box = $("message-text");
        box.value = (box.value.trim() ? box.value.trim() + " " : "") + claim.value;
        claim.value = "";
      }
    });
    const label = el("label", {for: "message-text"}, "Your message (no < or >, up to " + c.max_chars + " characters)");
    const text = el("textarea", {id: "message-text", rows: 2, maxlength: c.max_chars});
    const wrap = el("div", {style: "width:100%"});
    wrap.append(label, text);
    form.append(wrap, claim, el("button", {type: "submit", id: "say"}, "Send message"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const message = $("message-text").value.trim();
      if (/[<>]/.test(message)) { setText("error", "A message cannot hold < or >."); return; }
      play(fill(c.template, {message: message}));
    });
    box.appendChild(form);
  }
}

// The running score of each side, one point per finished round.
function renderChart(points) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const W = 640, H = 130, L = 34, R = 10, T = 8, B = 16;
  svg.replaceChildren();
  const totals = [[0, 0]];
  for (const [you, agent] of points) {
    const last = totals[totals.length - 1];
    totals.push([last[0] + Number(you), last[1] + Number(agent)]);
  }
  const top = Math.max(1, ...totals.map((t) => Math.max(t[0], t[1])));
  const low = Math.min(0, ...totals.map((t) => Math.min(t[0], t[1])));
  const n = Math.max(1, totals.length - 1);
  const x = (i) => L + (i / n) * (W - L - R);
  const y = (v) => T + (1 - (v - low) / (top - low)) * (H - T - B);
  const line = (attrs) => {
    const node = document.createElementNS(ns, attrs.tag);
    for (const [k, v] of Object.entries(attrs)) if (k !== "tag" && k !== "text") node.setAttribute(k, String(v));
    if (attrs.text != null) node.textContent = String(attrs.text);
    svg.appendChild(node);
    return node;
  };
  line({tag: "line", class: "axis", x1: L, y1: y(low), x2: W - R, y2: y(low)});
  line({tag: "line", class: "axis", x1: L, y1: T, x2: L, y2: H - B});
  line({tag: "text", x: 2, y: y(top) + 3, text: Math.round(top * 10) / 10});
  line({tag: "text", x: 2, y: y(low), text: Math.round(low * 10) / 10});
  line({tag: "text", x: W - R - 44, y: H - 3, text: "round " + (totals.length - 1)});
  ["you", "agent"].forEach((side, k) => {
    line({tag: "polyline", class: side, "data-rounds": totals.length - 1,
          points: totals.map((t, i) => x(i).toFixed(1) + "," + y(t[k]).toFixed(1)).join(" ")});
    const lastTotal = totals[totals.length - 1][k];
    line({tag: "circle", class: side, cx: x(totals.length - 1), cy: y(lastTotal), r: 3});
  });
}

function render(state) {
  session = state.session;
  $("board").hidden = false;
  $("board").dataset.session = state.session;
  $("board").dataset.done = String(state.done);
  setText("round", state.round);
  setText("n-rounds", state.n_rounds);
  setText("score-you", state.score.you);
  setText("score-agent", state.score.agent);
  setText("rules", state.rules);
  const log = $("log");
  log.replaceChildren();
  for (const entry of state.log) {
    const li = document.createElement("li");
    li.className = "entry " + String(entry.who).replace(/[^a-z]/g, "");
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = {you: "You", agent: "Agent", game: "Game", round: "Result"}[entry.who] || "";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = String(entry.text);
    li.append(who, text);
    log.appendChild(li);
  }
  $("turn").hidden = state.done;
  setText("prompt", state.prompt);
  setText("format", state.format);
  renderControls(state.done ? null : state.controls);
  renderChart(state.points || []);
  $("final").hidden = !state.done;
  setText("final", state.done
    ? "Game over. Final score: you " + state.score.you + ", the agent " + state.score.agent + "."
    : "");
  $("move").value = "";
  $("move").focus();
}

async function newGame(event) {
  event.preventDefault();
  setText("error", "");
  const body = {game: $("game").value, model: $("model").value, seat: $("seat").value};
  const rounds = $("rounds").value.trim();
  if (rounds) {
    const n = Number(rounds);
    if (!Number.isInteger(n) || n < 1 || n > 30) { setText("error", "Rounds: an integer from 1 to 30."); return; }
    body.n_rounds = n;
  }
  $("start").disabled = true;
  try { render(await call("play/new", body)); } catch (err) { showError(err); } finally { $("start").disabled = false; }
}

// Play one move (typed, or composed by a control); every button waits for the answer.
async function play(text) {
  setText("error", "");
  if (!text.trim()) { setText("error", "Type your move first."); return; }
  if (text.length > maxMoveChars) { setText("error", "Your move is over " + maxMoveChars + " characters."); return; }
  const buttons = Array.from(document.querySelectorAll("#turn button"));
  buttons.forEach((b) => { b.disabled = true; });
  $("turn").dataset.busy = "true";
  try {
    render(await call("play/" + encodeURIComponent(session) + "/move", {text: text}));
  } catch (err) {
    showError(err);
  } finally {
    document.querySelectorAll("#turn button").forEach((b) => { b.disabled = false; });
    $("turn").dataset.busy = "false";
  }
}

async function sendMove(event) {
  event.preventDefault();
  await play($("move").value);
}

async function init() {
  $("new-game").addEventListener("submit", newGame);
  $("move-form").addEventListener("submit", sendMove);
  try {
    const opts = await call("play/options");
    maxMoveChars = opts.max_move_chars;
    opts.games.forEach((g) => option($("game"), g));
    opts.models.forEach((m) => option($("model"), m));
    opts.seats.forEach((s) => option($("seat"), s));
    document.body.dataset.ready = "true";
  } catch (err) {
    showError(err);
  }
}

document.addEventListener("DOMContentLoaded", init);
