// The types of paychan.js, paychan's browser client. The API and the threat model:
// docs/BROWSER.md. `npx tsc -p tsconfig.json` in web/ checks these declarations against
// paychan.js and compiles web/tests/types.ts, which uses all of them. A public method or
// export added to paychan.js must be declared here: the check fails otherwise.

import type { InitOutput, Session } from '../pkg/paychan_web.js';

/** A funded channel being paid on (the wasm class; `client.session` is the current one). */
export { Session } from '../pkg/paychan_web.js';

/** Where the server publishes its terms. */
export const TERMS_PATH: '/.well-known/payment-channel';

/** Loads the wasm once (from `wasmUrl`, by default next to the bindings). `connect` calls it. */
export function load(wasmUrl?: string | URL): Promise<InitOutput>;

/** A network as the terms name it (Bitcoin Core's `-chain` names). */
export type Network = 'main' | 'test' | 'testnet4' | 'signet' | 'regtest';

/**
 * The spending policy. Every field is optional; the defaults are the Rust
 * `SpendingPolicy::default()`. A field not listed here is refused.
 */
export interface SpendingPolicy {
  /** The value of a channel (the terms' bounds apply too). Default 100 000. */
  maxChannelValueSat?: number;
  /** The highest price the client pays for one request. Default 10 000. */
  maxPerRequestMsat?: number;
  /** Payments and funding fees, over the channels kept for this server. Default 1 000 000. */
  maxTotalSat?: number;
  /** What may be paid ahead of what was served (the loss bound). Default 1 000. */
  maxPrepaidSat?: number;
  /** The longest lock time the client accepts. Default 4 320. */
  maxLifetimeBlocks?: number;
  /** The highest fee rate the server may set (funding, refund, payments). Default 100. */
  maxFeeRateSatPerVb?: number;
  /** The value of the channels whose money is not back yet. Default 1 000 000. */
  maxLockedSat?: number;
  /** A paid answer without a receipt stops the payments. Default false. */
  requireReceipts?: boolean;
  /** The most receipts in a row the server may leave unsigned (it signs in batches). Default 2048; 0 to 3: every one signed. */
  maxUnsignedReceipts?: number;
}

/**
 * Where keys and channels live. `put` must be durable when its promise resolves: the client
 * saves every payment before it leaves the page.
 */
export interface PaychanStore {
  /** The value saved under `key`, or undefined. */
  get(key: string): Promise<unknown>;
  /** Saves `value` (a string, an array of numbers or a plain object) under `key`. */
  put(key: string, value: unknown): Promise<unknown>;
  /** Every key saved (keys that are not strings are skipped). */
  keys(): Promise<unknown[]>;
}

/** Keys and channels in IndexedDB (database `name`, one object store), with strict durability. */
export function indexedDbStore(name?: string): PaychanStore;

/** Keys and channels in memory (tests; everything is lost with the page). */
export function memoryStore(): PaychanStore;

/** The `fetch` the client uses: the browser's by default. */
export type Fetch = (input: RequestInfo | URL, init?: RequestInit) => Promise<Response>;

/** What `connect` takes besides the server's origin. */
export interface ConnectOptions {
  /** The network the page expects. Terms for another network are refused. */
  network: Network;
  /**
   * The chain view's base URL: an Esplora API. Refused on the server's own origin off
   * regtest unless `trustServerChainView` is true.
   */
  chain: string;
  /** Allows a chain view on the server's origin on a real network (it can lie about the tip). */
  trustServerChainView?: boolean;
  /** The spending policy; the Rust client's defaults otherwise. */
  policy?: SpendingPolicy;
  /** Where keys and channels live: `indexedDbStore()` by default. */
  store?: PaychanStore;
  /** The channel lifetime asked for, in blocks (default 1 008, within the terms' bounds). */
  lifetimeBlocks?: number;
  /** The `fetch` to use. */
  fetch?: Fetch;
  /**
   * Whether `fetch` may open a channel by itself on a 402 (default true). The Service Worker
   * passes false unless told `open=yes`.
   */
  open?: boolean;
  /** Where the wasm is (see `load`). */
  wasmUrl?: string | URL;
}

/**
 * Connects to the paying server at `origin` (`https://api.example.com`): loads the wasm,
 * creates the deposit key once per store and loads the current channel. The client pays only
 * for requests to this origin. Rejects with a `PaychanError` when `network` or `chain` is
 * missing, or the chain view is the server's own off regtest.
 */
export function connect(origin: string, options: ConnectOptions): Promise<PaychanClient>;

/** A server's problem document (RFC 9457). `code` is paychan's name for the problem. */
export interface Problem {
  type?: string;
  title?: string;
  status?: number;
  detail?: string;
  code?: string;
  [field: string]: unknown;
}

