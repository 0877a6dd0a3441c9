// paychan's browser client: pays for HTTP requests over a Bitcoin payment channel.
//
//   import { connect } from './paychan.js';
//   const client = await paychan.connect('https://api.example.com', {
//     network: 'main', chain: 'https://blockstream.info/api' });
//   const res = await client.fetch('/v1/quote');
//
// Every rule with money in it (the terms, the proposal, the funding, the refund's signature,
// the payments, the loss bound, the fair close) is the Rust crate's, compiled to wasm
// (`../pkg/paychan_web.js`, built by `web/build.sh`). This file only does the I/O: `fetch`,
// the chain view, IndexedDB, and it saves every signed payment before it leaves the page.
// The API and the threat model: docs/BROWSER.md.

import init, { Opening, Session, depositAddress, depositScript, foreignScheme, publicKey } from '../pkg/paychan_web.js';

export { Session };

/** Where the server publishes its terms. */
export const TERMS_PATH = '/.well-known/payment-channel';
const HEADER = 'Payment-Channel';
const BALANCE = 'Payment-Channel-Balance';
const RECEIPT = 'Payment-Receipt';
const RECEIPT_PREV = 'Payment-Receipt-Prev';
const RECEIPT_UNSIGNED = 'Payment-Receipt-Unsigned';
const REPLAYED = 'Idempotent-Replayed';
const STREAM = 'Payment-Channel-Stream';
/** How often one request is sent at most (first try, after an open, after top-ups). */
const MAX_ATTEMPTS = 4;
/** How many times `/fund` is sent (it is idempotent) before the funding is left in doubt. */
const FUND_TRIES = 3;
/** How many seconds a request waits for a channel's funding to confirm (`channel-pending`). */
const PENDING_TRIES = 120;

/** Runs `fn` under the Web Lock `name` where the browser has Web Locks. */
function withLock(name, fn) {
  const locks = globalThis.navigator?.locks;
  return locks ? locks.request(name, fn) : fn();
}

let ready;
/** Loads the wasm once (from `wasmUrl`, by default next to the bindings). */
export function load(wasmUrl) {
  ready ??= init(wasmUrl ? { module_or_path: wasmUrl } : undefined);
  return ready;
}

