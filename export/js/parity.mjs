// Runs an exported Flora TF.js graph model in Node on the TF.js runtime itself (wasm backend by
// default, or the pure-JS cpu backend) and writes its logits, for export/parity.py to compare with
// PyTorch. Input: raw little-endian float32 NHWC, already preprocessed by Python exactly as
// evaluation does, so only the network is compared. Also times batch-1 inference.
//
//   node parity.mjs --model DIR --input x.f32 --shape N,H,W,C --out logits.f32
//                   [--backend wasm|cpu] [--batch 16] [--latency-runs 50] [--threads N]
// Prints one JSON line: backend, versions, output shape, latency.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { performance } from 'node:perf_hooks';

import * as tf from '@tensorflow/tfjs';
import { setThreadsCount, setWasmPaths, version_wasm } from '@tensorflow/tfjs-backend-wasm';

function parseArgs(argv) {
  const args = { backend: 'wasm', batch: 16, 'latency-runs': 50, threads: 0, simd: 'auto' };
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) throw new Error(`bad argument ${argv[i]}`);
    args[argv[i].slice(2)] = argv[i + 1];
  }
  for (const key of ['model', 'input', 'shape', 'out']) {
    if (!args[key]) throw new Error(`--${key} is required`);
  }
  return args;
}

// A tf.io handler reading model.json and its weight shards from disk (tfjs-node's file:// is not here).
export function fileModel(dir) {
  return {
    load: async () => {
      const json = JSON.parse(fs.readFileSync(path.join(dir, 'model.json'), 'utf8'));
      const weightSpecs = [];
      const buffers = [];
      for (const group of json.weightsManifest) {
        weightSpecs.push(...group.weights);
        for (const p of group.paths) buffers.push(fs.readFileSync(path.join(dir, p)));
      }
      const all = Buffer.concat(buffers);
      return {
        modelTopology: json.modelTopology,
        format: json.format,
        generatedBy: json.generatedBy,
        convertedBy: json.convertedBy,
        signature: json.signature,
        userDefinedMetadata: json.userDefinedMetadata,
        modelInitializer: json.modelInitializer,
        weightSpecs,
        weightData: all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength),
      };
    },
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.backend === 'wasm') {
    const require = createRequire(import.meta.url);
    const dist = path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm'));
    setWasmPaths(dist + path.sep);
    if (Number(args.threads) > 0) setThreadsCount(Number(args.threads));
    if (args.simd !== 'auto') tf.env().set('WASM_HAS_SIMD_SUPPORT', args.simd === '1');
  }
  if (!(await tf.setBackend(args.backend))) throw new Error(`TF.js backend ${args.backend} did not initialise`);
  await tf.ready();

  const model = await tf.loadGraphModel(fileModel(args.model));
  const shape = args.shape.split(',').map(Number);
  const raw = fs.readFileSync(args.input);
  const x = new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4);
  if (x.length !== shape.reduce((a, b) => a * b, 1)) throw new Error(`input has ${x.length} floats, shape ${shape}`);

  const [n, ...rest] = shape;
  const per = rest.reduce((a, b) => a * b, 1);
  const batch = Number(args.batch);
  const chunks = [];
  let classes = 0;
  for (let i = 0; i < n; i += batch) {
    const m = Math.min(batch, n - i);
    const logits = tf.tidy(() => model.predict(tf.tensor(x.subarray(i * per, (i + m) * per), [m, ...rest], 'float32')));
    classes = logits.shape[1];
    chunks.push(await logits.data());
    logits.dispose();
  }
  const out = new Float32Array(n * classes);
  chunks.reduce((offset, c) => (out.set(c, offset), offset + c.length), 0);
  fs.writeFileSync(args.out, Buffer.from(out.buffer));

  // Batch-1 latency: warm up, then the median of timed runs (data() waits for the result).
  const runs = Number(args['latency-runs']);
  const one = tf.tensor(x.subarray(0, per), [1, ...rest], 'float32');
  const times = [];
  for (let i = 0; i < runs + 5; i++) {
    const t0 = performance.now();
    const y = model.predict(one);
    await y.data();
    y.dispose();
    if (i >= 5) times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  const threads = args.backend === 'wasm' ? tf.backend().wasm?.tfjs?.getThreadsCount?.() ?? null : 1;
  console.log(
    JSON.stringify({
      backend: tf.getBackend(),
      tfjs: tf.version.tfjs,
      tfjs_backend_wasm: version_wasm,
      simd: args.backend === 'wasm' ? await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT') : null,
      multithread: args.backend === 'wasm' ? await tf.env().getAsync('WASM_HAS_MULTITHREAD_SUPPORT') : null,
      threads,
      output_shape: [n, classes],
      latency_ms_median: runs ? times[Math.floor(times.length / 2)] : null,
      latency_ms_p90: runs ? times[Math.floor(times.length * 0.9)] : null,
      latency_runs: runs,
    }),
  );
}

main().catch((err) => {
  console.error(`parity.mjs: ${err.message}`);
  process.exit(1);
});
