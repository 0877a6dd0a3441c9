// paychan's Service Worker: pays, transparently, for the requests the browser makes by itself
// under the worker's scope — an <audio> or <video> element's range requests, images, HLS
// segments — with the page's channel (one store, one lock: see paychan.js).
//
// Register it as a module worker, with its settings in the URL:
//
//   navigator.serviceWorker.register('/paychan-sw.js?' + new URLSearchParams({
//     network: 'main', chain: 'https://blockstream.info/api', paid: '/media/',
//     policy: JSON.stringify({ maxChannelValueSat: 20000 }) }), { type: 'module', scope: '/' });
//
// `paid` is a comma-separated list of path prefixes on the worker's origin: requests under them
// carry the payment; everything else goes to the network untouched. The worker never opens a
// channel by itself unless `open=yes`: by default the page opens it (a user gesture, a visible
// deposit), and the worker pays on it.
//
// An idle worker is stopped without notice: every payment is in IndexedDB before it leaves,
// and the next request loads the channel again.

import { connect } from './paychan.js';

const settings = new URL(self.location.href).searchParams;
const prefixes = (settings.get('paid') ?? '').split(',').filter(Boolean);
const mayOpen = settings.get('open') === 'yes';
const options = {
  network: settings.get('network'),
  chain: new URL(settings.get('chain') ?? '/chain', self.location.origin).href,
  policy: JSON.parse(settings.get('policy') ?? '{}'),
  // Not even when the server forgets the channel (a 402 `unknown-channel`): the page opens.
  open: mayOpen,
};
/** Why the worker last refused to pay (for the page's status). */
let lastRefusal;

let client;
function paying() {
  client ??= connect(self.location.origin, options).then((c) => {
    c.addEventListener('refused', (e) => { lastRefusal = e.detail.reason; });
    return c;
  }).catch((e) => {
    client = undefined;
    throw e;
  });
  return client;
}

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  if (url.origin !== self.location.origin || !prefixes.some((p) => url.pathname.startsWith(p))) return;
  event.respondWith(pay(event.request));
});

async function pay(request) {
  const c = await paying();
  // Without a channel and not allowed to open one: let the 402 through to the element. (A
  // channel in memory is checked when a 402 comes; a lock per request would slow a media
  // element's burst of range requests.)
  const current = c.session && !c.session.retired;
  if (!mayOpen && !current && !(await c.hasChannel())) return fetch(request);
  return c.fetch(request);
}

// The page asks what the worker paid (the demo shows it).
self.addEventListener('message', async (event) => {
  if (event.data?.type !== 'paychan-status') return;
  const c = await paying();
  await c.hasChannel();
  const s = c.session;
  event.source?.postMessage({ type: 'paychan-status', channel: s?.id, paidSat: s?.paidSat, countedMsat: s?.countedMsat,
    balanceMsat: c.lastBalanceMsat, lastRefusal });
});
