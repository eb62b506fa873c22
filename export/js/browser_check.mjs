// Drives the demo page in a real headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core: no browser download): open the page, wait for the model, pick each image with
// the file input, wait for the top-5, keep a screenshot of the last one, print one JSON line with
// what the page computed (top-5, logits, the preprocessed input) and any console errors.
//
//   node browser_check.mjs --url http://127.0.0.1:PORT/ --images a.jpg,b.jpg --screenshot out.png
//                          [--chromium /usr/bin/chromium] [--timeout 60000]
import { chromium } from 'playwright-core';

function parseArgs(argv) {
  const args = { chromium: '/usr/bin/chromium', timeout: '60000' };
  for (let i = 0; i < argv.length; i += 2) args[argv[i].replace(/^--/, '')] = argv[i + 1];
  for (const key of ['url', 'images', 'screenshot']) if (!args[key]) throw new Error(`--${key} is required`);
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const timeout = Number(args.timeout);
  const browser = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    // A closed network: no background services, no component updates, no sandbox (root in CI).
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  const consoleErrors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 900, height: 560 } });
    page.on('console', (msg) => msg.type() === 'error' && consoleErrors.push(msg.text()));
    page.on('pageerror', (err) => consoleErrors.push(String(err)));
    const t0 = Date.now();
    await page.goto(args.url);
    await page.waitForSelector('body[data-state="ready"], body[data-state="error"]', { timeout });
    const loadMs = Date.now() - t0;
    const facts = await page.evaluate(() => ({
      state: document.body.dataset.state,
      status: document.getElementById('status').textContent,
      footer: document.getElementById('facts').textContent,
      backend: window.tf.getBackend(),
      runtime: window.flora.runtime,
      tfjs: window.tf.version.tfjs,
    }));
    const results = [];
    if (facts.state === 'ready') {
      for (const image of args.images.split(',')) {
        await page.setInputFiles('#file', image);
        await page.waitForSelector('body[data-state="done"], body[data-state="error"]', { timeout });
        const r = await page.evaluate(() => ({
          state: document.body.dataset.state,
          status: document.getElementById('status').textContent,
          shown: [...document.querySelectorAll('#top5 li')].map((li) => li.textContent),
          error: window.flora.error,
          result: window.flora.lastResult,
        }));
        results.push({ image, ...r });
        if (r.state !== 'done') break;
        await page.evaluate(() => { document.body.dataset.state = 'ready'; });
      }
      await page.screenshot({ path: args.screenshot, fullPage: true });
    }
    console.log(JSON.stringify({ ...facts, load_ms: loadMs, results, console_errors: consoleErrors }));
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(`browser_check.mjs: ${err.message}`);
  process.exit(1);
});
