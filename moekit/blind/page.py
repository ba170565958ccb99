"""The rating page (HTML, CSS and JavaScript in one string; no outside assets, works offline).

Keys: ``a`` or Left = A is better, ``b`` or Right = B is better, ``t`` tie, ``x`` both bad,
``1``-``5`` score A, Shift+``1``-``5`` score B, ``n``/``p`` next/previous pair, ``c`` the comment box
(Esc leaves it). Every verdict, score and comment is POSTed as it happens; the page moves on only
after the server has answered that the click is on disk.
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Blind comparison</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f4f4f6;color:#222}
header{background:#2d3142;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header h1{font-size:18px;margin:0;flex:1}
#bar{height:6px;background:#ccc}#bar div{height:6px;background:#4f9d69;width:0}
main{padding:16px 20px;max-width:1300px;margin:auto}
.prompt{background:#fff;border-left:4px solid #2d3142;padding:8px 12px;white-space:pre-wrap;font-family:ui-monospace,monospace}
.cols{display:flex;gap:16px;margin-top:14px}
.side{flex:1;background:#fff;border:2px solid #ddd;border-radius:6px;padding:10px;min-width:0}
.side.chosen{border-color:#4f9d69}
.side h2{margin:0 0 6px;font-size:16px}
.side pre{white-space:pre-wrap;word-break:break-word;min-height:120px;margin:0;font-size:13px}
.scores{margin-top:8px}.scores button{width:34px}
button{font-size:14px;padding:6px 10px;margin:2px;border:1px solid #999;border-radius:4px;background:#fafafa;cursor:pointer}
button.on{background:#4f9d69;color:#fff;border-color:#4f9d69}
.verdicts{margin-top:14px;text-align:center}.verdicts button{min-width:150px;padding:10px}
textarea{width:100%;height:48px;margin-top:10px;font-family:inherit}
.nav{display:flex;justify-content:space-between;margin-top:8px}
#msg{color:#b00020;font-weight:bold;min-height:20px}
kbd{background:#eee;border:1px solid #bbb;border-radius:3px;padding:0 4px;font-size:12px;color:#333}
#done,#who{display:none;background:#fff;padding:30px;text-align:center}
.help{font-size:12px;color:#555;margin-top:10px}
</style></head><body>
<header><h1>Blind comparison</h1><span id="rater"></span><span id="progress"></span></header>
<div id="bar"><div></div></div>
<main>
<div id="who"><p>Who is rating? (letters, digits, <code>_ . -</code>)</p>
<input id="whoid" autofocus> <button id="whogo">Start</button></div>
<div id="done"><h2>All pairs rated, thank you.</h2><p>Your ratings are saved. You can go back to amend any pair.</p>
<button id="doneback">&#9664; Back to the last pair</button></div>
<div id="rate">
<div id="msg"></div>
<div class="prompt" id="prompt"></div>
<div class="cols">
<div class="side" id="sideL"><h2>A</h2><pre id="left"></pre>
<div class="scores">Score A: <span id="scoreL"></span></div></div>
<div class="side" id="sideR"><h2>B</h2><pre id="right"></pre>
<div class="scores">Score B: <span id="scoreR"></span></div></div>
</div>
<div class="verdicts">
<button id="v-left" data-choice="left">A is better <kbd>A</kbd>/<kbd>&larr;</kbd></button>
<button id="v-tie" data-choice="tie">Tie <kbd>T</kbd></button>
<button id="v-both_bad" data-choice="both_bad">Both bad <kbd>X</kbd></button>
<button id="v-right" data-choice="right">B is better <kbd>B</kbd>/<kbd>&rarr;</kbd></button>
</div>
<textarea id="comment" placeholder="Comment (optional; press C to type here, Esc to leave)"></textarea>
<div class="nav"><button id="prev">&#9664; Previous <kbd>P</kbd></button>
<button id="next">Next <kbd>N</kbd> &#9654;</button></div>
<div class="help">Keys: <kbd>A</kbd>/<kbd>&larr;</kbd> A better, <kbd>B</kbd>/<kbd>&rarr;</kbd> B better,
<kbd>T</kbd> tie, <kbd>X</kbd> both bad, <kbd>1</kbd>-<kbd>5</kbd> score A, <kbd>Shift</kbd>+<kbd>1</kbd>-<kbd>5</kbd> score B,
<kbd>N</kbd>/<kbd>P</kbd> next/previous, <kbd>C</kbd> comment. Every click is saved at once.</div>
</div></main>
<script>
"use strict";
let rater = null, numPairs = 0, index = 0, cur = null;
const $ = (id) => document.getElementById(id);
function state() { return cur.rating || {choice: null, score_left: null, score_right: null, comment: ""}; }
async function api(path, body) {
  const opts = body ? {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)} : {};
  const r = await fetch(path, opts);
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}
function showProgress(p) {
  $("progress").textContent = "pair " + (Math.min(index, p.num_pairs - 1) + 1) + " of " + p.num_pairs + " \u00b7 " + p.num_done + " rated";
  $("bar").firstElementChild.style.width = (100 * p.num_done / p.num_pairs) + "%";
  document.body.dataset.done = p.num_done;
}
function render() {
  const s = state();
  $("prompt").textContent = cur.pair.prompt;
  $("left").textContent = cur.pair.left;
  $("right").textContent = cur.pair.right;
  for (const c of ["left", "right", "tie", "both_bad"]) $("v-" + c).classList.toggle("on", s.choice === c);
  $("sideL").classList.toggle("chosen", s.choice === "left");
  $("sideR").classList.toggle("chosen", s.choice === "right");
  for (const side of ["L", "R"]) {
    const key = side === "L" ? "score_left" : "score_right";
    for (const b of $("score" + side).children) b.classList.toggle("on", Number(b.dataset.score) === s[key]);
  }
  if (document.activeElement !== $("comment")) $("comment").value = s.comment || "";
  $("prev").disabled = index === 0;
  document.body.dataset.index = index;
  document.body.dataset.pair = cur.pair.pair_id;
}
async function go(i) {
  $("msg").textContent = "";
  if (i >= numPairs) { $("rate").style.display = "none"; $("done").style.display = "block"; index = numPairs;
    showProgress(await api("/api/state?rater=" + encodeURIComponent(rater))); return; }
  $("done").style.display = "none"; $("rate").style.display = "block";
  cur = await api("/api/pair?rater=" + encodeURIComponent(rater) + "&index=" + i);
  index = i; render(); showProgress(cur);
}
// Every action runs in order through one promise chain: a comment saved on blur, then the verdict
// clicked right after it, reach the server in that order and neither is dropped.
let chain = Promise.resolve();
function enqueue(fn) {
  chain = chain.then(fn).catch((e) => { $("msg").textContent = "NOT SAVED: " + e.message; });
  return chain;
}
async function save(event, change) {
  if (!cur || index >= numPairs) return false;
  const s = Object.assign({}, state(), change);
  const p = await api("/api/rate", Object.assign({rater: rater, index: index, pair_id: cur.pair.pair_id, event: event}, s));
  cur.rating = s; render(); showProgress(p);
  return p;
}
function choose(c) {
  return enqueue(async () => {
    const p = await save("choice", {choice: c, comment: $("comment").value});
    if (p) await go(index + 1 < numPairs ? index + 1 : p.next_index);
  });
}
function score(side, v) { return enqueue(() => save("score", side === "L" ? {score_left: v} : {score_right: v})); }
function nav(i) { return enqueue(() => go(i)); }
for (const side of ["L", "R"]) for (let v = 1; v <= 5; v++) {
  const b = document.createElement("button"); b.textContent = v; b.dataset.score = v; b.id = "score" + side + v;
  b.onclick = () => score(side, v); $("score" + side).appendChild(b);
}
for (const c of ["left", "right", "tie", "both_bad"]) $("v-" + c).onclick = () => choose(c);
$("prev").onclick = () => index > 0 && nav(index - 1);
$("next").onclick = () => nav(Math.min(index + 1, numPairs));
$("doneback").onclick = () => nav(numPairs - 1);
$("comment").addEventListener("change", () => {
  const text = $("comment").value;
  enqueue(() => save("comment", {comment: text}));
});
document.addEventListener("keydown", (e) => {
  if (e.target === $("comment") || e.target === $("whoid")) { if (e.key === "Escape") e.target.blur(); return; }
  if (!rater || e.ctrlKey || e.metaKey || e.altKey) return;
  const digit = /^Digit([1-5])$/.exec(e.code);
  if (digit && $("rate").style.display !== "none") { e.preventDefault(); score(e.shiftKey ? "R" : "L", Number(digit[1])); return; }
  const k = e.key.toLowerCase();
  const map = {a: "left", arrowleft: "left", b: "right", arrowright: "right", t: "tie", x: "both_bad"};
  if (map[k] && $("rate").style.display !== "none") { e.preventDefault(); choose(map[k]); }
  else if (k === "n") { e.preventDefault(); nav(Math.min(index + 1, numPairs)); }
  else if (k === "p" && index > 0) { e.preventDefault(); nav(index - 1); }
  else if (k === "c") { e.preventDefault(); $("comment").focus(); }
});
async function start(id) {
  rater = id; $("who").style.display = "none"; $("rater").textContent = "rater: " + id;
  const s = await api("/api/state?rater=" + encodeURIComponent(id));
  await go(s.next_index);
}
(async () => {
  try {
    const cfg = await api("/api/config"); numPairs = cfg.num_pairs;
    const asked = new URLSearchParams(location.search).get("rater");
    if (cfg.fixed_rater) await start(cfg.fixed_rater);
    else if (asked) await start(asked);
    else { $("rate").style.display = "none"; $("who").style.display = "block";
      $("whogo").onclick = () => { const v = $("whoid").value.trim();
        if (/^[A-Za-z0-9_.-]{1,64}$/.test(v)) { history.replaceState(null, "", "?rater=" + encodeURIComponent(v)); start(v); }
        else $("whoid").style.borderColor = "red"; }; }
  } catch (e) { $("msg").textContent = e.message; }
})();
</script></body></html>
"""
