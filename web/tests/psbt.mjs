// Funding from the user's own wallet by PSBT (BIP 174), in real headless Chromium: the demo
// page against the demo server; tests/browser.rs plays the wallet with Bitcoin Core
// (`walletcreatefundedpsbt`, then `walletprocesspsbt`).
//
//   node web/tests/psbt.mjs <base-url>
//
// Steps: load the page (the harness's deposit step is answered as usual, and the deposit is
// not used); psbtFunding() gives the channel's address and amount; the "wallet" answers an
// unsigned PSBT; a PSBT that pays the wrong amount is refused first; fundWithPsbt() has the
// refund signed and saved, and gives the PSBT to sign; the "wallet" signs it; a PSBT of
// another transaction is refused; completePsbtFunding() hands the funding to the server;
// 30 paid requests; a metered SSE stream of 2 500 events with in-band top-ups; a fair close.

import { check, hear, heard, inChromium, say } from './harness.mjs';

const base = process.argv[2];
if (!base) throw new Error('usage: psbt.mjs <base-url>');

await inChromium([], async (page) => {
  await page.goto(base, { waitUntil: 'load' });
  await page.waitForSelector('body[data-ready="yes"]', { timeout: 30_000 });
  const address = await page.evaluate(() => window.demo.client.deposit.address);
  say('deposit', { address });
  await hear('deposited');

  const output = await page.evaluate(() => window.demo.client.psbtFunding());
  check(output.address.startsWith('bcrt1q') && output.address.length === 64, `a regtest P2WSH address, got ${output.address}`);
  check(output.amountSat > 0, 'an amount');
  say('fund-psbt', output);
  // A PSBT from the wallet that pays the channel too little: refused, nothing sent.
  const { psbt: short } = await heard();
  const refused = await page.evaluate((p) => window.demo.client.fundWithPsbt(p).then(() => 'taken', (e) => e.message), short);
  check(refused.includes('exactly once'), `a PSBT that does not pay the channel is refused: ${refused}`);
  say('refused-short', { reason: refused });
  // A PSBT the wallet has signed already: refused before anything is sent (the server would
  // hold a funding whose refund it has not signed).
  const { psbt: early } = await heard();
  const refusedEarly = await page.evaluate((p) => window.demo.client.fundWithPsbt(p).then(() => 'taken', (e) => e.message), early);
  check(refusedEarly.includes('give the unsigned PSBT first'), `a signed PSBT is refused at step 2: ${refusedEarly}`);
  say('refused-signed', { reason: refusedEarly });

  const { psbt: unsigned } = await heard();
  const toSign = await page.evaluate((p) => window.demo.client.fundWithPsbt(p), unsigned);
  // The refund is saved before the wallet signs anything.
  const kept = await page.evaluate(() => window.demo.client.channels());
  check(kept.length === 1 && !kept[0].current, 'the refund is kept before the funding is signed');
  say('sign-psbt', { psbt: toSign });
  const { psbt: other } = await heard();
  const wrong = await page.evaluate((p) => window.demo.client.completePsbtFunding(p).then(() => 'taken', (e) => e.message), other);
  check(wrong.includes("signing changed the transaction's id"), `another transaction is refused: ${wrong}`);
  const { psbt: signed } = await heard();
  const channel = await page.evaluate((p) => window.demo.client.completePsbtFunding(p), signed);
  say('funded', { channel });

  const paid = await page.evaluate(async () => {
    let last;
    for (let i = 0; i < 30; i++) last = await window.demo.fortune();
    const s = window.demo.client.session;
    return { channel: s.id, paidSat: s.paidSat, receipts: s.receipts, last };
  });
  check(paid.channel === channel, 'paid on the PSBT-funded channel');
  check(paid.receipts >= 29, `receipts verified: ${paid.receipts}`);
  say('paid', paid);

  // A metered SSE stream: 2 500 events at 1 sat, far beyond maxPrepaidSat (1 000): the server
  // asks for top-ups in band and holds; the page answers them on the payment endpoint as it
  // reads, takes the payment events out of what the reader gets, and checks the receipt.
  const streamed = await page.evaluate(async () => {
    const client = window.demo.client;
    let payments = 0;
    const refused = [];
    client.addEventListener('payment', () => { payments += 1; });
    client.addEventListener('refused', (e) => refused.push(e.detail.reason));
    const before = { countedMsat: client.session.countedMsat, paidSat: client.session.paidSat };
    const res = await client.fetch('/api/ticker?n=2500');
    const text = await res.text();
    const ticks = text.split('\n').filter((l) => l.startsWith('data: ')).map((l) => JSON.parse(l.slice(6)).tick);
    const s = client.session;
    return { status: res.status, ticks: ticks.length, last: ticks.at(-1), inOrder: ticks.every((t, i) => t === i),
      ours: text.includes('payment-required') || text.includes('payment-receipt'),
      payments, refused, before, countedMsat: s.countedMsat, paidSat: s.paidSat,
      receipt: s.latestReceipt && JSON.parse(s.latestReceipt) };
  });
  check(streamed.status === 200 && streamed.ticks === 2500 && streamed.inOrder, `2 500 events in order: ${streamed.ticks}, last ${streamed.last}`);
  check(!streamed.ours, 'the payment events are taken out of what the reader gets');
  check(streamed.payments >= 2, `top-ups in band while reading: ${streamed.payments}`);
  check(streamed.refused.length === 0, `nothing refused: ${streamed.refused}`);
  // The page counted every event it read, and the price up front.
  check(streamed.countedMsat - streamed.before.countedMsat === 2_501_000, `counted ${streamed.countedMsat - streamed.before.countedMsat} msat`);
  // The stream's receipt: the whole request, price up front and per event.
  check(streamed.receipt?.price_msat === 2_501_000, `the stream's receipt charged ${streamed.receipt?.price_msat}`);
  // The loss bound: what was counted, one price and maxPrepaidSat.
  check(streamed.paidSat <= streamed.countedMsat / 1000 + 1 + 1000, `within the loss bound: ${streamed.paidSat}`);
  say('streamed', streamed);
  const closed = await page.evaluate(() => window.demo.client.close());
  check(closed.channel === channel, 'the close is the channel paid on');
  say('closed', closed);
  say('done');
});
