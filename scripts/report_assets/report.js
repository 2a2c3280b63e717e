// meshpilot run report: draws the page's charts as inline SVG from the JSON in <script id="report-data">.
// No library and no network: scripts/report.py inlines this file into the page it writes.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const W = 640, H = 300, M = {left: 70, right: 16, top: 44, bottom: 44};

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, s, attrs) {
    const t = el("text", Object.assign({x: x, y: y}, attrs || {}), parent);
    t.textContent = s;
    return t;
  }

  // About five round tick values covering [lo, hi].
  function ticks(lo, hi) {
    if (lo === hi) { lo -= 1; hi += 1; }
    const raw = (hi - lo) / 5, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(f => f * mag).find(s => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a >= 1e12) return (v / 1e12).toPrecision(3) + "T";
    if (a >= 1e9) return (v / 1e9).toPrecision(3) + "G";
    if (a >= 1e6) return (v / 1e6).toPrecision(3) + "M";
    if (a >= 1e4) return (v / 1e3).toPrecision(3) + "k";
    return a !== 0 && a < 1e-3 ? v.toExponential(2) : +v.toPrecision(4) + "";
  }

  function frame(spec) {
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img", "aria-label": spec.title});
    text(svg, W / 2, 18, spec.title, {"text-anchor": "middle", class: "chart-title"});
    return svg;
  }

  function lineChart(spec) {
    const svg = frame(spec);
    const pts = spec.series.flatMap(s => s.points);
    const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (spec.zero) y0 = Math.min(0, y0);
    const yt = ticks(y0, y1), xt = ticks(x0, x1);
    y0 = Math.min(y0, yt[0]); y1 = Math.max(y1, yt[yt.length - 1]);
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const sx = x => M.left + (x - x0) / (x1 - x0) * (W - M.left - M.right);
    const sy = y => H - M.bottom - (y - y0) / (y1 - y0 || 1) * (H - M.top - M.bottom);
    const axes = el("g", {class: "axes"}, svg);
    for (const v of yt) {
      el("line", {x1: M.left, x2: W - M.right, y1: sy(v), y2: sy(v), class: "grid"}, axes);
      text(axes, M.left - 6, sy(v) + 4, fmt(v), {"text-anchor": "end"});
    }
    for (const v of xt.filter(v => v >= x0 && v <= x1)) text(axes, sx(v), H - M.bottom + 16, fmt(v), {"text-anchor": "middle"});
    text(axes, (M.left + W - M.right) / 2, H - 6, spec.xlabel || "", {"text-anchor": "middle"});
    text(axes, 14, (M.top + H - M.bottom) / 2, spec.ylabel || "", {"text-anchor": "middle", transform: `rotate(-90 14 ${(M.top + H - M.bottom) / 2})`});
    for (const mark of spec.vlines || []) {
      el("line", {x1: sx(mark[0]), x2: sx(mark[0]), y1: M.top, y2: H - M.bottom, class: "vline"}, svg);
      text(svg, sx(mark[0]) + 3, M.top + 10, mark[1], {class: "vlabel"});
    }
    spec.series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      if (!s.markers_only) el("path", {d: d, fill: "none", stroke: color, "stroke-width": 1.5, "stroke-dasharray": s.dash ? "5,3" : "none", class: "series"}, svg);
      if (s.markers || s.markers_only || s.points.length === 1)
        for (const p of s.points) el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color, class: "marker"}, svg);
      const lx = M.left + i * 130;  // the legend: a row between the title and the plot
      el("rect", {x: lx, y: 24, width: 10, height: 10, fill: color}, svg);
      text(svg, lx + 14, 33, s.name, {class: "legend"});
    });
    hover(svg, spec, sx, sy, x0, x1);
    return svg;
  }

  // A crosshair and the series' values at the nearest logged x.
  function hover(svg, spec, sx, sy, x0, x1) {
    const line = el("line", {y1: M.top, y2: H - M.bottom, class: "cursor", visibility: "hidden"}, svg);
    const label = text(svg, 0, M.top + 24, "", {class: "readout", visibility: "hidden"});
    svg.addEventListener("mousemove", ev => {
      const box = svg.getBoundingClientRect();
      const x = x0 + ((ev.clientX - box.left) * W / box.width - M.left) / (W - M.left - M.right) * (x1 - x0);
      const parts = [];
      let at = null;
      for (const s of spec.series) {
        if (!s.points.length) continue;
        const p = s.points.reduce((a, b) => Math.abs(b[0] - x) < Math.abs(a[0] - x) ? b : a);
        at = at === null ? p[0] : at;
        parts.push(`${s.name} ${fmt(p[1])}`);
      }
      if (at === null) return;
      line.setAttribute("x1", sx(at)); line.setAttribute("x2", sx(at));
      label.setAttribute("x", Math.min(sx(at) + 6, W - 200));
      label.textContent = `${spec.xlabel || "x"} ${fmt(at)}: ${parts.join(", ")}`;
      line.setAttribute("visibility", "visible"); label.setAttribute("visibility", "visible");
    });
    svg.addEventListener("mouseleave", () => { line.setAttribute("visibility", "hidden"); label.setAttribute("visibility", "hidden"); });
  }

  // Horizontal stacked bars: one row per run, one colour per part (goodput: where the wall time went).
  function stackedBars(spec) {
    const svg = frame(spec);
    const names = spec.parts, rows = spec.rows;
    const total = Math.max(...rows.map(r => r.values.reduce((a, b) => a + Math.max(b, 0), 0)), 1e-9);
    const left = 80, right = W - 20, top = M.top + 24, bh = 24;
    svg.setAttribute("viewBox", `0 0 ${W} ${top + rows.length * (bh + 8) + 12}`);  // as tall as its rows
    rows.forEach((r, i) => {
      const y = top + i * (bh + 8);
      text(svg, left - 6, y + bh / 2 + 4, r.label, {"text-anchor": "end"});
      let x = left;
      r.values.forEach((v, j) => {
        const w = Math.max(v, 0) / total * (right - left - 70);
        const rect = el("rect", {x: x, y: y, width: w, height: bh, fill: COLORS[j % COLORS.length], class: "bar"}, svg);
        el("title", {}, rect).textContent = `${names[j]}: ${fmt(v)} s`;
        x += w;
      });
      text(svg, x + 4, y + bh / 2 + 4, r.note || "");
    });
    names.forEach((n, j) => {
      const lx = 10 + (j % 5) * 126, ly = 33 + (j >= 5 ? 16 : 0);
      el("rect", {x: lx, y: ly - 8, width: 10, height: 10, fill: COLORS[j % COLORS.length]}, svg);
      text(svg, lx + 14, ly + 1, n, {class: "legend"});
    });
    return svg;
  }

  const RENDER = {line: lineChart, bars: stackedBars};
  const data = JSON.parse(document.getElementById("report-data").textContent);
  for (const spec of data.charts) {
    const holder = document.getElementById("chart-" + spec.id);
    holder.appendChild(RENDER[spec.type](spec));
  }
  document.body.dataset.charts = String(data.charts.length);
})();
