// The msgbroker dashboard page: polls /api/state and draws it. Everything from the broker is
// put in the page as text (textContent, attribute values) — never parsed as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let state = null;
let letters = [];
let shownLetter = null;
let lettersOf = "";
let lastDeadCount = -1;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function short(text, n) {
  text = String(text ?? "");
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return seconds.toFixed(0) + "s";
  if (seconds < 3600) return (seconds / 60).toFixed(0) + "m";
  return (seconds / 3600).toFixed(1) + "h";
}

function rate(value) {
  return value === null || value === undefined ? "n/a" : value.toFixed(1) + "/s";
}

function colour(pending, max) {
  if (pending === null || pending === undefined) return "hsl(220, 10%, 88%)";
  if (!pending) return "hsl(140, 45%, 88%)";
  const share = Math.min(1, Math.log(1 + pending) / Math.log(1 + Math.max(max, 1)));
  return `hsl(${45 - 45 * share}, 85%, ${82 - 30 * share}%)`;
}

function chart(points) {
  const w = 160, h = 36;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const values = points.filter((v) => v !== null);
  const max = Math.max(1, ...values);
  const step = w / Math.max(1, points.length - 1);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2f6fdb");
  line.setAttribute("stroke-width", "1.5");
  line.setAttribute("points", points.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - ((v || 0) / max) * (h - 4)).toFixed(1)}`).join(" "));
  svg.append(line);
  return svg;
}

function groupKey(g) {
  return `${g.topic}/${g.group}`;
}

function drawGroup(g) {
  const view = g.view;
  const section = el("section", { class: "group", "data-topic": g.topic, "data-group": g.group },
    el("h2", {}, `${g.topic} / ${g.group}`));
  if (g.error) section.append(el("p", { class: "notes error" }, g.error));
  if (!view) return section;
  section.append(el("div", { class: "summary" },
    el("span", { class: "total-pending" }, `pending ${view.pending}`),
    el("span", { class: "total-dead" }, `dead letters ${view.dead_letters}`),
    el("span", {}, view.members === null ? "members unknown" : `members ${view.members.length}`)));
  const rates = el("div", { class: "rates" });
  const last = g.rates.length ? g.rates[g.rates.length - 1] : {};
  for (const kind of ["published", "handled", "failed"]) {
    rates.append(el("div", { class: "rate", "data-kind": kind },
      el("span", {}, `${kind} `), el("span", { class: "value" }, rate(last[kind])),
      chart(g.rates.map((r) => r[kind]))));
  }
  section.append(rates);
  const max = Math.max(0, ...view.partitions.map((p) => p.pending || 0));
  const grid = el("div", { class: "grid" });
  for (const p of view.partitions) {
    const cell = el("div", {
      class: "cell", "data-partition": p.partition, "data-pending": p.pending ?? "", "data-owner": p.owner ?? "",
      title: `partition ${p.partition}\npending ${p.pending ?? "?"}\nowner ${p.owner ?? "-"}\nhead ${p.head ?? "-"}` +
        `\nattempt ${p.attempt ?? "-"}\noldest ${age(p.oldest_age) || "-"}`,
    },
    el("div", { class: "p" }, `#${p.partition}`),
    el("div", { class: "pending" }, p.pending === null ? "? pending" : `${p.pending} pending`),
    el("div", { class: "owner" }, p.owner ? `owner ${short(p.owner, 14)}` : (view.owners_known ? "no owner" : "")),
    el("div", { class: "head" }, p.head ? `${short(p.head, 10)} #${p.attempt}` : ""),
    el("div", { class: "age" }, p.oldest_age !== null ? `oldest ${age(p.oldest_age)}` : ""));
    cell.style.background = colour(p.pending, max);
    grid.append(cell);
  }
  section.append(grid);
  if (view.members !== null) {
    const body = el("tbody");
    for (const m of view.members) {
      body.append(el("tr", { class: "member", "data-member": m.member_id },
        el("td", {}, m.member_id),
        el("td", {}, m.joined_at ? new Date(m.joined_at).toLocaleString() : "?"),
        el("td", { class: "held" }, String(m.partitions.length)),
        el("td", {}, short(m.partitions.join(", "), 80))));
    }
    section.append(el("table", { class: "members" },
      el("thead", {}, el("tr", {}, el("th", {}, "member"), el("th", {}, "joined"), el("th", {}, "partitions"),
        el("th", {}, "which"))), body));
  }
  for (const note of view.notes) section.append(el("p", { class: "notes" }, note));
  return section;
}

