// Drives Debian's Chromium (headless, through playwright-core, which never downloads a browser)
// for the console tests: one JSON request a line on stdin, one JSON answer a line on stdout.
// Started by ledger_testkit::console::Browser; see tests/tests/console_e2e.rs.
//
// Requests: {"cmd": "open", "url", "width", "height"} (loads the page; waits for the console to
// be ready unless the answer is not 200), {"cmd": "eval", "js"} (the value of an expression in the
// page), {"cmd": "wait", "js", "timeout_ms"} (until the expression is true: its value and the ms
// waited), {"cmd": "type", "selector", "text"}, {"cmd": "click_node", "key"} (a click on the map
// at that node: the policy panel's text), {"cmd": "screenshot", "path"}, {"cmd": "errors"} (the
// console's errors and the page's uncaught exceptions so far), {"cmd": "close"}.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const readline = require('readline');
const { chromium } = require('playwright-core');

const executablePath = process.env.LEDGER_CHROMIUM || '/usr/bin/chromium';
const ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

async function main() {
  if (!fs.existsSync(executablePath)) {
    throw new Error(`no Chromium at ${executablePath}: apt-get install chromium (or set LEDGER_CHROMIUM)`);
  }
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'ledger-console-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath, headless: true, args: ARGS, viewport: { width: 1600, height: 1000 },
  });
  const page = context.pages()[0] || await context.newPage();
  const errors = [];
  page.on('console', (m) => { if (m.type() === 'error') errors.push('console: ' + m.text()); });
  page.on('pageerror', (e) => errors.push('pageerror: ' + e.message));
  page.on('requestfailed', (r) => {
    // The feed's event stream is cut when the page goes: not an error of the page.
    if (!r.url().includes('/api/feed')) errors.push('requestfailed: ' + r.url() + ' ' + (r.failure() || {}).errorText);
  });

  const handlers = {
    async open(req) {
      if (req.width) await page.setViewportSize({ width: req.width, height: req.height });
      const response = await page.goto(req.url, { waitUntil: 'load' });
      const status = response ? response.status() : 0;
      if (status !== 200) return { status, text: response ? await response.text() : '', url: page.url() };
      await handlers.wait({ js: 'window.__consoleReady === true && window.__feedOpen === true', timeout_ms: 30000 });
      return { status, url: page.url() };
    },
    async eval(req) {
      return { value: await page.evaluate(req.js) };
    },
    async wait(req) {
      // Polled with evaluate (CDP's own evaluation), not waitForFunction, whose string
      // predicates would be an eval the page's Content-Security-Policy forbids.
      const t0 = Date.now();
      const timeout = req.timeout_ms || 10000;
      for (;;) {
        const value = await page.evaluate(req.js);
        if (value) return { value, ms: Date.now() - t0 };
        if (Date.now() - t0 > timeout) throw new Error(`not true within ${timeout} ms: ${req.js}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
    async type(req) {
      await page.fill(req.selector, req.text);
      return {};
    },
    async click_node(req) {
      const at = await page.evaluate((key) => window.__console.nodeScreenPosition(key), req.key);
      if (!at) return { error: 'no node ' + req.key };
      await page.mouse.click(at.x, at.y);
      return { text: await page.textContent('#policy-json') };
    },
    async screenshot(req) {
      await page.screenshot({ path: req.path });
      return {};
    },
    async errors() {
      return { errors: errors.slice() };
    },
    async close() {
      await context.close();
      fs.rmSync(profile, { recursive: true, force: true });
      return {};
    },
  };

  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const req = JSON.parse(line);
    let answer;
    try {
      answer = await handlers[req.cmd](req);
    } catch (e) {
      answer = { error: String(e && e.stack || e) };
    }
    process.stdout.write(JSON.stringify(answer) + '\n');
    if (req.cmd === 'close') break;
  }
  process.exit(0);
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ error: String(e && e.stack || e) }) + '\n');
  process.exit(1);
});
