// Paying for media through the Service Worker, end to end in real headless Chromium: the
// listen page (web/demo/listen.html) plays the demo server's audio through a plain <audio>
// element while web/js/paychan-sw.js pays 1 sat per second fetched.
//
//   node web/tests/listen.mjs <base-url> [--faucet]
//
// As e2e.mjs: one JSON line per step on stdout; tests/browser.rs deposits on the real node
// and answers `deposited` on stdin (with --faucet the page's faucet does it).
//
// Steps: deposit, open the channel from the page, play 10 s, reload mid-stream and play on from
// where it was to 20 s or more on the same channel, check that the server holds the latest
// payment (none lost) and charged one price per second fetched, close fairly.

import { check, hear, inChromium, say } from './harness.mjs';

const base = process.argv[2];
const faucet = process.argv.includes('--faucet');

await inChromium(['--autoplay-policy=no-user-gesture-required'], async (page) => {
  const load = async () => {
    await page.goto(`${base}/listen`, { waitUntil: 'load' });
    await page.waitForSelector('body[data-ready="yes"]', { timeout: 30_000 });
  };
  await load();
  const address = await page.evaluate(() => window.demo.client.deposit.address);
  say('deposit', { address });
  if (faucet) await page.click('#faucet'); else await hear('deposited');
  await page.evaluate(() => window.demo.client.waitForDeposit(150_000, { every: 200 }));
  const channel = await page.evaluate(() => window.demo.client.open());
  say('opened', { channel });

  const playUntil = (seconds) => page.evaluate(async (seconds) => {
    const { player } = window.demo;
    const started = performance.now();
    while (player.currentTime < seconds) {
      if (player.error) throw new Error(`the player failed: ${player.error.message}`);
      if (performance.now() - started > (seconds + 30) * 1000) throw new Error(`stuck at ${player.currentTime} s`);
      await new Promise((r) => setTimeout(r, 250));
    }
    console.error(`played ${player.currentTime} s in ${(performance.now() - started) / 1000} s`);
    return player.currentTime;
  }, seconds);

  await page.evaluate(() => window.demo.listen(0));
  const first = await playUntil(10);
  const before = await page.evaluate(async () => (await window.demo.client.channels()).find((c) => c.current));
  say('played', { seconds: first, channel: before.id, paidSat: before.paidSat });

  // A reload mid-stream: the worker stays, the page comes back, the same channel plays on.
  await load();
  await page.evaluate((at) => window.demo.listen(at), first);
  const total = await playUntil(21);
  await page.evaluate(() => window.demo.player.pause());
  const after = await page.evaluate(async () => (await window.demo.client.channels()).find((c) => c.current));
  check(after.id === channel, `the same channel after the reload (${after.id})`);
  check(after.paidSat >= before.paidSat, 'payments only grow');

  // The server's view of the channel: it holds the latest payment and charged per second.
  const snapshot = await page.evaluate(async (id) => {
    const terms = await (await fetch('/.well-known/payment-channel')).json();
    return (await fetch(terms.endpoints.channel.replace('{id}', id))).json();
  }, channel);
  check(snapshot.paid_msat === after.paidSat * 1000, `the server holds the latest payment: ${snapshot.paid_msat} msat, the page ${after.paidSat} sat`);
  const seconds = snapshot.spent_msat / 1000;
  check(seconds >= total - 1, `at least one paid second per second played: ${seconds} paid for ${total} s`);
  // The loss bound: paid ≤ what was served + one price + maxPrepaidSat (1 000 by default).
  check(after.paidSat <= Math.max(294, seconds) + 1 + 1000, `within the loss bound: paid ${after.paidSat} for ${seconds} s`);
  say('listened', { seconds: total, channel, paidSat: after.paidSat, servedSeconds: seconds });

  const closed = await page.evaluate(() => window.demo.client.close());
  say('closed', closed);
  say('done');
});