function draw() {
  const health = document.getElementById("health");
  const h = state.health;
  health.textContent = h.healthy === null ? "checking…" : h.healthy
    ? `healthy (${(h.latency * 1000).toFixed(0)} ms)` : "broker unreachable";
  health.className = "badge " + (h.healthy ? "ok" : "bad");
  document.getElementById("where").textContent = `${state.provider} · ${state.where}`;
  const mode = document.getElementById("mode");
  mode.textContent = state.allow_changes ? "changes allowed" : "read-only";
  mode.className = "badge " + (state.allow_changes ? "rw" : "");
  for (const id of ["replay-selected", "replay-all", "purge-selected", "purge-all", "replay-one"]) {
    const button = document.getElementById(id);
    button.disabled = !state.allow_changes;
    button.title = state.allow_changes ? "" : "read-only: start the dashboard with --allow-changes";
  }
  const notice = document.getElementById("notice");
  notice.hidden = !state.listing || state.groups.length > 0;
  notice.textContent = state.listing ? `${state.listing}; name groups with --watch TOPIC:GROUP` : "";
  document.getElementById("groups").replaceChildren(...state.groups.map(drawGroup));
  const select = document.getElementById("dlq-group");
  const keys = state.groups.map(groupKey);
  if (keys.join("\n") !== Array.from(select.options).map((o) => o.value).join("\n")) {
    const chosen = select.value;
    select.replaceChildren(...keys.map((k) => el("option", { value: k }, k)));
    if (keys.includes(chosen)) select.value = chosen;
  }
  const current = state.groups.find((g) => groupKey(g) === select.value);
  const dead = current && current.view ? current.view.dead_letters : 0;
  if (select.value && (select.value !== lettersOf || dead !== lastDeadCount)) {
    lastDeadCount = dead;
    loadLetters();
  }
}

