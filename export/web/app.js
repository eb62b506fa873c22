// The demo page: load the export (model.json, labels.json, preprocess.json), let a person pick a
// photo, show the top-5 species with probabilities. Query parameters: ?model=URL-of-export-folder/
// (default: model/) and ?backend=wasm|webgl|cpu (default: wasm).
// For automated checks the page sets <body data-state="ready|busy|done|error"> and window.flora.
import { classify, loadExport } from './flora.js';

const tf = window.tf;
const params = new URLSearchParams(location.search);
const base = new URL(params.get('model') || 'model/', location.href);
const $ = (id) => document.getElementById(id);

window.flora = { bundle: null, lastResult: null, error: null };

function setState(state, message) {
  document.body.dataset.state = state;
  if (message !== undefined) $('status').textContent = message;
}

async function decode(file) {
  // Raw decoded pixels: no colour-space conversion, no premultiplied alpha (as PIL decodes them).
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const { data } = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
  return { rgba: data, width: bitmap.width, height: bitmap.height };
}

function show(result) {
  const list = $('top5');
  list.replaceChildren(
    ...result.top.map(({ species, trainingImages, probability }) => {
      const li = document.createElement('li');
      const name = document.createElement('span');
      name.className = 'species';
      name.textContent = species;
      if (trainingImages !== null && trainingImages !== undefined) {
        // How much the model saw of this species: a rare one is flagged (preprocess.json's few_shot_below).
        const seen = document.createElement('small');
        const rare = trainingImages < (window.flora.bundle.spec.few_shot_below ?? 20);
        seen.className = rare ? 'seen rare' : 'seen';
        seen.textContent = ` ${trainingImages} training photo${trainingImages === 1 ? '' : 's'}${rare ? ' · rare species' : ''}`;
        name.append(seen);
      }
      const bar = document.createElement('span');
      bar.className = 'bar';
      bar.style.setProperty('--p', probability.toFixed(4));
      const pct = document.createElement('span');
      pct.className = 'pct';
      pct.textContent = `${(probability * 100).toFixed(1)}%`;
      li.append(name, bar, pct);
      return li;
    }),
  );
}

async function onFile(file) {
  setState('busy', `Classifying ${file.name}…`);
  try {
    $('preview').src = URL.createObjectURL(file);
    $('preview').hidden = false;
    $('caption').textContent = file.name;
    const { rgba, width, height } = await decode(file);
    const result = await classify(tf, window.flora.bundle, rgba, width, height, 5);
    window.flora.lastResult = { ...result, input: Array.from(result.input), file: file.name, width, height };
    show(result);
    setState('done', `${result.top[0].species}: ${(result.top[0].probability * 100).toFixed(1)}% ` +
      `(preprocess ${result.preprocessMs.toFixed(1)} ms, inference ${result.inferenceMs.toFixed(1)} ms)`);
  } catch (err) {
    window.flora.error = String(err);
    setState('error', `Could not classify ${file.name}: ${err.message}`);
  }
}

async function main() {
  try {
    const backend = params.get('backend') || 'wasm';
    if (backend === 'wasm') tf.wasm.setWasmPaths(new URL('vendor/tfjs-backend-wasm/', location.href).href);
    if (!(await tf.setBackend(backend))) throw new Error(`backend ${backend} is not available`);
    await tf.ready();
    const bundle = await loadExport(tf, base);
    const size = bundle.spec.image_size;
    tf.tidy(() => bundle.model.predict(tf.zeros([1, size, size, 3]))).dispose(); // warm-up
    window.flora.bundle = bundle;
    const threads = tf.getBackend() === 'wasm' ? tf.wasm.getThreadsCount() : 1;
    window.flora.runtime = { backend: tf.getBackend(), threads, crossOriginIsolated: window.crossOriginIsolated };
    $('facts').textContent = `${bundle.spec.model} · ${bundle.labels.length} species · ${size}×${size} input · ` +
      `TF.js ${tf.version.tfjs} (${tf.getBackend()}, ${threads} thread${threads === 1 ? '' : 's'}) · ` +
      `temperature ${bundle.spec.temperature.toFixed(3)}`;
    $('file').addEventListener('change', (e) => e.target.files[0] && onFile(e.target.files[0]));
    setState('ready', 'Ready: choose a photo of a plant.');
  } catch (err) {
    window.flora.error = String(err);
    setState('error', `The model did not load: ${err.message}`);
  }
}

main();
