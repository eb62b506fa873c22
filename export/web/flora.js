// Flora's browser-side contract for an exported model: the same preprocessing as PyTorch
// evaluation (RGB, antialiased bilinear resize of the shorter side, center crop, (x/255 - mean) / std,
// every size, offset and constant from preprocess.json's geometry) and the same probabilities
// (softmax(logits / temperature)), read from preprocess.json.
//
// The resize follows PIL's / torchvision's antialiased bilinear resampling (triangle filter widened
// by the downscale factor, horizontal pass then vertical, each rounded to 8 bits) so the browser
// feeds the network what PyTorch fed it, not whatever the canvas's smoothing happens to do.

// preprocess.json's geometry (docs/export.md, "Preprocessing, exactly"): the one this file implements,
// read from the spec and checked; an export written before the spec carried it has the same geometry
// in its top-level fields.
export function geometryOf(spec) {
  const g = spec.geometry ?? {
    resize: { shorter_side: spec.resize_shorter, interpolation: 'bilinear', antialias: true },
    crop: { size: spec.image_size, position: 'center' },
    rounding: 'half_up', scale: spec.scale, mean: spec.mean, std: spec.std,
  };
  const expect = (what, found, wanted) => {
    if (found !== wanted) throw new Error(`preprocess.json ${what} is ${JSON.stringify(found)}, this page implements ${JSON.stringify(wanted)}`);
  };
  expect('geometry.resize.interpolation', g.resize.interpolation, 'bilinear');
  expect('geometry.resize.antialias', g.resize.antialias, true);
  expect('geometry.crop.position', g.crop.position, 'center');
  expect('geometry.rounding', g.rounding, 'half_up');
  return { shorter: g.resize.shorter_side, crop: g.crop.size, scale: g.scale, mean: g.mean, std: g.std };
}

const halfUp = (v) => Math.floor(v + 0.5);

// Sizes and offsets as preprocess.json's geometry states them (DALI's, and Flora's loaders'): the
// longer side floor(longer * shorter_side / shorter + 0.5), the crop at floor((resized - size) / 2 + 0.5).
export function cropGeometry(width, height, shorter, crop) {
  const scale = shorter / Math.min(width, height);
  let nh, nw;
  if (height <= width) {
    nh = shorter;
    nw = Math.max(shorter, halfUp(width * scale));
  } else {
    nh = Math.max(shorter, halfUp(height * scale));
    nw = shorter;
  }
  return { nh, nw, top: halfUp((nh - crop) / 2), left: halfUp((nw - crop) / 2) };
}

// PIL's ImagingResample coefficients for the bilinear (triangle) filter, output range [start, start+count).
function coefficients(inSize, outSize, start, count) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filterscale; // triangle filter support 1, widened when downscaling
  const rows = [];
  for (let o = start; o < start + count; o++) {
    const center = (o + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize);
    const w = [];
    let total = 0;
    for (let x = xmin; x < xmax; x++) {
      const t = Math.abs((x - center + 0.5) / filterscale);
      const k = t < 1 ? 1 - t : 0;
      w.push(k);
      total += k;
    }
    rows.push({ xmin, w: w.map((k) => (total ? k / total : 0)) });
  }
  return rows;
}

const clamp8 = (v) => Math.min(255, Math.max(0, Math.round(v)));