function withTimeout(promise, ms) {
  let timer;
  const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`no answer in ${ms} ms`)), ms); });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function randomHex(bytes = 32) {
  const buf = new Uint8Array(bytes);
  crypto.getRandomValues(buf);
  return Array.from(buf, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** A failure with the server's problem document (RFC 9457) when there is one. */
export class PaychanError extends Error {
  constructor(message, { status, problem, cause } = {}) {
    super(message, { cause });
    this.name = 'PaychanError';
    this.status = status;
    this.problem = problem;
  }
}

// ---------------------------------------------------------------------------------------
// Stores: where keys and channels live. `put` must be durable when its promise resolves.

/** Keys and channels in IndexedDB (database `name`, one object store). */
export function indexedDbStore(name = 'paychan') {
  const opened = new Promise((resolve, reject) => {
    const request = indexedDB.open(name, 1);
    request.onupgradeneeded = () => request.result.createObjectStore('kv');
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  const run = async (mode, fn) => {
    const db = await opened;
    return new Promise((resolve, reject) => {
      // 'strict' durability: the write is on disk when the transaction completes.
      const tx = db.transaction('kv', mode, { durability: 'strict' });
      const result = fn(tx.objectStore('kv'));
      tx.oncomplete = () => resolve(result.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
    });
  };
  return {
    get: (key) => run('readonly', (kv) => kv.get(key)),
    put: (key, value) => run('readwrite', (kv) => kv.put(value, key)),
    keys: () => run('readonly', (kv) => kv.getAllKeys()),
  };
}

/** Keys and channels in memory (tests; everything is lost with the page). */
export function memoryStore() {
  const map = new Map();
  return {
    get: async (key) => map.get(key),
    put: async (key, value) => void map.set(key, value),
    keys: async () => [...map.keys()],
  };
}

// ---------------------------------------------------------------------------------------
// The chain view: an Esplora-compatible HTTP API (a public Esplora, your own, or the
// paying server's `chain_view`).

function chainView(base, fetchImpl) {
  base = base.replace(/\/$/, '');
  const text = async (path, init) => {
    const res = await fetchImpl(base + path, init);
    const body = await res.text();
    if (!res.ok) throw new PaychanError(`chain view ${path}: ${res.status} ${body}`, { status: res.status });
    return body;
  };
  return {
    tip: async () => {
      const body = (await text('/blocks/tip/height')).trim();
      const height = /^\d{1,9}$/.test(body) ? Number(body) : NaN;
      // A height, not a time: lock times at or above 500 000 000 are timestamps.
      if (!(height < 500_000_000)) throw new PaychanError(`chain view: the tip ${JSON.stringify(body.slice(0, 40))} is not a height`);
      return height;
    },
    utxos: async (address) => JSON.parse(await text(`/address/${address}/utxo`)),
    broadcast: async (hex) => (await text('/tx', { method: 'POST', body: hex })).trim(),
    // Whether the chain view knows the transaction (mempool or block): `GET /tx/:txid` answers
    // 404 for one it does not (its `/status` answers `{"confirmed":false}` either way).
    status: async (txid) => {
      const res = await fetchImpl(`${base}/tx/${txid}`);
      if (res.status === 404) return null;
      if (!res.ok) throw new PaychanError(`chain view: ${res.status}`, { status: res.status });
      return res.json();
    },
  };
}

/**
 * Connects to the paying server at `origin`.
 *
 * @param {string} origin the server (`https://api.example.com`); the client pays only for
 *   requests to this origin, and the payment header never goes anywhere else.
 * @param {object} options
 * @param {string} options.network the network the page expects: `main`, `test`, `signet`,
 *   `regtest`. Terms for another network are refused.
 * @param {string} options.chain the chain view's base URL (Esplora API).
 * @param {object} [options.store] where keys and channels live (`indexedDbStore()`).
 * @param {object} [options.policy] the spending policy (docs/BROWSER.md); the Rust defaults.
 * @param {number} [options.lifetimeBlocks] the channel lifetime asked for (default 1 008).
 * @param {Function} [options.fetch] the `fetch` to use.
 * @param {boolean} [options.open] whether `fetch` may open a channel by itself on a 402 (default
 *   true; the Service Worker passes false unless told `open=yes`).
 * @returns {Promise<PaychanClient>}
 */
export async function connect(origin, options = {}) {
  await load(options.wasmUrl);
  if (!options.network) throw new PaychanError('connect: options.network is required');
  if (!options.chain) throw new PaychanError('connect: options.chain (an Esplora API URL) is required');
  // The chain view decides the lock time (its tip) and whether money came back: on a real
  // network it must not be the paying server's own word (docs/BROWSER.md).
  const chainOrigin = new URL(options.chain, globalThis.location?.href).origin;
  if (options.network !== 'regtest' && chainOrigin === new URL(origin).origin && !options.trustServerChainView) {
    throw new PaychanError('connect: the chain view is on the paying server\'s origin; on a real network use an independent one (or pass trustServerChainView: true)');
  }
  const client = new PaychanClient(new URL(origin).origin, options);
  await client._init();
  return client;
}

/**
 * A client of one paying server. Events (`addEventListener`): `open`, `payment` (a top-up),
 * `refused` (the policy or the loss bound stopped a payment), `close`; `event.detail` says more.
 */
export class PaychanClient extends EventTarget {
  constructor(origin, options) {
    super();
    this.origin = origin;
    this.network = options.network;
    this.store = options.store ?? indexedDbStore();
    this.policy = JSON.stringify(options.policy ?? {});
    this.lifetimeBlocks = options.lifetimeBlocks;
    this.mayOpen = options.open ?? true;
    this._fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.chain = chainView(options.chain, this._fetch);
    /** @type {Session | undefined} */
    this.session = undefined;
    this._queue = Promise.resolve();
  }

  async _init() {
    // Created once per store, under a lock: two clients created together must not each
    // draw a key (the one written last wins, and the other's address would be lost).
    const wallet = await withLock('paychan wallet', async () => {
      const kept = await this.store.get('wallet');
      if (kept) return kept;
      await this.store.put('wallet', { depositKey: randomHex() });
      return this.store.get('wallet');
    });
    this._depositKey = wallet.depositKey;
    /** The deposit: coins sent here fund the channels; change and refunds come back here. */
    this.deposit = {
      address: depositAddress(wallet.depositKey, this.network),
      script: depositScript(wallet.depositKey),
      publicKey: publicKey(wallet.depositKey),
    };
    await this._sync();
  }

  /**
   * One payment decision at a time: within this client (a promise queue) and, where the
   * browser has Web Locks, across every tab and the Service Worker of the origin (one lock
   * per server). Inside the lock the current channel is read again from the store when another
   * context changed it (paid, opened, closed), so no payment is made twice or lost.
   */
  _lock(fn) {
    const locked = () => withLock(`paychan ${this.origin}`, async () => {
      await this._sync();
      return fn();
    });
    const run = this._queue.then(locked, locked);
    this._queue = run.catch(() => {});
    return run;
  }

  /**
   * Loads the current channel from the store when it differs from the one in memory. What a
   * context counted is kept while nobody else paid; a channel another context paid on is
   * resumed (its payments taken as served, as after a reload).
   */
  async _sync() {
    // A verdict another context (a tab, the Service Worker) reached holds here too, and so
    // does its `trustAgain()`.
    this._distrusted = await this.store.get(`distrusted/${this.origin}`);
    const current = await this.store.get(`current/${this.origin}`);
    if (!current) return;
    const saved = await this.store.get(`channel/${this.origin}/${current}`);
    const latest = (state) => JSON.stringify(JSON.parse(state).channel.latest ?? null);
    if (!saved || (this.session?.id === current && latest(this.session.state()) === latest(saved))) return;
    // Another context paid on the channel this one pays on: go on from its saved count and
    // this one's unsaved units (no floor raised); another channel: load it.
    const same = this.session?.id === current;
    const unsaved = same ? Math.max(0, this.session.countedMsat - (this._savedCount ?? 0)) : 0;
    const next = same ? Session.resync(saved, this.policy, unsaved) : Session.load(saved, this.policy);
    this._savedCount = next.countedMsat - unsaved;
    const others = (await this.channels()).filter((c) => c.id !== current);
    next.spentElsewhereSat = others.reduce((sum, c) => sum + c.spentSat, 0);
    this.session?.free();
    this.session = next;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /**
   * The server is paid no more (it overcharged, or signed a receipt that does not verify or
   * add up): kept in the store, so a reload, a new channel, another tab and the Service
   * Worker honour it too, until `trustAgain()`.
   */
  async _distrust(reason, channel) {
    this._distrusted = reason;
    this._emit('refused', { channel, reason });
    await this.store.put(`distrusted/${this.origin}`, reason).catch(() => {});
  }

  /** Throws when the server is not to be paid (see `_distrust`). */
  async _checkTrusted() {
    this._distrusted = await this.store.get(`distrusted/${this.origin}`).catch(() => this._distrusted);
    if (this._distrusted) throw new PaychanError(`the server is paid no more: ${this._distrusted} (client.trustAgain() to pay it again)`);
  }

  /** Pays the server again after it was caught (see the `refused` event's reason). */
  trustAgain() {
    return this._lock(async () => {
      this._distrusted = undefined;
      await this.store.put(`distrusted/${this.origin}`, null);
      // The session's own charge watch holds the verdict too: a fresh one, from the store.
      if (this.session) {
        const saved = await this.store.get(`channel/${this.origin}/${this.session.id}`);
        if (saved) {
          const spentElsewhere = this.session.spentElsewhereSat;
          this.session.free();
          this.session = Session.load(saved, this.policy);
          this.session.spentElsewhereSat = spentElsewhere;
          this._savedCount = this.session.countedMsat;
        }
      }
    });
  }

  /**
   * Saves `session`. When the store fails, the session in memory goes back to what the store
   * holds: a payment the store does not have never leaves the page.
   */
  async _save(session = this.session) {
    const key = `channel/${this.origin}/${session.id}`;
    try {
      const counted = session.countedMsat;
      await this.store.put(key, session.state());
      if (session === this.session) this._savedCount = counted;
    } catch (e) {
      if (session === this.session) {
        const saved = await this.store.get(key).catch(() => undefined);
        const spentElsewhere = this.session.spentElsewhereSat;
        this.session.free();
        this.session = saved ? Session.load(saved, this.policy) : undefined;
        this._savedCount = this.session?.countedMsat;
        if (this.session) this.session.spentElsewhereSat = spentElsewhere;
      }
      throw new PaychanError(`the payment could not be saved, so it was not sent: ${e.message}`, { cause: e });
    }
  }

  /**
   * Whether there is a channel to pay on (read again from the store: another tab or the
   * Service Worker may have opened or closed one).
   */
  async hasChannel() {
    await this._lock(async () => {});
    return Boolean(this.session && !this.session.retired);
  }

  /** A BIP21 URI for a deposit of `amountSat`. */
  bip21(amountSat) {
    const uri = `bitcoin:${this.deposit.address}`;
    return amountSat ? `${uri}?amount=${(amountSat / 1e8).toFixed(8)}` : uri;
  }

  /** The deposit's coins, from the chain view: `[{txid, vout, value, status}]`. */
  depositCoins() {
    return this.chain.utxos(this.deposit.address);
  }

  /** Waits until the deposit holds at least `minSat` (polling the chain view). */
  async waitForDeposit(minSat, { every = 2000, signal } = {}) {
    for (;;) {
      const coins = await this.depositCoins();
      const total = coins.reduce((sum, c) => sum + c.value, 0);
      if (total >= minSat) return coins;
      signal?.throwIfAborted();
      await new Promise((r) => setTimeout(r, every));
    }
  }

  async _json(method, path, body, headers = {}) {
    const url = new URL(path, this.origin);
    if (url.origin !== this.origin) throw new PaychanError(`the terms name an endpoint off the server's origin: ${path}`);
    const res = await this._fetch(url, {
      method,
      headers: { 'content-type': 'application/json', ...headers },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
      redirect: 'error',
    });
    const text = await res.text();
    let doc;
    try { doc = text ? JSON.parse(text) : undefined; } catch { doc = undefined; }
    if (!res.ok) {
      throw new PaychanError(`${method} ${url.pathname}: ${res.status} ${doc?.detail ?? text}`, { status: res.status, problem: doc });
    }
    return doc;
  }

  async _terms() {
    const terms = await this._json('GET', TERMS_PATH);
    this._termsText = JSON.stringify(terms);
    return terms;
  }

  /** Every channel kept for this server. */
  async channels() {
    const prefix = `channel/${this.origin}/`;
    const out = [];
    for (const key of await this.store.keys()) {
      if (typeof key !== 'string' || !key.startsWith(prefix)) continue;
      let session;
      try {
        session = Session.load(await this.store.get(key), this.policy);
      } catch (e) {
        // One record this version cannot read must not stop the others (and their refunds).
        console.warn(`paychan: ${key} is not readable: ${e.message}`);
        continue;
      }
      out.push({
        id: session.id,
        valueSat: session.valueSat,
        paidSat: session.paidSat,
        spentSat: session.spentSat,
        countedMsat: session.countedMsat,
        refundHeight: session.refundHeight,
        retired: session.retired,
        closed: session.closed,
        current: session.id === this.session?.id,
      });
      session.free();
    }
    return out;
  }

  /** Opens a channel funded from the deposit (`fetch` does it by itself on a 402). */
  open() {
    return this._lock(() => this._open());
  }

  async _open() {
    const { opening, endpoints } = await this._begin();
    try {
      const coins = await this.depositCoins();
      const refundRequest = opening.fund(JSON.stringify(coins));
      const session = await this._refunded(opening, endpoints, refundRequest);
      const fund = opening.fundRequest(session);
      return await this._funded(session, endpoints, fund);
    } finally {
      opening.free();
    }
  }

  /**
   * The terms, the tip, the policy's checks and the server's proposal: an `Opening` ready
   * to be funded (free it when done).
   */
  async _begin() {
    await this._checkTrusted();
    const terms = await this._terms();
    const tip = await this.chain.tip();
    const kept = await this.channels();
    const spent = kept.reduce((sum, c) => sum + c.spentSat, 0);
    const locked = kept.filter((c) => !c.closed && tip < c.refundHeight).reduce((sum, c) => sum + c.valueSat, 0);
    const opensKey = `opens/${this.origin}`;
    const opened = (await this.store.get(opensKey)) ?? [];
    const now = Date.now();
    const opening = new Opening(this._termsText, this.policy, this.network, tip, this.lifetimeBlocks,
      randomHex(), this._depositKey, spent, locked, Float64Array.from(opened), now);
    try {
      // Counted before anything is asked of the server (the policy's maxOpens).
      await this.store.put(opensKey, [...opened.filter((t) => now - t < 86_400_000), now]);
      const endpoints = terms.endpoints;
      opening.propose(JSON.stringify(await this._json('POST', endpoints.open, opening.request())));
      return { opening, endpoints };
    } catch (e) {
      opening.free();
      throw e;
    }
  }

  /**
   * Sends the refund request; the server's signature is verified (nothing was signed
   * before), and the refund is saved with the first payment before the funding is signed.
   */
  async _refunded(opening, endpoints, refundRequest) {
    const signed = await this._json('POST', endpoints.refund, refundRequest);
    const session = opening.refundSigned(JSON.stringify(signed), this.origin);
    await this._save(session);
    return session;
  }

  /**
   * Hands the signed funding (`fund`, the body of `POST …/fund`) to the server, saved first,
   * and makes `session` the channel paid on once the server acknowledges it.
   */
  async _funded(session, endpoints, fund) {
    // From here the server may broadcast the funding, whatever it answers.
    await this._save(session);
    let error;
    for (let tries = 1; tries <= FUND_TRIES; tries++) {
      try {
        await this._json('POST', endpoints.fund, fund);
        error = undefined;
        break;
      } catch (e) {
        error = e;
        if (e.status && e.status < 500) break;
        await new Promise((r) => setTimeout(r, 100 * tries));
      }
    }
    if (error) {
      session.retire();
      await this._save(session);
      throw new PaychanError(`the server did not acknowledge the funding; it may still broadcast it (channel ${session.id} kept with its refund)`, { cause: error, status: error.status, problem: error.problem });
    }
    session.funded();
    await this._save(session);
    // The previous channel is no longer paid on (its refund is kept).
    if (this.session && !this.session.retired) {
      this.session.retire();
      await this._save(this.session);
    }
    await this.store.put(`current/${this.origin}`, session.id);
    this.session?.free();
    this.session = session;
    this._savedCount = session.countedMsat;
    this._emit('open', { channel: session.id, valueSat: session.valueSat, paidSat: session.paidSat });
    return session.id;
  }

  /**
   * Funding from the user's own wallet (Sparrow, Bitcoin Core, a hardware wallet), step 1 of
   * 3: checks the terms and gets the server's proposal. Resolves `{address, amountSat,
   * feeRateSatPerVb}`: the wallet makes an **unsigned** PSBT paying exactly `amountSat` to
   * `address` (native SegWit inputs; at least `feeRateSatPerVb`; not signalling replacement if
   * the server should serve before it confirms). A new call starts over.
   */
  psbtFunding() {
    return this._lock(async () => {
      this._psbtOpening?.opening.free();
      this._psbtOpening = undefined;
      const { opening, endpoints } = await this._begin();
      this._psbtOpening = { opening, endpoints };
      return JSON.parse(opening.fundingOutput());
    });
  }

  /**
   * Step 2 of 3: takes the wallet's unsigned PSBT (base64), has the server sign the refund,
   * verifies it and saves it with the first payment. Resolves the PSBT (base64) for the
   * wallet to sign: the same transaction, whose refund the page now holds.
   */
  fundWithPsbt(unsignedBase64) {
    return this._lock(async () => {
      const step = this._psbtOpening;
      if (!step) throw new PaychanError('call psbtFunding() first');
      if (step.session) throw new PaychanError('this PSBT funding already has its refund: completePsbtFunding()');
      const refundRequest = step.opening.fundPsbt(unsignedBase64);
      step.session = await this._refunded(step.opening, step.endpoints, refundRequest);
      return unsignedBase64.trim();
    });
  }

  /**
   * Step 3 of 3: takes the wallet's signed and finalized PSBT (base64) of the same
   * transaction, saves the signed funding, and hands it to the server; the channel is then
   * the one paid on. Resolves the channel's id. (A wallet that broadcast the funding itself
   * is fine: the server takes it from the page too, and the refund is saved either way.)
   */
  completePsbtFunding(signedBase64) {
    return this._lock(async () => {
      const step = this._psbtOpening;
      if (!step?.session) throw new PaychanError('call fundWithPsbt() first');
      const fund = step.opening.fundRequestSigned(step.session, signedBase64);
      try {
        return await this._funded(step.session, step.endpoints, fund);
      } finally {
        step.opening.free();
        this._psbtOpening = undefined;
      }
    });
  }

  /**
   * `fetch`, paying: requests to the server's origin carry the latest payment; a 402 is
   * answered by a top-up (or a new channel) within the policy and the loss bound, then the
   * request is sent again. Requests elsewhere go out untouched. Redirects of paid requests
   * are not followed (`redirect: 'manual'`): the header must not leave the origin.
   */
  async fetch(input, init = {}) {
    const request = new Request(input, init);
    const url = new URL(request.url);
    if (url.origin !== this.origin) return this._fetch(request);
    const method = request.method;
    const path = url.pathname + url.search;
    const body = ['GET', 'HEAD'].includes(method) ? undefined : await request.arrayBuffer();
    let opened = false;
    let pending = 0;
    // A replayed answer to a keyed request charged nothing now (its receipt was checked
    // the first time); believed only for a request that could be one.
    const keyed = ['POST', 'PUT', 'PATCH', 'DELETE'].includes(method) && request.headers.has('Idempotency-Key');
    let waiting;
    for (let attempt = 1; ; attempt++) {
      // Waiting for a pending channel re-sends the same payment: not another request sent.
      const sent = waiting ?? this._send();
      waiting = undefined;
      const headers = new Headers(request.headers);
      headers.delete(RECEIPT_PREV);
      headers.delete(RECEIPT_UNSIGNED);
      if (sent) headers.set(HEADER, sent.header);
      if (sent?.prev) headers.set(RECEIPT_PREV, sent.prev);
      // The server may sign receipts in batches: how many unsigned ones the page holds, and
      // the most it accepts in a row (`maxUnsignedReceipts`).
      if (sent?.unsigned) headers.set(RECEIPT_UNSIGNED, sent.unsigned);
      const response = await this._fetch(url, {
        method, headers, body, redirect: 'manual', signal: init.signal ?? request.signal,
        credentials: request.credentials, cache: request.cache,
      });
      // A channel whose funding waits for its confirmation (409 `channel-pending`): wait.
      if (response.status === 409 && sent && pending < PENDING_TRIES) {
        const problem = await response.clone().json().catch(() => null);
        if (problem?.code === 'channel-pending') {
          pending += 1;
          waiting = sent;
          attempt -= 1; // waiting is not one of the attempts to pay
          await new Promise((r) => setTimeout(r, 1000));
          continue;
        }
      }
      if (response.status !== 402 || attempt >= MAX_ATTEMPTS) {
        if (sent && !(keyed && response.headers.has(REPLAYED))) {
          this._answered(sent, method, path, response);
          await this._countSaved(sent.channel);
        }
        if (sent && response.ok && response.body && response.headers.has(STREAM)) {
          return this._metered(response, sent, method, path);
        }
        return response;
      }
      // A 402 of another scheme (L402, x402, another Payment method) is named, never paid.
      const bodyText = await response.clone().text().catch(() => '');
      const scheme = foreignScheme(response.headers.get('www-authenticate') ?? '', bodyText);
      if (scheme) throw new PaychanError(`this server asks for ${scheme}; paychan pays bitcoin-channel: nothing was paid`, { status: 402 });
      let problem;
      try { problem = await response.clone().json(); } catch { return response; }
      if (problem.code === 'payment-required' && sent) return response; // the header was dropped on the way
      await this._lock(async () => {
        await this._checkTrusted();
        const current = this.session && !this.session.retired ? this.session.header() : undefined;
        if (current !== sent?.header) return; // another request paid meanwhile: retry with it
        let action = { do: 'open' };
        if (this.session && !this.session.retired) {
          try {
            action = JSON.parse(this.session.paymentRequired(method, path, JSON.stringify(problem)));
          } catch (e) {
            this._emit('refused', { channel: this.session.id, reason: e.message, problem });
            throw new PaychanError(e.message, { status: 402, problem, cause: e });
          }
          // Saved before the new payment leaves the page.
          await this._save();
          if (action.do === 'retry') {
            this._emit('payment', { channel: this.session.id, paidSat: this.session.paidSat });
          }
        }
        if (action.do === 'open') {
          await this._checkTrusted();
          if (!this.mayOpen) throw new PaychanError('no channel to pay with, and this client opens none by itself', { status: 402, problem });
          if (opened) throw new PaychanError('the server refused the channel just opened', { status: 402, problem });
          opened = true;
          // The old channel first closes fairly, so its prepaid rest comes back (best effort:
          // a server that forgot it will not; its refund is kept either way).
          if (this.session) {
            await withTimeout(this._closeFair(this.session, { markClosed: false }), 10_000)
              .catch((e) => this._emit('refused', { channel: this.session.id, reason: `fair close before a new channel: ${e.message}` }));
          }
          await this._open();
        }
      });
    }
  }

  /**
   * The payment the next request carries (`{header, prev, unsigned, paidSat, channel}`), or `undefined`
   * without a channel. Throws (and emits `refused`) when the server charged more than the
   * policy allows or signed a receipt that does not verify: it is paid no more.
   */
  _send() {
    if (this._distrusted) throw new PaychanError(`the server is paid no more: ${this._distrusted} (client.trustAgain() to pay it again)`);
    const session = this.session;
    if (!session || session.retired) return undefined;
    let json;
    try {
      json = session.send();
    } catch (e) {
      this._distrust(e.message, session.id);
      throw new PaychanError(e.message, { cause: e });
    }
    if (json === undefined) return undefined;
    return { ...JSON.parse(json), channel: session.id };
  }

  /**
   * Counts an answer to a request that paid with `sent` (on that channel only), and checks
   * its balance and receipt: a server caught overcharging or signing a bad receipt is paid
   * no more (`refused` tells why).
   */
  _answered(sent, method, path, response) {
    const session = this.session;
    if (!session || session.id !== sent.channel) return;
    const balance = response.headers.get(BALANCE) ?? undefined;
    const receipt = response.headers.get(RECEIPT) ?? undefined;
    const why = session.answered(sent.paidSat, sent.prev ?? undefined, method, path, response.status, balance, receipt);
    if (balance !== undefined) this.lastBalanceMsat = Number(balance);
    if (why) this._distrust(why, sent.channel);
  }

  /** The session in memory when it is still channel `id`'s. */
  _on(id) {
    return this.session?.id === id ? this.session : undefined;
  }

  /**
   * Keeps the loss bound's count in the store close to the count in memory. A reload goes on
   * from the saved count (`LossBound::restore`), so units counted but not saved are lost to
   * it; an honest server is stuck once more than `maxPrepaidSat` of them are lost. So: saved
   * within a second (under the lock, after a read of the store), and before the answer goes
   * to the caller once half of `maxPrepaidSat` is unsaved.
   */
  async _countSaved(id) {
    const session = this._on(id);
    if (!session) return;
    const unsaved = session.countedMsat - (this._savedCount ?? 0);
    if (unsaved <= 0) return;
    const save = () => this._lock(async () => {
      if (this._on(id)) await this._save().catch(() => {});
    });
    if (unsaved * 2 >= this._prepaidMsat()) {
      await save();
    } else if (!this._countTimer) {
      this._countTimer = setTimeout(() => {
        this._countTimer = undefined;
        save();
      }, 1000);
    }
  }

  /** The policy's `maxPrepaidSat`, in millisatoshis. */
  _prepaidMsat() {
    return (JSON.parse(this.policy).maxPrepaidSat ?? 1000) * 1000;
  }

  /**
   * A metered stream (`Payment-Channel-Stream`) answering a request that paid with `sent`,
   * paid as it is read, as the Rust `PaidBody` does (the same `MeteredStream` decides): an SSE
   * stream's `payment-required` events are answered with a top-up on the payment endpoint and
   * its closing `payment-receipt` is checked, both taken out of what the reader gets; a byte
   * stream is counted and topped up ahead. A stream's top-ups, one at a time, never add more
   * than what it delivered, the unit held and `maxPrepaidSat`. Returns the response with the
   * paid body; a stream the client does not accept is returned as it is.
   */
  _metered(response, sent, method, path) {
    const client = this;
    const session = this._on(sent.channel);
    const balance = response.headers.get(BALANCE);
    const meter = session?.meter(response.headers.get(STREAM), response.headers.get('content-type') ?? undefined,
      balance === null ? undefined : Number(balance));
    if (!meter) return response;
    const reader = response.body.getReader();
    const state = { addedMsat: 0, inFlight: false, ended: false };
    const topUp = (sign) => {
      state.inFlight = true;
      this._streamTopUp(sent.channel, sign)
        .then((addedSat) => { state.addedMsat += addedSat * 1000; })
        .finally(() => {
          state.inFlight = false;
          if (state.ended) meter.free();
        });
    };
    const act = () => {
      for (const e of JSON.parse(meter.events())) {
        if (e.delivered !== undefined) {
          this._on(sent.channel)?.streamed(e.delivered);
        } else if (e.topUp !== undefined) {
          if (!state.inFlight) topUp((s) => JSON.parse(s.streamTopUp(meter, e.capSat)));
        } else if (e.ahead !== undefined) {
          if (!state.inFlight) {
            topUp((s) => {
              const before = s.paidSat;
              const header = s.topUpAhead(e.ahead);
              return { header, addedSat: s.paidSat - before };
            });
          }
        } else if (e.receipt !== undefined) {
          const why = this._on(sent.channel)?.streamReceipt(sent.paidSat, sent.prev ?? undefined, method, path, e.receipt, e.boundMsat);
          if (why) this._distrust(why, sent.channel);
        }
      }
    };
    const end = (early) => {
      if (state.ended) return;
      state.ended = true;
      const why = this._on(sent.channel)?.streamEnded(early, meter.missingReceipt);
      if (why) this._distrust(why, sent.channel);
      // A top-up on its way still reads the meter's problem: it frees it when done.
      if (!state.inFlight) meter.free();
    };
    if (!meter.isSse) {
      meter.start();
      act();
    }
    const body = new ReadableStream({
      async pull(controller) {
        // Until something passes on to the reader, or the stream ends.
        for (;;) {
          let next;
          try {
            next = await reader.read();
          } catch (e) {
            end(true);
            controller.error(e);
            return;
          }
          // Cancelled meanwhile: the meter is gone.
          if (state.ended) return;
          if (next.done) {
            const rest = meter.finish();
            act();
            end(false);
            if (rest.length) controller.enqueue(rest);
            controller.close();
            return;
          }
          const out = meter.push(next.value, state.addedMsat);
          act();
          await client._countSaved(sent.channel);
          if (state.ended) return;
          if (out.length) {
            controller.enqueue(out);
            return;
          }
        }
      },
      cancel(reason) {
        end(true);
        return reader.cancel(reason);
      },
    });
    return new Response(body, { status: response.status, statusText: response.statusText, headers: response.headers });
  }

  /**
   * One top-up of a metered stream on channel `id`, under the lock: `sign(session)` pays
   * (`{header, addedSat}`), the payment is saved, then handed over on the server's payment
   * endpoint (`POST <prefix>/payment`, which charges nothing; the held stream resumes).
   * Resolves what it added (also when the hand-over failed: the server may hold it), 0 when
   * it was refused (`refused` says why).
   */
  _streamTopUp(id, sign) {
    return this._lock(async () => {
      const session = this._on(id);
      if (!session || session.retired || this._distrusted) return 0;
      let signed;
      try {
        signed = sign(session);
      } catch (e) {
        this._emit('refused', { channel: id, reason: e.message });
        return 0;
      }
      if (!signed.header) return 0;
      if (signed.addedSat > 0) {
        try {
          await this._save();
        } catch (e) {
          this._emit('refused', { channel: id, reason: e.message });
          return 0;
        }
        this._emit('payment', { channel: id, paidSat: session.paidSat });
      }
      // Handed over also when it added nothing: the server may not have the latest payment
      // (an earlier hand-over failed), and the stream waits for it.
      try {
        const terms = await this._terms();
        await this._json('POST', terms.endpoints.payment, undefined, { [HEADER]: signed.header });
      } catch (e) {
        this._emit('refused', { channel: id, reason: `the top-up's hand-over failed: ${e.message}` });
      }
      return signed.addedSat;
    });
  }

  /**
   * Closes the current channel cooperatively and fairly: it signs a payment of what the
   * server reports spent (rounded up), so the prepaid rest comes back, and checks that the
   * settlement is one of its payments. Resolves `{txid, serverSat, clientSat, feeSat}`.
   */
  close() {
    return this._lock(async () => {
      if (!this.session) throw new PaychanError('no channel to close');
      return this._closeFair(this.session, { markClosed: true });
    });
  }

  /**
   * The fair close of `session` (under the lock). The settlement must be one of the client's
   * payments; the client broadcasts it itself through the chain view, and only when the chain
   * view takes it (or has it) is the channel marked closed (with `markClosed`): never on the
   * server's word alone. Otherwise the channel stays retired with its refund.
   */
  async _closeFair(session, { markClosed }) {
    const terms = await this._terms();
    const id = session.id;
    const snapshotPath = terms.endpoints.channel.replace('{id}', id);
    const closePath = terms.endpoints.close.replace('{id}', id);
    const readSpent = async () => (await this._json('GET', snapshotPath)).spent_msat;
    let spent = await readSpent().catch(() => undefined);
    let answer;
    for (let tries = 1; ; tries++) {
      try {
        answer = await this._json('POST', closePath, session.closeRequest(spent), { [HEADER]: session.header() });
        break;
      } catch (e) {
        const code = e.problem?.code ?? '';
        if (spent === undefined || !code.startsWith('payment-')) throw e;
        // Spent more since the read: read again; after a few tries, close at the latest.
        spent = code === 'payment-below-spent' && tries < 3 ? await readSpent() : undefined;
      }
    }
    // The path as the request went (`_json` resolves it against the origin): the receipt's.
    const sentPath = new URL(closePath, this.origin);
    const settlement = JSON.parse(session.checkClose(JSON.stringify(answer), spent, sentPath.pathname + sentPath.search));
    await this._save(session);
    let broadcast;
    try {
      await this.chain.broadcast(answer.close_tx);
      broadcast = true;
    } catch (e) {
      // Already in the mempool or a block is fine; anything else: the server's word only.
      broadcast = (await this.chain.status(settlement.txid).catch(() => null)) !== null;
      if (!broadcast) this._emit('refused', { channel: id, reason: `the settlement is not on chain: ${e.message}; the refund is kept` });
    }
    if (broadcast && markClosed) {
      session.markClosed();
      await this._save(session);
    }
    this._emit('close', { channel: id, onChain: broadcast, ...settlement });
    return { channel: id, onChain: broadcast, ...settlement };
  }

  /**
   * The refund of channel `id` (the current one by default), to keep outside the page: a
   * JSON document with the signed refund and the height from which any node accepts it.
   */
  async refundFile(id = this.session?.id) {
    const saved = await this.store.get(`channel/${this.origin}/${id}`);
    if (!saved) throw new PaychanError(`no channel ${id}`);
    const session = Session.load(saved, this.policy);
    try {
      return {
        channel: session.id,
        server: this.origin,
        network: this.network,
        refundTx: session.refundTx(),
        refundHeight: session.refundHeight,
        howTo: `Once the chain's tip is at height ${session.refundHeight} or more, broadcast refundTx (bitcoin-cli sendrawtransaction <refundTx>, or any explorer's "broadcast transaction" page). It pays the channel's value, less its fee, back to ${this.deposit.address}.`,
      };
    } finally {
      session.free();
    }
  }

  /**
   * Broadcasts, through the chain view, the refund of every channel whose lock time has
   * passed and that is not closed: the money comes back from a server that vanished.
   * Resolves the txids broadcast.
   */
  async refund() {
    const tip = await this.chain.tip();
    const done = [];
    for (const c of await this.channels()) {
      if (c.closed || tip < c.refundHeight) continue;
      const key = `channel/${this.origin}/${c.id}`;
      const session = Session.load(await this.store.get(key), this.policy);
      try {
        done.push(await this.chain.broadcast(session.refundTx()));
        session.markClosed();
        await this.store.put(key, session.state());
      } catch (e) {
        this._emit('refused', { channel: c.id, reason: `refund: ${e.message}` });
      } finally {
        session.free();
      }
    }
    return done;
  }
}
