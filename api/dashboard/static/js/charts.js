// The job page's two plots, drawn with the vendored Plotly.js (window.Plotly, served from the `plotly` package).

const METHOD = {
  nwc: { name: "NWC", color: "#1f6feb", symbol: "circle" },
  gptq: { name: "GPTQ", color: "#d97706", symbol: "square" },
  rtn: { name: "RTN", color: "#7c3aed", symbol: "diamond" },
  "nowag-vq": { name: "NoWag-VQ", color: "#059669", symbol: "triangle-up" },
  "nowag-p": { name: "NoWag-P", color: "#b91c1c", symbol: "x" },
  wanda: { name: "Wanda", color: "#0891b2", symbol: "cross" },
  raw: { name: "stored as is", color: "#6b7280", symbol: "circle" },
};

const CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
const FONT = { family: "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", size: 13 };

function layout(extra) {
  return {
    font: FONT,
    margin: { l: 60, r: 20, t: 20, b: 60 },
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    legend: { orientation: "h", y: -0.25 },
    hovermode: "closest",
    ...extra,
  };
}

/**
 * Perplexity vs measured bits: one line per method over the other finished jobs of the model, this job as a
 * star, and the original model as a dashed line (and a point at its own bits per weight when known).
 */
export function pplVsBitsPlot(id, { self, others, original, tokens }) {
  const traces = [];
  const byMethod = {};
  for (const p of others) (byMethod[p.method] ||= []).push(p);
  for (const [method, pts] of Object.entries(byMethod)) {
    pts.sort((a, b) => a.bits - b.bits);
    const m = METHOD[method] || { name: method, color: "#374151", symbol: "circle" };
    traces.push({
      type: "scatter", mode: "lines+markers", name: `${m.name} (other jobs)`,
      x: pts.map((p) => p.bits), y: pts.map((p) => p.ppl), text: pts.map((p) => p.id),
      marker: { color: m.color, symbol: m.symbol, size: 8 }, line: { color: m.color, width: 1.5 },
      hovertemplate: "%{text}<br>%{x:.3f} bits/weight<br>perplexity %{y:.3f}<extra></extra>",
    });
  }
  const sm = METHOD[self.method] || { name: self.method, color: "#374151" };
  traces.push({
    type: "scatter", mode: "markers", name: `this job (${sm.name})`,
    x: [self.bits], y: [self.ppl], text: [self.id],
    marker: { color: sm.color, symbol: "star", size: 16, line: { color: "#111827", width: 1 } },
    hovertemplate: "this job<br>%{x:.3f} bits/weight<br>perplexity %{y:.3f}<extra></extra>",
  });
  const xs = [self.bits, ...others.map((p) => p.bits)];
  if (original.bits) {
    xs.push(original.bits);
    traces.push({
      type: "scatter", mode: "markers", name: `original (${original.bits.toFixed(1)} bits/weight)`,
      x: [original.bits], y: [original.ppl], marker: { color: "#111827", symbol: "x", size: 10 },
      hovertemplate: "original model<br>%{x:.1f} bits/weight<br>perplexity %{y:.3f}<extra></extra>",
    });
  }
  const lo = Math.min(...xs);
  const hi = Math.max(...xs);
  const pad = Math.max(0.25, (hi - lo) * 0.05);
  traces.push({
    type: "scatter", mode: "lines", name: "original perplexity",
    x: [lo - pad, hi + pad], y: [original.ppl, original.ppl],
    line: { color: "#111827", dash: "dash", width: 1 }, hoverinfo: "skip",
  });
  return window.Plotly.newPlot(id, traces, layout({
    xaxis: { title: { text: "measured bits per weight" }, zeroline: false },
    yaxis: { title: { text: `perplexity (${tokens} tokens)` }, zeroline: false },
  }), CONFIG);
}

/** Bits per weight of every coded tensor, coloured by method, with the file's average as a line. */
export function bitsPerLayerPlot(id, tensors, average) {
  const coded = tensors.filter((t) => t.method !== "raw");
  const shortName = (n) => n.replace(/^model\./, "").replace(/\.weight$/, "");
  const traces = [];
  for (const method of [...new Set(coded.map((t) => t.method))]) {
    const ts = coded.filter((t) => t.method === method);
    const m = METHOD[method] || { name: method, color: "#374151" };
    traces.push({
      type: "bar", name: m.name, marker: { color: m.color },
      x: ts.map((t) => shortName(t.name)), y: ts.map((t) => t.bits_per_weight),
      customdata: ts.map((t) => t.numel),
      hovertemplate: "%{x}<br>%{y:.3f} bits/weight<br>%{customdata:,} parameters<extra></extra>",
    });
  }
  const names = coded.map((t) => shortName(t.name));
  if (names.length) {
    traces.push({
      type: "scatter", mode: "lines", name: `whole file: ${average.toFixed(3)} bits/weight`,
      x: [names[0], names[names.length - 1]], y: [average, average],
      line: { color: "#111827", dash: "dash", width: 1 }, hoverinfo: "skip",
    });
  }
  return window.Plotly.newPlot(id, traces, layout({
    // legend above the plot: the long, slanted layer names take the space below it
    margin: { l: 60, r: 20, t: 40, b: 140 },
    legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
    xaxis: { tickangle: -60, automargin: true, categoryorder: "array", categoryarray: names, tickfont: { size: 10 } },
    yaxis: { title: { text: "bits per weight" }, rangemode: "tozero" },
    bargap: 0.15,
  }), CONFIG);
}
