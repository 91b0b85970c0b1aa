// Charts of the dashboard, drawn as inline SVG from /api/dashboard/charts (no libraries).
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#49c", "#c74", "#4a7", "#a7c", "#ca4", "#777"];
  const W = 460, H = 220, PAD = 40;

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, s, extra) {
    const t = el("text", Object.assign({ x: x, y: y, "font-size": 10, fill: "#555" }, extra || {}), parent);
    t.textContent = s;
    return t;
  }
  function frame(box) {
    const svg = el("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
    box.replaceChildren(svg);
    el("line", { x1: PAD, y1: H - PAD, x2: W - 10, y2: H - PAD, stroke: "#999" }, svg);
    el("line", { x1: PAD, y1: 10, x2: PAD, y2: H - PAD, stroke: "#999" }, svg);
    return svg;
  }
  function empty(box, why) {
    const svg = frame(box);
    text(svg, W / 2 - 40, H / 2, why);
  }
  // series: [{name, points: [[x, y], ...]}]
  function lines(box, series, xLabel) {
    const pts = series.flatMap(s => s.points);
    if (!pts.length) return empty(box, "no data yet");
    const svg = frame(box);
    const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y1 = Math.max(...ys, 1e-9);
    const sx = x => PAD + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - PAD - 20);
    const sy = y => H - PAD - (y / y1) * (H - PAD - 20);
    text(svg, 2, 16, y1.toPrecision(3));
    text(svg, PAD, H - PAD + 14, String(x0));
    text(svg, W - 60, H - PAD + 14, String(x1));
    text(svg, W / 2 - 20, H - 6, xLabel);
    series.forEach((s, i) => {
      const c = COLORS[i % COLORS.length];
      el("polyline", { points: s.points.map(p => sx(p[0]) + "," + sy(p[1])).join(" "), fill: "none", stroke: c, "stroke-width": 2 }, svg);
      s.points.forEach(p => el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: c }, svg));
      text(svg, PAD + 10 + 110 * i, 14, s.name, { fill: c });
    });
  }
  // bars: [{label, value}]
  function bars(box, items, unit) {
    if (!items.length) return empty(box, "no data yet");
    const svg = frame(box);
    const top = Math.max(...items.map(b => b.value), 1e-18);
    const bw = (W - PAD - 20) / items.length;
    items.forEach((b, i) => {
      const h = (b.value / top) * (H - PAD - 30);
      const r = el("rect", { x: PAD + i * bw + 4, y: H - PAD - h, width: bw - 8, height: h, fill: COLORS[i % COLORS.length] }, svg);
      el("title", {}, r).textContent = b.label + ": " + b.value + " " + unit;
      text(svg, PAD + i * bw + 4, H - PAD + 14, b.label.slice(0, 8) + "…");
      text(svg, PAD + i * bw + 4, H - PAD - h - 4, b.value.toPrecision(3));
    });
    text(svg, 2, 16, unit);
  }

  const boxes = document.querySelectorAll(".chart[data-chart]");
  if (!boxes.length) return;
  fetch("/api/dashboard/charts").then(r => r.json()).then(d => {
    const t0 = d.latency.length ? d.latency[0].t : 0;
    const draw = {
      latency: b => lines(b, [
        { name: "latency", points: d.latency.map(p => [Math.round(p.t - t0), p.latency_ms]) },
        { name: "TTFT", points: d.latency.filter(p => p.ttft_ms !== null).map(p => [Math.round(p.t - t0), p.ttft_ms]) },
      ], "seconds since first job"),
      throughput: b => lines(b, [{ name: "tokens/s", points: d.throughput.map(p => [Math.round(p.t - t0), p.tokens_per_s]) }], "seconds since first job"),
      earnings: b => bars(b, d.earnings.map(e => ({ label: e.node, value: e.dlis })), "DLIS"),
      reputation: b => lines(b, Object.entries(d.reputation).map(([n, pts]) => ({ name: n.slice(0, 10), points: pts.map(p => [p.epoch, p.bps / 100]) })), "epoch"),
    };
    boxes.forEach(b => { (draw[b.dataset.chart] || (x => empty(x, "unknown chart")))(b); b.dataset.drawn = "1"; });
  }).catch(err => boxes.forEach(b => { empty(b, "chart data unavailable"); b.dataset.error = String(err); }));
})();
