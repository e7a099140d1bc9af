"""The upload page of tfmet-serve: plain HTML and a little JavaScript, no external resources."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tfmet: which exhibit is this?</title>
<style>
 body { font-family: sans-serif; margin: 2em auto; max-width: 52em; color: #222; }
 #drop { border: 3px dashed #888; border-radius: 8px; padding: 2em; text-align: center; }
 #drop.over { background: #eef; }
 #result { margin-top: 1.5em; display: flex; gap: 1.5em; align-items: flex-start; }
 #query img { max-width: 240px; max-height: 240px; }
 #answer { font-size: 1.6em; font-weight: bold; }
 #answer.rejected { color: #a33; }
 #matches figure { display: inline-block; margin: 4px; text-align: center; font-size: .85em; }
 #matches img { height: 110px; }
 #error { color: #a33; }
</style></head>
<body>
<h1>Which exhibit is this?</h1>
<div id="drop">Drop a photo here, or <input type="file" id="file" accept="image/*"></div>
<p id="error"></p>
<div id="result" hidden>
 <figure id="query"></figure>
 <div><div id="answer"></div><div id="confidence"></div>
  <h3>Top matches in the collection</h3><div id="matches"></div></div>
</div>
<script>
const drop = document.getElementById("drop");
function show(file, data) {
  document.getElementById("query").innerHTML = "";
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file);
  document.getElementById("query").appendChild(img);
  const answer = document.getElementById("answer");
  answer.textContent = data.answer;
  answer.className = data.accepted ? "accepted" : "rejected";
  document.getElementById("confidence").textContent =
    "confidence " + data.confidence.toFixed(3) + " (threshold " + data.threshold.toFixed(3) + ")";
  const matches = document.getElementById("matches");
  matches.innerHTML = "";
  for (const m of data.top_k) {
    const fig = document.createElement("figure");
    if (m.thumbnail) {
      const t = document.createElement("img");
      t.src = m.thumbnail; t.alt = "Met " + m.met_id;
      fig.appendChild(t);
    }
    const cap = document.createElement("figcaption");
    cap.textContent = "Met " + m.met_id + " (" + m.score.toFixed(3) + ")";
    fig.appendChild(cap);
    matches.appendChild(fig);
  }
  document.getElementById("result").hidden = false;
}
async function send(file) {
  document.getElementById("error").textContent = "";
  document.getElementById("answer").textContent = "";
  const form = new FormData();
  form.append("image", file);
  const response = await fetch("/v1/recognize", { method: "POST", body: form });
  const data = await response.json();
  if (!response.ok) { document.getElementById("error").textContent = data.detail; return; }
  show(file, data);
}
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
