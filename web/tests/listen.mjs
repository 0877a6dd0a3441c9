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
// payment (none lost) and charged one price per second fetched, and that the worker counted
// what the server charged within one second; kill the worker and play 5 s more on the same
// channel; meet a lying media server (tests/browser.rs adds it) and stop at the loss bound;
// close fairly.

import { check, hear, inChromium, say } from './harness.mjs';

const base = process.argv[2];
/** What the demo charges a second of audio, in msat (examples/browser/app.rs: CHUNK, two
 * seconds, 10 sat), and what one request (a unit) costs. */
const SECOND_MSAT = 5_000;
const UNIT_MSAT = 10_000;
/** The listen page's maxPrepaidSat (web/demo/listen.html). */
const PREPAID_SAT = 50;
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
  // What the worker counted and what the server charged, side by side.
  const accounts = async () => page.evaluate(async (id) => {
    const terms = await (await fetch('/.well-known/payment-channel')).json();
    const snapshot = await (await fetch(terms.endpoints.channel.replace('{id}', id))).json();
    return { counted: (await window.demo.status()).countedMsat, charged: snapshot.spent_msat };
  }, channel);
  const early = await accounts();
  say('played', { seconds: first, channel: before.id, paidSat: before.paidSat });

  // A reload mid-stream: the worker stays, the page comes back, the same channel plays on.
  const reloadedAt = Date.now();
  await load();
  await page.evaluate((at) => window.demo.listen(at), first);
  const resumeMs = Date.now() - reloadedAt;
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
  const seconds = snapshot.spent_msat / SECOND_MSAT;
  check(seconds >= total - 1, `at least one paid second per second played: ${seconds} paid for ${total} s`);
  // The loss bound: paid ≤ what was served + one price + maxPrepaidSat.
  check(after.paidSat <= Math.max(294, snapshot.spent_msat / 1000) + UNIT_MSAT / 1000 + PREPAID_SAT, `within the loss bound: paid ${after.paidSat} for ${seconds} s`);
  // The worker's own count of the seconds it paid for since 10 s, against what the server
  // charged meanwhile: within one unit. (Its count is not the server's from the start: it
  // loaded the channel the page opened, whose first payment it takes as mostly served,
  // `LossBound::restore`.)
  const worker = await page.evaluate(() => window.demo.status());
  check(worker.channel === channel, 'the worker pays on the page\'s channel');
  const late = await accounts();
  const [counted, charged] = [late.counted - early.counted, late.charged - early.charged];
  check(Math.abs(counted - charged) <= UNIT_MSAT, `the worker counted ${counted} msat, the server charged ${charged}`);
  const stalls = await page.evaluate(() => window.demo.stalls);
  say('listened', { seconds: total, channel, paidSat: after.paidSat, servedSeconds: seconds,
    workerCountedMsat: counted, serverChargedMsat: charged, resumeMs, stalls: stalls.length, longestStallMs: Math.round(Math.max(0, ...stalls)) });

  // The worker killed mid-stream (as the browser does to an idle one, without notice): the
  // next request starts it again, and it goes on with the channel from IndexedDB.
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('ServiceWorker.enable');
  await cdp.send('ServiceWorker.stopAllWorkers');
  const killedAt = Date.now();
  // Played until the restarted worker has paid (a top-up), 60 s at most: what was prepaid
  // before the kill lasts ~30 s of play here (the server answers at twice real time), and
  // less or more depending on how far ahead the element had read when the worker died.
  const resumedAt = await page.evaluate(async (paidSat) => {
    const { player } = window.demo;
    await player.play();
    const until = player.currentTime + 60;
    while ((await window.demo.status()).paidSat <= paidSat && player.currentTime < until && !player.ended) {
      if (player.error) throw new Error(`the player failed: ${player.error.message}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    player.pause();
    return player.currentTime;
  }, after.paidSat);
  const resumed = await page.evaluate(async () => (await window.demo.client.channels()).find((c) => c.current));
  check(resumed.id === channel, 'the same channel after the worker was killed');
  const server = await page.evaluate(async (id) => {
    const terms = await (await fetch('/.well-known/payment-channel')).json();
    return (await fetch(terms.endpoints.channel.replace('{id}', id))).json();
  }, channel);
  check(server.paid_msat === resumed.paidSat * 1000, `after the kill the server holds the latest payment: ${server.paid_msat} msat, the page ${resumed.paidSat} sat`);
  check(resumed.paidSat > after.paidSat, `the restarted worker paid on (${after.paidSat} → ${resumed.paidSat} sat)`);
  say('resumed', { seconds: resumedAt, channel, paidSat: resumed.paidSat, afterKillMs: Date.now() - killedAt });

  // A lying media server: it asks for one more second on every request and serves nothing.
  // The worker's top-ups stop at the loss bound (what it counted, a price, maxPrepaidSat).
  const lie = await page.evaluate(async () => {
    const statuses = [];
    for (let i = 0; i < 12; i++) {
      try {
        statuses.push((await fetch('/media/liar.wav', { headers: { Range: 'bytes=0-' } })).status);
      } catch {
        statuses.push('refused');
      }
    }
    return { statuses, worker: await window.demo.status() };
  });
  // The bound from what the real server charged (served), not from the worker's own count: a
  // reload or restart may add one price to the count (`LossBound::restore`); the liar quotes 1
  // sat.
  const served = await accounts();
  const bound = Math.max(294, Math.ceil(served.charged / 1000)) + UNIT_MSAT / 1000 + 1 + PREPAID_SAT;
  check(lie.worker.paidSat <= bound, `the liar got ${lie.worker.paidSat} sat: bound ${bound}`);
  check(/loss bound/.test(lie.worker.lastRefusal ?? ''), `the worker stopped paying the liar at the loss bound: ${lie.worker.lastRefusal}`);
  say('lied-to', { paidSat: lie.worker.paidSat, bound, statuses: lie.statuses, reason: lie.worker.lastRefusal });

  // What the server charged in all, for the close to pay.
  const final = await accounts();
  const closed = await page.evaluate(() => window.demo.client.close());
  say('closed', { ...closed, chargedMsat: final.charged });
  say('done');
});
