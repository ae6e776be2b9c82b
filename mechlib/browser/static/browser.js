/* mechbook feature browser: plain JS, no network. Data arrive as <script> files that set
   window.MECHBOOK_INDEX and window.MECHBOOK_LATENT (fetch() of local JSON is blocked on file://). */
"use strict";
(function () {
  var SVGNS = "http://www.w3.org/2000/svg";
  var MAX_ROWS = 5000;  // rows drawn at once (every latent of the default run); search narrows the rest

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "—";
    if (x === 0) return "0";
    var a = Math.abs(x);
    return (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : x.toFixed(digits === undefined ? 3 : digits);
  }
  // whitespace shown visibly, as mechlib.plots.visible_token does
  // other control characters as their Unicode "control pictures" (U+2400…), never raw
  function visible(s) {
    if (s === "") return "∅";
    return s.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "→").replace(/[\u0000-\u001f]/g, function (c) {
      return String.fromCharCode(0x2400 + c.charCodeAt(0));
    }).replace(/\u007f/g, "\u2421");
  }
  function raw(s) { return s.replace(/␣/g, " ").replace(/↵/g, "\n").replace(/→/g, "\t"); }

  // ---------------------------------------------------------------- charts
  function barChart(target, counts, labels, opts) {
    var w = opts.width || 520, h = opts.height || 160, pad = 28, n = counts.length;
    var s = svg("svg", { width: w, height: h + pad, viewBox: "0 0 " + w + " " + (h + pad), role: "img" });
    var title = svg("title"); title.textContent = opts.title || "histogram"; s.appendChild(title);
    var maxc = Math.max.apply(null, counts.concat([1]));
    var bw = (w - 2 * pad) / Math.max(n, 1);
    for (var i = 0; i < n; i++) {
      var bh = (opts.log ? Math.log1p(counts[i]) / Math.log1p(maxc) : counts[i] / maxc) * (h - 10);
      var r = svg("rect", { x: pad + i * bw + 0.5, y: h - bh, width: Math.max(bw - 1, 1), height: bh,
                            "class": (opts.classes && opts.classes[i]) || "bar" });
      var t = svg("title"); t.textContent = labels[i] + ": " + counts[i]; r.appendChild(t);
      s.appendChild(r);
    }
    s.appendChild(svg("line", { x1: pad, y1: h, x2: w - pad, y2: h, stroke: "#888" }));
    var ticks = opts.ticks || [];
    ticks.forEach(function (tk) {
      var tx = svg("text", { x: pad + tk[0] * bw, y: h + 14, "text-anchor": "middle" });
      tx.textContent = tk[1]; s.appendChild(tx);
    });
    if (opts.xlabel) {
      var xl = svg("text", { x: w / 2, y: h + 26, "text-anchor": "middle" }); xl.textContent = opts.xlabel; s.appendChild(xl);
    }
    target.appendChild(s);
    return s;
  }

  function densityHistogram(target, density) {
    var lo = -7, hi = 0, per = 4, nb = (hi - lo) * per, counts = [], labels = [], dead = 0;
    for (var i = 0; i <= nb + 1; i++) { counts.push(0); labels.push(""); }
    density.forEach(function (d) {
      if (d <= 0) { dead++; return; }
      var b = Math.floor((Math.log10(d) - lo) * per);
      counts[Math.min(Math.max(b, 0), nb - 1)]++;
    });
    for (var j = 0; j < nb; j++) labels[j] = "density 1e" + (lo + j / per).toFixed(2) + "–1e" + (lo + (j + 1) / per).toFixed(2);
    labels[nb] = "(gap)"; counts[nb + 1] = dead; labels[nb + 1] = "never fired";
    var classes = counts.map(function (_, k) { return k === nb + 1 ? "dead" : "bar"; });
    var ticks = [];
    for (var e = lo; e <= hi; e++) ticks.push([(e - lo) * per, e === 0 ? "1" : "1e" + e]);
    ticks.push([nb + 1.5, "never"]);
    barChart(target, counts, labels, { title: "latent firing density", classes: classes, ticks: ticks, log: true,
                                       xlabel: "fraction of held-out tokens (log10); bar heights log-scaled" });
  }

  // ---------------------------------------------------------------- index page
  function renderIndex() {
    var D = window.MECHBOOK_INDEX;
    if (!D) { document.getElementById("summary").textContent = "data/index.js is missing: rebuild the browser."; return; }
    var n = D.d_sae, rows = [], fired = 0;
    for (var i = 0; i < n; i++) {
      if (D.density[i] > 0) fired++;
      rows.push({ id: i, density: D.density[i], mean: D.mean[i], max: D.max[i], contrast: D.contrast[i],
                  contrast_rank: D.contrast_rank[i], top_tokens: D.top_tokens[i], page: D.page[i] });
    }
    document.getElementById("summary").textContent = "Run " + D.run + " · " + D.model + " · layer " + D.layer +
      " · " + n + " latents (k = " + D.k + "), " + fired + " fired on " + D.n_tokens + " held-out tokens · " +
      D.page.filter(Boolean).length + " with a page" +
      (D.contrast_source ? " · contrast from " + D.contrast_source : " · no contrastive scores yet (chapter 05)");
    densityHistogram(document.getElementById("density-hist"), D.density);

    var state = { key: "id", dir: 1, query: "" };
    var tbody = document.querySelector("#latents tbody");
    var headers = document.querySelectorAll("#latents th");

    function matches(r, q) {
      if (!q) return true;
      if (/^\s*\d+\s*$/.test(q)) return r.id === parseInt(q, 10);
      var needle = raw(q).toLowerCase();
      return r.top_tokens.some(function (t) { return t.toLowerCase().indexOf(needle) >= 0; });
    }
    function cmp(a, b) {
      var x = a[state.key], y = b[state.key];
      if (x === null || x === undefined) return (y === null || y === undefined) ? a.id - b.id : 1;  // blanks last
      if (y === null || y === undefined) return -1;
      if (Array.isArray(x)) { x = x.join(" "); y = y.join(" "); }
      if (typeof x === "string") return state.dir * x.localeCompare(y) || a.id - b.id;
      return state.dir * (x - y) || a.id - b.id;
    }
    function draw() {
      var shown = rows.filter(function (r) { return matches(r, state.query); }).sort(cmp);
      tbody.textContent = "";
      var frag = document.createDocumentFragment();
      shown.slice(0, MAX_ROWS).forEach(function (r) {
        var tr = el("tr", { "data-id": r.id });
        var td = el("td", r.page ? {} : { "class": "nopage" });
        if (r.page) td.appendChild(el("a", { href: "latent.html?id=" + r.id }, String(r.id)));
        else td.textContent = String(r.id);
        tr.appendChild(td);
        tr.appendChild(el("td", {}, fmt(r.density, 5)));
        tr.appendChild(el("td", {}, fmt(r.mean)));
        tr.appendChild(el("td", {}, fmt(r.max)));
        tr.appendChild(el("td", {}, fmt(r.contrast)));
        tr.appendChild(el("td", {}, r.contrast_rank === null ? "—" : String(r.contrast_rank)));
        tr.appendChild(el("td", { "class": "tokens" }, r.top_tokens.map(visible).join("  ·  ")));
        frag.appendChild(tr);
      });
      tbody.appendChild(frag);
      document.getElementById("shown").textContent = shown.length + " of " + n + " latents";
      document.getElementById("more").textContent = shown.length > MAX_ROWS ?
        "Showing the first " + MAX_ROWS + "; search or sort to see others." : "";
      headers.forEach(function (h) {
        h.classList.remove("sorted-asc", "sorted-desc");
        if (h.getAttribute("data-key") === state.key) h.classList.add(state.dir > 0 ? "sorted-asc" : "sorted-desc");
      });
    }
    headers.forEach(function (h) {
      h.addEventListener("click", function () {
        var key = h.getAttribute("data-key");
        if (state.key === key) state.dir = -state.dir;
        else { state.key = key; state.dir = (h.getAttribute("data-type") === "num" && key !== "id" && key !== "contrast_rank") ? -1 : 1; }
        draw();
      });
    });
    document.getElementById("search").addEventListener("input", function (e) { state.query = e.target.value; draw(); });
    draw();
  }

  // ---------------------------------------------------------------- latent page
  function contextLine(ctx, V, maxAct, special) {
    var div = el("div", { "class": "ctx" });
    div.appendChild(el("span", { "class": "val" }, fmt(ctx.act)));
    ctx.ids.forEach(function (id, i) {
      var s = V[String(id)], a = ctx.acts[i];
      var cls = ["tok"];
      var text = visible(s === undefined ? "?" : s);
      if (special[id]) { cls.push("special"); text = "⟨" + s + "⟩"; }
      else if (s !== undefined && s.trim() === "") cls.push("ws");
      if (a === null) cls.push("excluded");
      if (i === ctx.center) cls.push("center");
      var span = el("span", { "class": cls.join(" "), title: "token " + id + ", activation " + (a === null ? "excluded" : fmt(a)),
                              "data-act": a === null ? "" : String(a) }, text);
      if (a !== null && a > 0) span.style.backgroundColor = "rgba(255, 120, 0, " + Math.min(1, a / maxAct).toFixed(3) + ")";
      div.appendChild(span);
    });
    return div;
  }

  function renderLatentData(L) {
    var D = window.MECHBOOK_INDEX || { special_ids: [] }, V = window.MECHBOOK_VOCAB || {}, special = {};
    D.special_ids.forEach(function (i) { special[i] = true; });
    document.title = "latent " + L.id + " · mechbook";
    document.getElementById("title").textContent = "Latent " + L.id;
    document.getElementById("summary").textContent = "fires on " + L.count + " of " + L.n_tokens +
      " held-out tokens (density " + fmt(L.density, 5) + ") · mean activation when firing " + fmt(L.mean) +
      " · max " + fmt(L.max) + (D.contrast && D.contrast[L.id] !== null && D.contrast[L.id] !== undefined ?
      " · contrast (correct − wrong) " + fmt(D.contrast[L.id]) + ", rank " + D.contrast_rank[L.id] : "");
    var maxAct = L.max > 0 ? L.max : 1;
    var top = document.getElementById("top-contexts");
    if (!L.top.length) top.appendChild(el("p", { "class": "note" }, "This latent never fired on the held-out tokens."));
    L.top.forEach(function (c) { top.appendChild(contextLine(c, V, maxAct, special)); });
    var q = document.getElementById("quantiles");
    L.quantiles.forEach(function (band) {
      var box = el("div", { "class": "quantile" });
      box.appendChild(el("h3", {}, band.label + " (activation " + fmt(band.lo) + "–" + fmt(band.hi) + ")"));
      band.examples.forEach(function (c) { box.appendChild(contextLine(c, V, maxAct, special)); });
      q.appendChild(box);
    });
    var e = L.hist.log2_edges, labels = [], ticks = [];
    for (var i = 0; i < L.hist.counts.length; i++) labels.push("activation " + fmt(Math.pow(2, e[i])) + "–" + fmt(Math.pow(2, e[i + 1])));
    for (var j = 0; j < e.length; j++) if (Math.abs(e[j] - Math.round(e[j])) < 1e-9) ticks.push([j, fmt(Math.pow(2, e[j]), 2)]);
    if (L.hist.counts.length) barChart(document.getElementById("act-hist"), L.hist.counts, labels,
      { width: 480, title: "activation histogram", ticks: ticks, xlabel: "activation (log2 bins)" });
    var logits = document.getElementById("logits");
    [["promoted", "up"], ["suppressed", "down"]].forEach(function (p) {
      var box = el("div"), t = el("table"), list = L[p[0]];
      box.appendChild(el("h3", {}, p[0]));
      var scale = Math.max.apply(null, list.map(function (x) { return Math.abs(x[1]); }).concat([1e-9]));
      list.forEach(function (x) {
        var tr = el("tr"), s = V[String(x[0])];
        tr.appendChild(el("td", {}, special[x[0]] ? "⟨" + s + "⟩" : visible(s === undefined ? "?" : s)));
        tr.appendChild(el("td", {}, fmt(x[1])));
        var bar = el("td"), b = el("span", { "class": "bar " + p[1] });
        b.style.width = Math.round(60 * Math.abs(x[1]) / scale) + "px";
        bar.appendChild(b); tr.appendChild(bar); t.appendChild(tr);
      });
      box.appendChild(t); logits.appendChild(box);
    });
    var sim = document.getElementById("similar");
    L.similar.forEach(function (x) {
      var li = el("li");
      if (x[2]) li.appendChild(el("a", { href: "latent.html?id=" + x[0] }, "latent " + x[0]));
      else li.appendChild(el("span", {}, "latent " + x[0]));
      li.appendChild(document.createTextNode(" (cos " + fmt(x[1], 2) + ")"));
      sim.appendChild(li);
    });
  }

  function renderLatent() {
    var m = /[?&]id=(\d+)/.exec(window.location.search), D = window.MECHBOOK_INDEX;
    var summary = document.getElementById("summary");
    if (!m) { summary.textContent = "No latent id given (latent.html?id=N)."; summary.className = "missing"; return; }
    var id = parseInt(m[1], 10);
    if (D && D.page) {
      var ids = [];
      D.page.forEach(function (p, i) { if (p) ids.push(i); });
      var at = ids.indexOf(id), nav = document.getElementById("nav");
      if (at > 0) nav.appendChild(el("a", { href: "latent.html?id=" + ids[at - 1] }, "← latent " + ids[at - 1]));
      if (at >= 0 && at < ids.length - 1) { nav.appendChild(document.createTextNode(" ")); nav.appendChild(el("a", { href: "latent.html?id=" + ids[at + 1] }, "latent " + ids[at + 1] + " →")); }
    }
    var script = document.createElement("script");
    script.src = "data/latents/" + id + ".js";
    script.onload = function () { renderLatentData(window.MECHBOOK_LATENT); document.body.setAttribute("data-ready", "1"); };
    script.onerror = function () {
      summary.textContent = "Latent " + id + " has no page in this build (pages are capped; see the index).";
      summary.className = "missing"; document.body.setAttribute("data-ready", "1");
    };
    document.head.appendChild(script);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var page = document.body.getAttribute("data-page");
    if (page === "index") { renderIndex(); document.body.setAttribute("data-ready", "1"); }
    else if (page === "latent") renderLatent();
  });
  window.mechbookVisible = visible;
})();