/** What `PaychanError` takes besides its message. */
export interface PaychanErrorOptions {
  /** The HTTP status that caused it. */
  status?: number;
  /** The server's problem document. */
  problem?: Problem;
  /** The error behind this one. */
  cause?: unknown;
}

/** A failure with the server's problem document (RFC 9457) when there is one. */
export class PaychanError extends Error {
  constructor(message: string, options?: PaychanErrorOptions);
  /** The HTTP status that caused it, when an answer did. */
  readonly status: number | undefined;
  /** The server's problem document, when it sent one. */
  readonly problem: Problem | undefined;
}

/** The deposit: coins sent here fund the channels; change and refunds come back here. */
export interface Deposit {
  /** The P2WPKH address on the client's network. */
  readonly address: string;
  /** Its output script (hex). */
  readonly script: string;
  /** The deposit key's public key (hex). */
  readonly publicKey: string;
}

/** An unspent output of the deposit, as the chain view lists it (Esplora). */
export interface DepositCoin {
  txid: string;
  vout: number;
  /** In satoshis. */
  value: number;
  status: { confirmed: boolean; block_height?: number | null; block_hash?: string; block_time?: number };
}

/** The chain view the client reads the tip and the deposit's coins from (an Esplora API). */
export interface ChainView {
  /** The tip's height. Rejects when the answer is not a height. */
  tip(): Promise<number>;
  /** The unspent outputs of `address`. */
  utxos(address: string): Promise<DepositCoin[]>;
  /** Broadcasts a transaction (hex); resolves its txid. */
  broadcast(hex: string): Promise<string>;
  /** The chain view's document of transaction `txid`, or null when it does not know it. */
  status(txid: string): Promise<Record<string, unknown> | null>;
}

/** One channel kept for the server, as `channels()` lists it. */
export interface ChannelInfo {
  /** The channel's id (`txid:vout`). */
  id: string;
  /** The channel's value. */
  valueSat: number;
  /** What the latest payment pays the server. */
  paidSat: number;
  /** Payments and fees spent with this channel. */
  spentSat: number;
  /** What the client counted served (the loss bound's count), in millisatoshis. */
  countedMsat: number;
  /** The height from which the refund can be mined. */
  refundHeight: number;
  /** No longer paid on (closed, replaced, or refused by the server). */
  retired: boolean;
  /** Its money is back or settled on chain. */
  closed: boolean;
  /** The channel the client pays on. */
  current: boolean;
}

/** A fair close: what the settlement pays, and whether the chain view has it. */
export interface CloseResult {
  /** The channel closed. */
  channel: string;
  /** The chain view took the settlement (or had it). When false the refund is kept. */
  onChain: boolean;
  /** The settlement's txid. */
  txid: string;
  /** What the settlement pays the server. */
  serverSat: number;
  /** What it pays back to the deposit. */
  clientSat: number;
  /** Its fee. */
  feeSat: number;
}

/** A channel's refund, to keep outside the page. */
export interface RefundFile {
  /** The channel's id. */
  channel: string;
  /** The server's origin. */
  server: string;
  /** The client's network. */
  network: Network;
  /** The signed refund (hex). */
  refundTx: string;
  /** The height from which any node accepts it. */
  refundHeight: number;
  /** How to broadcast it, in a sentence. */
  howTo: string;
}

/** The channel's funding output, for the user's wallet to pay (`psbtFunding`). */
export interface FundingOutput {
  /** The channel's address. */
  address: string;
  /** The exact amount to pay to it. */
  amountSat: number;
  /** The lowest fee rate the funding may have. */
  feeRateSatPerVb: number;
}

/** What `waitForDeposit` takes. */
export interface WaitOptions {
  /** Milliseconds between two reads of the chain view (default 2 000). */
  every?: number;
  /** Stops the wait: the promise rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** `open`: a channel was opened and is the one paid on. */
export interface OpenDetail {
  channel: string;
  valueSat: number;
  /** The first payment. */
  paidSat: number;
}

/** `payment`: a top-up on a 402. */
export interface PaymentDetail {
  channel: string;
  /** What the channel now pays the server. */
  paidSat: number;
}

/** `refused`: the policy, the loss bound or a check stopped a payment, or a close or refund failed. */
export interface RefusedDetail {
  channel: string;
  /** Why, in a sentence. */
  reason: string;
  /** The 402's problem document, when a 402 was refused. */
  problem?: Problem;
}

/** `close`: a fair close, as `close()` resolves it. */
export type CloseDetail = CloseResult;

/** The client's events and their `detail`. */
export interface PaychanEventMap {
  open: CustomEvent<OpenDetail>;
  payment: CustomEvent<PaymentDetail>;
  refused: CustomEvent<RefusedDetail>;
  close: CustomEvent<CloseDetail>;
}

/**
 * A client of one paying server, from `connect`. Events (`addEventListener`): `open`,
 * `payment` (a top-up), `refused` (the policy or the loss bound stopped a payment), `close`;
 * `event.detail` says more.
 */
export class PaychanClient extends EventTarget {
  /** Use `connect`: it loads the wasm, the deposit and the current channel. */
  private constructor(origin: string, options: ConnectOptions);

