// The charts of the job page (uPlot): a metric by step in a card, as wide as the card, with the
// value under the cursor (the last one when the cursor is elsewhere) beside the card's title.
"use strict";

const CHART_HEIGHT = 220;
// Steps are whole numbers: ticks 1, 2, 5, 10, 20, 50, ... steps apart (uPlot's own list has 2.5).
const STEP_INCRS = [1, 2, 5].flatMap((m) => Array.from({ length: 10 }, (_, e) => m * 10 ** e)).sort((a, b) => a - b);
const measurer = document.createElement("canvas").getContext("2d");  // not uPlot's: it caches its font

// The decimals that write x exactly (2.5e-3: 4): neighbouring ticks then never read the same.
function decimalsOf(x) {
  for (let d = 0; d < 12; d++) {
    const scaled = Math.abs(x) * 10 ** d;
    if (scaled >= 0.999 && Math.abs(scaled - Math.round(scaled)) <= 1e-6 * scaled) return d;
  }
  return 12;
}

// Tick labels with as many digits as the ticks' spacing needs: a learning rate near 2e-4 that
// moves by 5e-7 reads 1.995e-4, 2.000e-4 (not 0.0002 twice); a loss reads 4.70, 4.75.
function valueLabels(u, splits, axisIdx, space, incr) {
  const top = Math.max(...splits.map((v) => Math.abs(v || 0)));
  if (!top || !incr) return splits.map((v) => (v === null ? "" : String(v || 0)));
  const exp = Math.floor(Math.log10(top));
  if (exp < -3 || exp >= 6) {
    const digits = Math.min(decimalsOf(incr / 10 ** exp), 8);
    return splits.map((v) => (v === null ? "" : v ? v.toExponential(digits) : "0"));
  }
  const decimals = Math.min(decimalsOf(incr), 8);
  return splits.map((v) => (v === null ? "" : (v || 0).toFixed(decimals)));
}

function stepLabels(u, splits) { return splits.map((v) => (Number.isInteger(v) ? String(v) : "")); }

// The width an axis needs for its widest label, so that none is cut at the card's edge.
function labelRoom(u, values, axisIdx) {
  const axis = u.axes[axisIdx];
  measurer.font = axis.font[0];  // uPlot's tick font, at the screen's pixel ratio
  const widest = Math.max(0, ...(values || []).map((v) => measurer.measureText(String(v ?? "")).width));
  return Math.ceil(widest / uPlot.pxRatio + axis.ticks.size + axis.gap + 4);
}

// The width inside a card (its padding off): a chart fills it, and follows it when it resizes.
function innerWidth(box) {
  const style = getComputedStyle(box);
  return Math.max(160, Math.floor(box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)));
}

function fitToCard(plot, box, height) {
  new ResizeObserver(() => {
    const width = innerWidth(box);
    if (width !== plot.width) plot.setSize({ width, height });
  }).observe(box);
}

function number(v) { return typeof v === "number" ? String(+v.toPrecision(4)) : "-"; }

// A metric by step. `extra`: further series on the same steps, [label, colour] each (the loss
// chart's eval loss). The value readout replaces uPlot's legend, which reads "--" until hovered.
function makeChart(container, title, key, extra = []) {
  const readout = el("span", { class: "readout", "data-readout": key });
  const box = el("div", { class: "chart", "data-metric": key, "data-points": "0" }, el("h3", {}, title, " ", readout));
  container.append(box);
  const colours = ["#2f6fed", ...extra.map(([, colour]) => colour)];
  const labels = [title.toLowerCase(), ...extra.map(([label]) => label)];
  const data = [[], [], ...extra.map(() => [])];
  const show = (u, idx) => {
    const last = data[1].findLastIndex((v) => v !== null && v !== undefined);
    const at = idx ?? (last >= 0 ? last : data[0].length - 1);
    if (at < 0) { readout.replaceChildren(); return; }
    readout.dataset.step = String(data[0][at]);
    readout.replaceChildren(`step ${data[0][at]}`, ...labels.flatMap((label, i) => {
      const value = data[i + 1][at];
      if (value === null || value === undefined) return [];
      return [" · ", el("span", { class: "swatch", style: `background:${colours[i]}` }), `${label} ${number(value)}`];
    }));
  };
  const plot = new uPlot({
    width: innerWidth(box), height: CHART_HEIGHT,
    scales: { x: { time: false } },
    legend: { show: false },
    axes: [{ label: "step", incrs: STEP_INCRS, values: stepLabels },
           { values: valueLabels, size: labelRoom }],
    series: [{ label: "step" }, { label: title, stroke: colours[0], width: 1.5, points: { show: false } },
             ...extra.map(([label, colour]) => ({ label, stroke: colour, width: 1.5, spanGaps: true,
                                                  points: { show: true, size: 5 } }))],
    hooks: { setCursor: [(u) => show(u, u.cursor.idx)] },
  }, data, box);
  fitToCard(plot, box, CHART_HEIGHT);
  const count = (which) => String(data[which].filter((v) => v !== null && v !== undefined).length);
  return {
    add(step, value, which = 1) {
      // Steps may repeat after a resume (the steps since the last checkpoint run again): keep the latest.
      let at = data[0].indexOf(step);
      if (at < 0) {  // a new step, in order: the other series have no value there
        at = data[0].findIndex((s) => s > step);
        if (at < 0) at = data[0].length;
        data[0].splice(at, 0, step);
        for (let i = 1; i < data.length; i++) data[i].splice(at, 0, null);
      }
      data[which][at] = value;
      plot.setData(data);
      show(plot, plot.cursor.idx);
      box.dataset.points = count(1);
      if (which === 1) box.dataset.last = String(step);
      else box.dataset[`points${which}`] = count(which);
    },
  };
}

// The comparison's chart: several series, told apart by a legend of labels only (no values).
function comparisonChart(box, series, data) {
  const plot = new uPlot({
    width: innerWidth(box), height: 300, scales: { x: { time: false } }, legend: { live: false },
    axes: [{ label: "step", incrs: STEP_INCRS, values: stepLabels }, { values: valueLabels, size: labelRoom }],
    series,
  }, data, box);
  fitToCard(plot, box, 300);
  return plot;
}
