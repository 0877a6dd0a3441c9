// The browser client end to end, in real headless Chromium (Debian's, driven by
// playwright-core): the demo page against the demo server (examples/browser/app.rs).
//
//   node web/tests/e2e.mjs <base-url> [--faucet]
//
// It prints one JSON line per step on stdout; tests/browser.rs reads them, acts on the real
// Bitcoin Core node (the deposit, the checks on chain) and answers on stdin. With --faucet
// (the simulated chain) the page's faucet button makes the deposit instead.
//
// Steps: load the page; deposit; pay 100 requests (the first opens the channel); reload and
// pay 20 more on the same channel (no payment lost, none repeated); close fairly; open a
// second channel by paying again; export its refund (for a server that vanishes).

import { check, hear, inChromium, say } from './harness.mjs';

const base = process.argv[2];
const faucet = process.argv.includes('--faucet');
if (!base) throw new Error('usage: e2e.mjs <base-url> [--faucet]');

await inChromium([], async (page) => {
  const load = async () => {
    const started = Date.now();
    await page.goto(base, { waitUntil: 'load' });
    await page.waitForSelector('body[data-ready="yes"]', { timeout: 30_000 });
    return Date.now() - started;
  };
  await load();
  const address = await page.evaluate(() => window.demo.client.deposit.address);
  check(address.startsWith('bcrt1q'), `a regtest P2WPKH deposit address, got ${address}`);
  say('deposit', { address });
  if (faucet) await page.click('#faucet'); else await hear('deposited');
  await page.evaluate(() => window.demo.client.waitForDeposit(150_000, { every: 200 }));

  // 100 paid requests: the first opens the channel; the rest top up on 402.
  const first = await page.evaluate(async () => {
    const times = [];
    let last;
    for (let i = 0; i < 100; i++) {
      const t = performance.now();
      last = await window.demo.fortune();
      times.push(performance.now() - t);
    }
    const s = window.demo.client.session;
    return { times, last, channel: s.id, paidSat: s.paidSat, countedMsat: s.countedMsat, valueSat: s.valueSat };
  });
  check(first.countedMsat === 500_000, `100 requests counted at 5 sat, got ${first.countedMsat} msat`);
  // The loss bound: what was counted, one price and max_prepaid (1 000 sat by default).
  check(first.paidSat >= 500 && first.paidSat <= 500 + 5 + 1_000, `paid within the loss bound: ${first.paidSat}`);
  const sorted = [...first.times].slice(1).sort((a, b) => a - b);
  say('paid', { channel: first.channel, paidSat: first.paidSat, balanceMsat: first.last.balance_msat,
    openMs: Math.round(first.times[0]), medianMs: sorted[sorted.length >> 1] });

  // A reload: the channel and its latest payment come back from IndexedDB.
  const loadMs = await load();
  const after = await page.evaluate(async () => {
    const s = window.demo.client.session;
    const before = { channel: s?.id, paidSat: s?.paidSat };
    const t = performance.now();
    const res = await window.demo.client.fetch('/api/fortune');
    const firstFetchMs = performance.now() - t;
    let last = await res.json();
    for (let i = 0; i < 19; i++) last = await window.demo.fortune();
    return { before, firstFetchMs, status: res.status, last, channel: window.demo.client.session.id,
      paidSat: window.demo.client.session.paidSat };
  });
  check(after.before.channel === first.channel, 'the same channel after the reload');
  check(after.before.paidSat === first.paidSat, 'the latest payment kept across the reload');
  check(after.status === 200 && after.channel === first.channel, 'paid on the same channel after the reload');
  say('reloaded', { channel: after.channel, paidSat: after.paidSat, loadMs, firstFetchMs: Math.round(after.firstFetchMs),
    balanceMsat: after.last.balance_msat });

  // The fair close: the prepaid rest comes back.
  const closed = await page.evaluate(() => window.demo.client.close());
  check(closed.channel === first.channel, 'the close is the channel paid on');
  say('closed', closed);
  if (!faucet) await hear('close-seen');

  // A second channel, then its refund exported as a file.
  const second = await page.evaluate(async () => {
    for (let i = 0; i < 5; i++) await window.demo.fortune();
    const client = window.demo.client;
    return { channel: client.session.id, refund: await client.refundFile(), channels: await client.channels() };
  });
  check(second.channel !== first.channel, 'a new channel after the close');
  check(second.channels.length === 2, `two channels kept, got ${second.channels.length}`);
  say('refund', { channel: second.channel, refundTx: second.refund.refundTx, refundHeight: second.refund.refundHeight });

  // What one new payment costs to sign in the page: a copy of the saved channel, loaded into a
  // Session of its own (never saved, never sent), pays 1 sat more ahead 200 times.
  const bench = await page.evaluate(async () => {
    const client = window.demo.client;
    const { Session } = await import('/pkg/paychan_web.js');
    const saved = await client.store.get(`channel/${client.origin}/${client.session.id}`);
    const copy = Session.load(saved, '{}');
    const times = [];
    for (let i = 0; i < 200; i++) {
      const t = performance.now();
      copy.topUpAhead(1);
      times.push(performance.now() - t);
    }
    const paid = copy.paidSat;
    copy.free();
    times.sort((a, b) => a - b);
    return { signMedianMs: times[100], signP90Ms: times[180], paid };
  });
  check(bench.paid > 0, 'the copy signed payments');
  say('bench', bench);
  say('done');
});
