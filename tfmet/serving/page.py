"""The upload page of tfmet-serve: plain HTML and a little JavaScript, no external resources.

What a member of the museum's staff sees: their photo beside the answer (the exhibit's Met id,
its name when tfmet-serve was given `--names`, and its database photo), the confidence said in
words against the operating threshold, a plain "not in the collection" when the photo is
rejected (with the closest exhibit for reference), the closest exhibits as thumbnails, and a
link to the JSON API for programs.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Which exhibit is this?</title>
<style>
 body { font-family: Georgia, serif; margin: 1.5em auto; max-width: 56em; color: #222;
        padding: 0 1em; }
 h1 { font-weight: normal; margin-bottom: .2em; }
 .lead { color: #555; margin-top: 0; }
 #drop { border: 3px dashed #999; border-radius: 8px; padding: 1.5em; text-align: center;
         font-family: sans-serif; }
 #drop.over { background: #eef; }
 #busy { font-family: sans-serif; color: #555; }
 #result { margin-top: 1.5em; display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
 figure { margin: 0; }
 figcaption { font-family: sans-serif; font-size: .85em; color: #555; margin-top: .3em; }
 #query img, #exhibit img { max-width: 300px; max-height: 300px; border: 1px solid #ccc; }
 #answer { font-size: 1.8em; margin: 0 0 .2em; }
 #answer.accepted { color: #1b6e2a; }
 #answer.rejected { color: #a33; }
 #name { font-size: 1.3em; font-style: italic; margin-bottom: .6em; }
 #confidence { font-family: sans-serif; max-width: 28em; line-height: 1.4; }
 #matches figure { display: inline-block; margin: 4px 8px 4px 0; text-align: center; }
 #matches img { height: 100px; border: 1px solid #ccc; }
 #error { color: #a33; font-family: sans-serif; }
 footer { margin-top: 2.5em; font-family: sans-serif; font-size: .85em; color: #555; }
</style></head>
<body>
<h1>Which exhibit is this?</h1>
<p class="lead">Choose a photo of an object: the recogniser names the exhibit of the collection
it shows, or says that it is not in the collection.</p>
<div id="drop">Drop a photo here, or <input type="file" id="file" accept="image/*"></div>
<p id="busy" hidden>Looking for it in the collection&hellip;</p>
<p id="error"></p>
<div id="result" hidden>
 <figure id="query"><figcaption>Your photo</figcaption></figure>
 <div>
  <p id="answer"></p>
  <div id="name"></div>
  <figure id="exhibit" hidden><img alt=""><figcaption></figcaption></figure>
  <p id="confidence"></p>
 </div>
</div>
<div id="closest" hidden><h3>Closest exhibits</h3><div id="matches"></div></div>
<footer>For programs: the <a href="/v1">JSON API</a> (POST a photo to /v1/recognize).</footer>
<script>
function exhibitLabel(id, name) { return "Met " + id + (name ? " \\u00b7 " + name : ""); }
// The decimals of tfmet.serving.client.decimals: 3, or more while a confidence below the
// threshold would print as high as it (0.1107 below 0.1108, not 0.111 and 0.111).
function decimals(value, threshold) {
  let d = 3;
  while (value < threshold && d < 12 && +value.toFixed(d) >= +threshold.toFixed(d)) d++;
  return d;
}
function confidenceWords(data) {
  const d = decimals(data.confidence, data.threshold);
  const c = data.confidence.toFixed(d), t = data.threshold.toFixed(d);
  if (data.threshold <= 0) {
    return "Confidence " + c + ". No operating threshold is set: every photo gets an answer.";
  }
  if (data.accepted) {
    return "Confidence " + c + ", at or above the threshold of " + t +
      " needed for an answer: recognised.";
  }
  return "Confidence " + c + " is below the threshold of " + t +
    " needed for an answer, so the photo is not matched to any exhibit. The closest is " +
    exhibitLabel(data.best_met_id, data.name) + ".";
}
// A --rerank=spatial export's answers say how many local matches one geometry explained.
function inlierWords(data) {
  if (data.inliers === undefined) return "";
  return " Spatial verification: " + data.inliers +
    " matching points of the photo agree on one view of the best match.";
}
function show(file, data) {
  const query = document.getElementById("query");
  query.querySelectorAll("img").forEach(i => i.remove());
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file); img.alt = "your photo";
  query.prepend(img);
  const answer = document.getElementById("answer");
  answer.textContent = data.answer;
  answer.className = data.accepted ? "accepted" : "rejected";
  document.getElementById("name").textContent = data.accepted && data.name ? data.name : "";
  const exhibit = document.getElementById("exhibit");
  const best = data.top_k.find(m => m.met_id === data.met_id);
  exhibit.hidden = !(data.accepted && best && best.thumbnail);
  if (!exhibit.hidden) {
    exhibit.querySelector("img").src = best.thumbnail + "?size=large";
    exhibit.querySelector("img").alt = exhibitLabel(best.met_id, best.name);
    exhibit.querySelector("figcaption").textContent =
      "In the collection: " + exhibitLabel(best.met_id, best.name);
  }
  document.getElementById("confidence").textContent =
    data.valid ? confidenceWords(data) + inlierWords(data)
      : "The file could not be read as an image.";
  const matches = document.getElementById("matches");
  matches.innerHTML = "";
  for (const m of data.top_k) {
    const fig = document.createElement("figure");
    if (m.thumbnail) {
      const t = document.createElement("img");
      t.src = m.thumbnail; t.alt = exhibitLabel(m.met_id, m.name);
      fig.appendChild(t);
    }
    const cap = document.createElement("figcaption");
    cap.textContent = exhibitLabel(m.met_id, m.name) + " (" + m.score.toFixed(3) + ")";
    fig.appendChild(cap);
    matches.appendChild(fig);
  }
  document.getElementById("result").hidden = false;
  document.getElementById("closest").hidden = data.top_k.length === 0;
}
async function send(file) {
  document.getElementById("error").textContent = "";
  document.getElementById("answer").textContent = "";
  document.getElementById("busy").hidden = false;
  const form = new FormData();
  form.append("image", file);
  try {
    const response = await fetch("/v1/recognize", { method: "POST", body: form });
    const data = await response.json();
    if (!response.ok) { document.getElementById("error").textContent = data.detail; return; }
    show(file, data);
  } catch (e) {
    document.getElementById("error").textContent =
      "The recogniser did not answer (" + e.message + ").";
  } finally {
    document.getElementById("busy").hidden = true;
  }
}
const drop = document.getElementById("drop");
document.getElementById("file").addEventListener("change", e => send(e.target.files[0]));
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
</script>
</body></html>
"""
