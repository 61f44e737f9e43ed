// The live page: one EventSource on the watched user's stream; the busiest users polled every 2 s.
// No framework and no build step: the DOM is small and the data is one Recommendation at a time.
"use strict";

const $ = (id) => document.getElementById(id);
let watched = null;  // user id
let source = null;   // EventSource of the watched user
let updates = 0;

function text(el, value) { el.textContent = value ?? "—"; }
const fmt = (x) => (Math.abs(x) < 5e-4 ? 0 : x).toFixed(3);  // no "-0.000"

function watch(user) {
  if (!user || user === watched) return;
  if (source) source.close();
  watched = user;
  updates = 0;
  text($("user"), user);
  text($("updates"), 0);
  history.replaceState(null, "", "?user=" + encodeURIComponent(user));
  source = new EventSource(`/v1/users/${encodeURIComponent(user)}/recommendations/stream`);
  source.addEventListener("recommendation", (e) => show(JSON.parse(e.data)));
  source.onopen = () => text($("status"), "live");
  source.onerror = () => text($("status"), "reconnecting…");
  markBusiest();
}

// Share of a part in the score's bar: magnitudes, since either part may be negative.
function shares(item) {
  const l = Math.abs(item.long_score), s = Math.abs(item.short_score);
  return l + s > 0 ? [l / (l + s), s / (l + s)] : [0, 0];
}

function show(rec) {
  updates += 1;
  text($("updates"), updates);
  text($("model-version"), rec.model_version);
  text($("long-term-version"), rec.long_term_version ?? "none (cold start)");
  text($("alpha"), rec.alpha.toFixed(3));
  text($("event"), `${rec.event_id} at ${new Date(rec.event_ts).toLocaleTimeString()}`);
  // Every boolean of the record is a flag (cold_start, unknown_item, and any the contract adds).
  $("flags").replaceChildren(...Object.entries(rec).filter(([, v]) => typeof v === "boolean").map(([k, v]) => {
    const b = document.createElement("span");
    b.className = "badge" + (v ? " on" : "");
    b.dataset.testid = "flag-" + k;
    b.textContent = `${k}: ${v ? "yes" : "no"}`;
    return b;
  }));
  const session = rec.short_term_items || [];
  $("session").replaceChildren(...(session.length ? session.map((id) => {
    const c = document.createElement("span");
    c.className = "chip";
    c.textContent = id;
    return c;
  }) : [document.createTextNode(rec.cold_start && rec.alpha === 0 ? "none" : "none (no known item yet)")]));
  $("items").replaceChildren(...rec.items.map((item, k) => {
    const row = document.createElement("tr");
    row.dataset.testid = "item";
    row.dataset.item = item.item_id;
    const [l, s] = shares(item);
    const neg = (x) => (x < 0 ? " neg" : "");
    row.innerHTML = `<td>${k + 1}</td><td class="id"></td><td class="num">${fmt(item.score)}</td>
      <td><div class="bar" title="long ${(100 * l).toFixed(0)}% / short ${(100 * s).toFixed(0)}%">
        <div class="long${neg(item.long_score)}" style="width:${(100 * l).toFixed(1)}%"></div>
        <div class="short${neg(item.short_score)}" style="width:${(100 * s).toFixed(1)}%"></div></div></td>
      <td class="num long-part">${fmt(item.long_score)}</td><td class="num short-part">${fmt(item.short_score)}</td>`;
    row.querySelector(".id").textContent = item.item_id;  // ids are data: never HTML
    return row;
  }));
  $("items").classList.remove("flash");
  void $("items").offsetWidth;  // restart the animation
  $("items").classList.add("flash");
}

function markBusiest() {
  for (const b of $("busiest").querySelectorAll("button")) b.classList.toggle("current", b.dataset.user === watched);
}

async function pollBusiest() {
  try {
    const res = await fetch("/v1/active-users?limit=10");
    const { users } = await res.json();
    $("busiest").replaceChildren(...users.map(({ user_id, updates }) => {
      const li = document.createElement("li"), b = document.createElement("button");
      b.dataset.user = user_id;
      b.textContent = `${user_id} (${updates})`;
      b.onclick = () => { $("follow").checked = false; watch(user_id); };
      li.append(b);
      return li;
    }));
    markBusiest();
    // Following: move to the busiest user once they lead the watched one clearly, so that two users
    // of about the same activity do not make the view flicker.
    const current = users.find((u) => u.user_id === watched);
    if ($("follow").checked && users.length && users[0].user_id !== watched
        && (!current || users[0].updates > 1.25 * current.updates)) watch(users[0].user_id);
    if (!watched) text($("status"), users.length ? "live" : "waiting for recommendations…");
  } catch (e) {
    text($("status"), "API unreachable");
  }
}

$("pick").onsubmit = (e) => {
  e.preventDefault();
  $("follow").checked = false;
  watch($("user-input").value.trim());
};
const given = new URLSearchParams(location.search).get("user");
if (given) { $("follow").checked = false; watch(given); }
pollBusiest();
setInterval(pollBusiest, 2000);