  // --- What the client is ---

  /** The server's origin: the only one paid for. */
  readonly origin: string;
  /** The network the page expects. */
  readonly network: Network;
  /** Where keys and channels live. */
  readonly store: PaychanStore;
  /** The spending policy, as the JSON the wasm takes. */
  readonly policy: string;
  /** The channel lifetime asked for, or undefined for the default. */
  readonly lifetimeBlocks: number | undefined;
  /** Whether `fetch` opens a channel by itself on a 402. */
  readonly mayOpen: boolean;
  /** The chain view. */
  readonly chain: ChainView;
  /** The deposit: coins sent here fund the channels. */
  readonly deposit: Deposit;
  /** The channel paid on, or undefined. The client owns it: read it, do not free it. */
  readonly session: Session | undefined;
  /** The last `Payment-Channel-Balance` a paid answer carried, in millisatoshis. */
  readonly lastBalanceMsat: number | undefined;

  // --- The deposit ---

  /** A BIP21 URI for a deposit of `amountSat` (without an amount when it is not given). */
  bip21(amountSat?: number): string;
  /** The deposit's coins, from the chain view. */
  depositCoins(): Promise<DepositCoin[]>;
  /** Waits until the deposit holds at least `minSat` (polling the chain view); resolves its coins. */
  waitForDeposit(minSat: number, options?: WaitOptions): Promise<DepositCoin[]>;

  // --- Channels and payments ---

  /**
   * Whether there is a channel to pay on (read again from the store: another tab or the
   * Service Worker may have opened or closed one).
   */
  hasChannel(): Promise<boolean>;
  /**
   * Pays the server again after it was caught overcharging or signing a bad receipt (the
   * verdict is kept in the store, for every tab and the Service Worker, until this).
   */
  trustAgain(): Promise<void>;
  /** Opens a channel funded from the deposit (`fetch` does it by itself on a 402); resolves its id. */
  open(): Promise<string>;
  /**
   * `fetch`, paying: requests to the server's origin carry the latest payment; a 402 is
   * answered by a top-up (or a new channel) within the policy and the loss bound, then the
   * request is sent again. Requests elsewhere go out untouched. Paid requests do not follow
   * redirects. A refusal rejects with a `PaychanError`.
   */
  fetch(input: RequestInfo | URL, init?: RequestInit): Promise<Response>;
  /** Every channel kept for this server. */
  channels(): Promise<ChannelInfo[]>;

  // --- Funding from the user's own wallet (a PSBT), in three steps ---

  /**
   * Step 1: checks the terms and gets the server's proposal. The wallet then makes an
   * unsigned PSBT paying exactly `amountSat` to `address`. A new call starts over.
   */
  psbtFunding(): Promise<FundingOutput>;
  /**
   * Step 2: takes the wallet's unsigned PSBT (base64); the server signs the refund, the page
   * verifies and saves it. Resolves the PSBT for the wallet to sign.
   */
  fundWithPsbt(unsignedBase64: string): Promise<string>;
  /**
   * Step 3: takes the wallet's signed and finalized PSBT (base64) of the same transaction and
   * hands the funding to the server. Resolves the channel's id; it is then the one paid on.
   */
  completePsbtFunding(signedBase64: string): Promise<string>;

  // --- Getting the money back ---

  /**
   * Closes the current channel cooperatively and fairly: the server gets what it reports
   * spent (rounded up), the prepaid rest comes back. The client broadcasts the settlement
   * through the chain view.
   */
  close(): Promise<CloseResult>;
  /** The refund of channel `id` (the current one by default), to keep outside the page. */
  refundFile(id?: string): Promise<RefundFile>;
  /**
   * Broadcasts, through the chain view, the refund of every channel whose lock time has
   * passed and that is not closed. Resolves the txids broadcast.
   */
  refund(): Promise<string[]>;

  // --- Events ---

  /** Listens to `open`, `payment`, `refused` or `close`, with their `detail` typed. */
  addEventListener<K extends keyof PaychanEventMap>(
    type: K,
    listener: (this: PaychanClient, event: PaychanEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  /** Stops listening. */
  removeEventListener<K extends keyof PaychanEventMap>(
    type: K,
    listener: (this: PaychanClient, event: PaychanEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}
