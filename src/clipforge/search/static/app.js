// The search page: text search, upload search, and click a result to search by it.
// Results are built with DOM calls and textContent only: nothing from the index or the
// query is ever parsed as HTML.
"use strict";

const K = 24;
const form = document.getElementById("search-form");
const query = document.getElementById("query");
const upload = document.getElementById("image-input");
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");

function say(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function card(hit, rank) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.tabIndex = 0;
  figure.dataset.id = String(hit.id);
  figure.dataset.rank = String(rank);
  figure.title = "search by this image";
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = hit.caption || hit.key;
  img.loading = "lazy";
  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const name = document.createElement("span");
  name.className = "name";
  const shown = hit.path ? hit.path.split("/").pop() : hit.key;
  name.textContent = " " + shown + (hit.caption ? " — " + hit.caption : "");
  caption.append(score, name);
  figure.append(img, caption);
  const searchByThis = () => run(`/search/similar?id=${hit.id}&k=${K}`, {}, `image ${shown}`);
  figure.addEventListener("click", searchByThis);
  figure.addEventListener("keydown", (event) => { if (event.key === "Enter") searchByThis(); });
  return figure;
}

async function run(url, options, label) {
  say("searching…");
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    say("the service did not answer: " + err, true);
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    say(`error ${response.status}: ${detail || response.statusText}`, true);
    return;
  }
  grid.replaceChildren(...body.results.map((hit, i) => card(hit, i + 1)));
  say(`${body.results.length} results for ${label} in ${body.took_ms.toFixed(1)} ms`);
  document.body.dataset.state = "done";
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = query.value.trim();
  if (!text) { say("type something to search for", true); return; }
  run(`/search?q=${encodeURIComponent(text)}&k=${K}`, {}, `“${text}”`);
});

upload.addEventListener("change", () => {
  const file = upload.files[0];
  if (!file) return;
  const data = new FormData();
  data.append("file", file);
  run(`/search/image?k=${K}`, { method: "POST", body: data }, `image ${file.name}`);
  upload.value = "";
});

fetch("/health").then((r) => r.json()).then((h) => say(`${h.images} images indexed (${h.index})`)).catch(() => {});
