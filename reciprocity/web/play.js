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

async function sendMove(event) {
  event.preventDefault();
  const text = $("move").value;
  setText("error", "");
  if (!text.trim()) { setText("error", "Type your move first."); return; }
  if (text.length > maxMoveChars) { setText("error", "Your move is over " + maxMoveChars + " characters."); return; }
  $("send").disabled = true;
  try {
    render(await call("play/" + encodeURIComponent(session) + "/move", {text: text}));
  } catch (err) {
    showError(err);
  } finally {
    $("send").disabled = false;
  }
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