async function poll() {
  try {
    const response = await fetch("api/state", { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    state = await response.json();
    draw();
  } catch (error) {
    const health = document.getElementById("health");
    health.textContent = `dashboard unreachable: ${error.message}`;
    health.className = "badge bad";
  }
  setTimeout(poll, state ? state.interval * 1000 : 2000);
}

function selectedGroup() {
  const value = document.getElementById("dlq-group").value;
  const g = state && state.groups.find((x) => groupKey(x) === value);
  return g ? { topic: g.topic, group: g.group } : null;
}

async function loadLetters() {
  const target = selectedGroup();
  if (!target) return;
  const query = new URLSearchParams({ ...target, q: document.getElementById("dlq-filter").value,
    partition: document.getElementById("dlq-partition").value });
  const response = await fetch("api/dead-letters?" + query, { credentials: "same-origin", cache: "no-store" });
  const data = await response.json();
  if (!response.ok) return report(data.error, true);
  // a reload of the same group's letters (a poll saw its count change) keeps the boxes ticked
  const kept = new Set(lettersOf === groupKey(target) ? picked() : []);
  lettersOf = groupKey(target);
  letters = data.letters;
  document.getElementById("dlq-count").textContent =
    `${data.total} dead letter(s)` + (data.total > letters.length ? `, the first ${letters.length} shown` : "");
  const body = document.querySelector("#letters tbody");
  body.replaceChildren(...letters.map((x) => {
    const box = el("input", { type: "checkbox", class: "pick", "data-id": x.message_id });
    box.checked = kept.has(x.message_id);
    const row = el("tr", { class: "letter", "data-id": x.message_id },
      el("td", {}, box),
      el("td", { class: "id" }, x.message_id), el("td", {}, String(x.partition)),
      el("td", {}, String(x.attempts)), el("td", {}, new Date(x.dead_lettered_at).toLocaleString()),
      el("td", { class: "error" }, short(x.error, 100)));
    row.addEventListener("click", (event) => { if (event.target.type !== "checkbox") show(x.message_id); });
    return row;
  }));
  if (shownLetter && !letters.some((x) => x.message_id === shownLetter)) shownLetter = null;
  show(shownLetter);
}

function show(id) {
  shownLetter = id;
  const letter = letters.find((x) => x.message_id === id);
  const box = document.getElementById("letter");
  box.hidden = !letter;
  for (const row of document.querySelectorAll("tr.letter")) row.classList.toggle("shown", row.dataset.id === id);
  if (!letter) return;
  document.getElementById("letter-id").textContent = letter.message_id;
  document.getElementById("letter-where").textContent = `${letter.partition} / ${letter.partition_key}`;
  document.getElementById("letter-attempts").textContent = String(letter.attempts);
  document.getElementById("letter-error").textContent = letter.error;
  document.getElementById("letter-headers").textContent = JSON.stringify(letter.headers, null, 2);
  let payload = letter.payload;
  try { payload = JSON.stringify(JSON.parse(payload), null, 2); } catch (e) { /* not JSON: as it is */ }
  document.getElementById("letter-payload").textContent = payload;
}

function report(message, failed) {
  const status = document.getElementById("status");
  status.textContent = message;
  status.className = failed ? "error" : "done";
}

async function change(action, ids) {
  const target = selectedGroup();
  if (!target) return report("choose a group first", true);
  if (ids !== null && !ids.length) return report("select dead letters first (the boxes on the left)", true);
  const what = ids === null ? "every dead letter" : `${ids.length} dead letter(s)`;
  const question = action === "replay"
    ? `Replay ${what} of ${target.topic} / ${target.group}? They are published to the topic again for this group.`
    : `Purge ${what} of ${target.topic} / ${target.group}? This cannot be undone.`;
  if (!window.confirm(question)) return report(`${action}: cancelled`, false);
  const response = await fetch("api/" + action, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Msgbroker-Csrf": state.csrf },
    body: JSON.stringify({ ...target, ...(ids === null ? { all: true } : { ids }) }),
  });
  const data = await response.json();
  if (!response.ok) return report(`${action} refused: ${data.error}`, true);
  report(action === "replay" ? `replayed ${data.replayed} dead letter(s) of ${target.topic} / ${target.group}`
    : `purged ${data.purged} dead letter(s) of ${target.topic} / ${target.group}`, false);
  await loadLetters();
}

function picked() {
  return Array.from(document.querySelectorAll("input.pick:checked")).map((x) => x.dataset.id);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("dlq-group").addEventListener("change", () => { shownLetter = null; loadLetters(); });
  document.getElementById("dlq-refresh").addEventListener("click", loadLetters);
  document.getElementById("dlq-filter").addEventListener("input", loadLetters);
  document.getElementById("dlq-partition").addEventListener("input", loadLetters);
  document.getElementById("pick-all").addEventListener("change", (event) => {
    for (const box of document.querySelectorAll("input.pick")) box.checked = event.target.checked;
  });
  document.getElementById("replay-selected").addEventListener("click", () => change("replay", picked()));
  document.getElementById("replay-all").addEventListener("click", () => change("replay", null));
  document.getElementById("purge-selected").addEventListener("click", () => change("purge", picked()));
  document.getElementById("purge-all").addEventListener("click", () => change("purge", null));
  document.getElementById("replay-one").addEventListener("click", () => change("replay", [shownLetter]));
  poll();
});
