// What the page scripts (e2e.mjs, listen.mjs) share: one JSON line per step on stdout, the
// answers of tests/browser.rs on stdin, checks, and Debian's Chromium through playwright-core.

import { chromium } from 'playwright-core';
import { execSync } from 'node:child_process';
import { createInterface } from 'node:readline';

export const say = (step, detail = {}) => console.log(JSON.stringify({ step, ...detail }));

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
/** Waits for the line `expected` on stdin. */
export const hear = async (expected) => {
  const { value, done } = await lines.next();
  if (done || value.trim() !== expected) throw new Error(`expected "${expected}" on stdin, got ${done ? 'EOF' : value}`);
};

/** The next line on stdin, as JSON. */
export const heard = async () => {
  const { value, done } = await lines.next();
  if (done) throw new Error('expected a line on stdin, got EOF');
  return JSON.parse(value);
};

export const check = (ok, what) => { if (!ok) throw new Error(`check failed: ${what}`); };

/** Runs `steps(page)` in a new page of headless Chromium, then closes it and stdin. */
export async function inChromium(args, steps) {
  const executablePath = process.env.CHROMIUM ?? execSync('command -v chromium').toString().trim();
  const browser = await chromium.launch({ executablePath, args: ['--no-sandbox', ...args] });
  try {
    const page = await browser.newPage();
    page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
    page.on('console', (m) => { if (m.type() === 'error') console.error(`page console: ${m.text()}`); });
    await steps(page);
  } finally {
    await browser.close();
    process.stdin.destroy(); // the script ends even while stdin stays open
  }
}