// RGBA pixels (width x height) -> Float32Array NHWC [crop, crop, 3], normalised.
export function preprocessPixels(rgba, width, height, spec) {
  const { shorter, crop, scale, mean, std } = geometryOf(spec);
  const { nh, nw, top, left } = cropGeometry(width, height, shorter, crop);
  // Horizontal pass: every input row, only the output columns inside the crop.
  const hc = coefficients(width, nw, left, crop);
  const mid = new Uint8ClampedArray(height * crop * 3);
  for (let y = 0; y < height; y++) {
    for (let i = 0; i < crop; i++) {
      const { xmin, w } = hc[i];
      let r = 0, g = 0, b = 0;
      for (let k = 0; k < w.length; k++) {
        const p = (y * width + xmin + k) * 4;
        r += rgba[p] * w[k];
        g += rgba[p + 1] * w[k];
        b += rgba[p + 2] * w[k];
      }
      const q = (y * crop + i) * 3;
      mid[q] = clamp8(r);
      mid[q + 1] = clamp8(g);
      mid[q + 2] = clamp8(b);
    }
  }
  // Vertical pass: only the output rows inside the crop; then scale and normalise.
  const vc = coefficients(height, nh, top, crop);
  const out = new Float32Array(crop * crop * 3);
  for (let j = 0; j < crop; j++) {
    const { xmin, w } = vc[j];
    for (let i = 0; i < crop; i++) {
      for (let c = 0; c < 3; c++) {
        let v = 0;
        for (let k = 0; k < w.length; k++) v += mid[((xmin + k) * crop + i) * 3 + c] * w[k];
        out[(j * crop + i) * 3 + c] = (clamp8(v) * scale - mean[c]) / std[c];
      }
    }
  }
  return out;
}

export function softmaxWithTemperature(logits, temperature) {
  const z = Array.from(logits, (v) => v / temperature);
  const m = Math.max(...z);
  const e = z.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

// labels: by class index, {name, training_images} (labels.json; a plain name from an older export).
export function topK(probabilities, labels, k = 5) {
  return probabilities
    .map((p, index) => ({ index, species: labels[index].name, trainingImages: labels[index].training_images, probability: p }))
    .sort((a, b) => b.probability - a.probability)
    .slice(0, k);
}

// TF.js requests every weight shard at once and reads the bodies only when all have answered. Over
// HTTP/1.x a browser keeps 6 connections per host, and an unread body holds its connection: with
// more than 6 shards (a 45 MB model has 11) the load never finishes. Reading each body as soon as it
// arrives frees the connection for the next shard, whatever the server.
export async function bufferedFetch(url, init) {
  const response = await fetch(url, init);
  const body = await response.arrayBuffer();
  return new Response(body, { status: response.status, statusText: response.statusText, headers: response.headers });
}

// Loads model.json, labels.json and preprocess.json from one folder (URL ending in '/').
export async function loadExport(tf, base) {
  const get = async (name) => {
    const r = await fetch(new URL(name, base));
    if (!r.ok) throw new Error(`${name}: HTTP ${r.status}`);
    return r.json();
  };
  const [spec, entries, model] = await Promise.all([
    get('preprocess.json'),
    get('labels.json'),
    tf.loadGraphModel(new URL('model.json', base).href, { fetchFunc: bufferedFetch }),
  ]);
  if (spec.input.layout !== 'NHWC') throw new Error(`expected an NHWC model, preprocess.json says ${spec.input.layout}`);
  geometryOf(spec); // a geometry this page does not implement is refused here, not misapplied
  if (entries.length !== spec.num_classes) throw new Error(`labels.json has ${entries.length} names, the model ${spec.num_classes} classes`);
  const labels = entries.map((l) => (typeof l === 'string' ? { name: l, training_images: null } : l));
  return { spec, labels, model };
}

// Decoded pixels (no colour management, no premultiplication) -> logits, probabilities, top-5.
export async function classify(tf, bundle, rgba, width, height, k = 5) {
  const t0 = performance.now();
  const input = preprocessPixels(rgba, width, height, bundle.spec);
  const t1 = performance.now();
  const size = geometryOf(bundle.spec).crop;
  const y = tf.tidy(() => bundle.model.predict(tf.tensor4d(input, [1, size, size, 3])));
  const logits = await y.data();
  y.dispose();
  const t2 = performance.now();
  const probabilities = softmaxWithTemperature(logits, bundle.spec.temperature);
  return {
    top: topK(probabilities, bundle.labels, k),
    logits: Array.from(logits),
    probabilities,
    input,
    preprocessMs: t1 - t0,
    inferenceMs: t2 - t1,
  };
}
