// The screenshots in docs/ (run by hand against the demo on the simulated chain, not in CI):
//
//   cargo run --example browser &          # http://127.0.0.1:3000
//   node web/tests/screenshot.mjs http://127.0.0.1:3000
//
// docs/browser-listen.png: /listen after 12 s of paid audio; docs/browser-demo.png: the
// fortune page after ten paid requests on the same channel.

import { inChromium } from './harness.mjs';

const base = process.argv[2] ?? 'http://127.0.0.1:3000';

await inChromium(['--autoplay-policy=no-user-gesture-required'], async (page) => {
  await page.setViewportSize({ width: 900, height: 760 });
  await page.goto(`${base}/listen`, { waitUntil: 'load' });
  await page.waitForSelector('body[data-ready="yes"]', { timeout: 30_000 });
  await page.click('#faucet');
  await page.evaluate(() => window.demo.client.waitForDeposit(150_000, { every: 200 }));
  await page.click('#open');
  await page.waitForFunction(() => document.getElementById('log').textContent.includes('channel open'), null, { timeout: 30_000 });
  await page.evaluate(() => window.demo.listen(0));
  await page.waitForFunction(() => window.demo.player.currentTime >= 12, null, { timeout: 60_000 });
  await page.evaluate(() => window.demo.refresh());
  await page.screenshot({ path: new URL('../../docs/browser-listen.png', import.meta.url).pathname });

  await page.goto(base, { waitUntil: 'load' });
  await page.waitForSelector('body[data-ready="yes"]', { timeout: 30_000 });
  await page.click('#ten');
  await page.waitForFunction(() => document.querySelectorAll('#log li').length >= 1, null, { timeout: 30_000 });
  await page.waitForTimeout(1_500);
  await page.screenshot({ path: new URL('../../docs/browser-demo.png', import.meta.url).pathname, fullPage: true });
  console.log('docs/browser-listen.png, docs/browser-demo.png');
});
