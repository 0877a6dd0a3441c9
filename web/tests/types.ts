// The declarations of web/js/paychan.d.ts and qr.d.ts, used as docs/BROWSER.md uses the API.
// Compiled by `npx tsc -p tsconfig.json` in web/ (.ci/run), never run. Each
// `@ts-expect-error` line must fail to compile, so the check cannot pass by accepting
// anything. The last part checks the declarations against the code of paychan.js and qr.js.

import {
  connect, load, indexedDbStore, memoryStore, PaychanClient, PaychanError, Session, TERMS_PATH,
  type ChannelInfo, type CloseResult, type ConnectOptions, type DepositCoin, type FundingOutput,
  type Network, type PaychanStore, type Problem, type RefundFile, type SpendingPolicy,
} from '../js/paychan.js';
import { qrMatrix, qrSvg, type QrMatrix } from '../js/qr.js';
// For the last part: the declarations as namespaces, and the code itself.
import type * as declared from '../js/paychan.js';
import type * as declaredQr from '../js/qr.js';
import * as code from 'code/paychan.js';
import * as codeQr from 'code/qr.js';

// --- Connecting ---------------------------------------------------------------------------

const policy: SpendingPolicy = {
  maxChannelValueSat: 20_000,
  maxPerRequestMsat: 10_000,
  maxTotalSat: 1_000_000,
  maxPrepaidSat: 1_000,
  maxLifetimeBlocks: 4_320,
  maxFeeRateSatPerVb: 100,
  maxLockedSat: 1_000_000,
  requireReceipts: true,
};

const client: PaychanClient = await connect('https://api.example.com', {
  network: 'main',
  chain: 'https://blockstream.info/api',
  policy: { maxChannelValueSat: 20_000 },
  store: indexedDbStore('paychan'),
  lifetimeBlocks: 1008,
});

// Every option, with settings kept in a variable (typed, so `network` stays a Network).
const settings: ConnectOptions = {
  network: 'regtest',
  chain: '/chain',
  trustServerChainView: true,
  policy,
  store: memoryStore(),
  lifetimeBlocks: 144,
  fetch: (input, init) => fetch(input, init),
  wasmUrl: new URL('/pkg/paychan_web_bg.wasm', 'https://example.com'),
};
const test = await connect('http://127.0.0.1:3000', settings);
await load();
await load('/pkg/paychan_web_bg.wasm');

// A store of one's own: anything with get, put and keys.
const kept = new Map<string, unknown>();
const mine: PaychanStore = {
  get: async (key) => kept.get(key),
  put: async (key, value) => void kept.set(key, value),
  keys: async () => [...kept.keys()],
};
await connect('https://api.example.com', { network: 'signet', chain: 'https://mempool.space/signet/api', store: mine });

// @ts-expect-error network is a name, not a number
await connect('https://api.example.com', { network: 0, chain: 'https://blockstream.info/api' });
// @ts-expect-error network is Bitcoin Core's name: `main`, not `mainnet`
await connect('https://api.example.com', { network: 'mainnet', chain: 'https://blockstream.info/api' });
// @ts-expect-error the chain view is required
await connect('https://api.example.com', { network: 'main' });
// @ts-expect-error no such policy field (it is maxChannelValueSat)
await connect('https://api.example.com', { network: 'main', chain: '/chain', policy: { maxChannelValue: 20_000 } });
// @ts-expect-error requireReceipts is a boolean
const wrongReceipts: SpendingPolicy = { requireReceipts: 'yes' };
// @ts-expect-error a store needs keys()
const noKeys: PaychanStore = { get: async () => undefined, put: async () => undefined };
// @ts-expect-error the client comes from connect()
new PaychanClient('https://api.example.com', settings);

// --- The deposit ------------------------------------------------------------------------

const address: string = client.deposit.address;
const script: string = client.deposit.script;
const uri: string = client.bip21(50_000);
client.bip21();
const coins: DepositCoin[] = await client.waitForDeposit(50_000);
await client.waitForDeposit(50_000, { every: 5_000, signal: AbortSignal.timeout(60_000) });
const held: number = (await client.depositCoins()).reduce((sum, c) => sum + c.value, 0);
const confirmed: boolean = coins.every((c) => c.status.confirmed);
// @ts-expect-error amounts are numbers of satoshis
client.bip21('0.0005');

// --- Paying -----------------------------------------------------------------------------

const res: Response = await client.fetch('/v1/quote');
await client.fetch(new Request('https://api.example.com/v1/order', { method: 'POST', body: '{}' }));
await client.fetch(new URL('/v1/quote', client.origin), { headers: { 'Idempotency-Key': 'k1' } });
const channelId: string = await client.open();
const paying: boolean = await client.hasChannel();
const channels: ChannelInfo[] = await client.channels();
const current = channels.find((c) => c.current);
const counted: number | undefined = current?.countedMsat;
const balance: number | undefined = client.lastBalanceMsat;

// The current channel's wasm session: read, never freed here.
const session: Session | undefined = client.session;
const receipt: string | undefined = session?.latestReceipt;
const receipts: number | undefined = session?.receipts;

try {
  await client.fetch('/v1/quote');
} catch (e) {
  if (e instanceof PaychanError) {
    const status: number | undefined = e.status;
    const problem: Problem | undefined = e.problem;
    const code: string | undefined = problem?.code;
    const message: string = e.message;
  }
}
new PaychanError('no channel to close');
new PaychanError('refused', { status: 402, problem: { code: 'payment-required', detail: 'pay' }, cause: new Error('x') });

// --- Events -----------------------------------------------------------------------------

client.addEventListener('open', (e) => console.log(e.detail.channel, e.detail.valueSat, e.detail.paidSat));
client.addEventListener('payment', (e) => console.log(e.detail.channel, e.detail.paidSat));
client.addEventListener('refused', (e) => console.log(e.detail.reason, e.detail.problem?.code));
const onClose = (e: CustomEvent<CloseResult>) => console.log(e.detail.serverSat, e.detail.clientSat, e.detail.txid);
client.addEventListener('close', onClose, { once: true });
client.removeEventListener('close', onClose);
client.addEventListener('other', (e: Event) => console.log(e.type));
// @ts-expect-error `open` says what was opened, not why anything was refused
client.addEventListener('open', (e) => console.log(e.detail.reason));
// @ts-expect-error a payment's detail has no valueSat
client.addEventListener('payment', (e) => console.log(e.detail.valueSat));

// Funding from the user's own wallet: the wallet makes and signs the PSBT.
const output: FundingOutput = await client.psbtFunding();
const toPay: [string, number, number] = [output.address, output.amountSat, output.feeRateSatPerVb];
declare function wallet(step: 'make' | 'sign', psbt: string): Promise<string>;
const toSign: string = await client.fundWithPsbt(await wallet('make', output.address));
const funded: string = await client.completePsbtFunding(await wallet('sign', toSign));
// @ts-expect-error the PSBT goes in as base64 text
await client.fundWithPsbt(new Uint8Array(0));

// --- Getting the money back -------------------------------------------------------------

const closed: CloseResult = await client.close();
const fair: [string, boolean, string, number, number, number] =
  [closed.channel, closed.onChain, closed.txid, closed.serverSat, closed.clientSat, closed.feeSat];
const file: RefundFile = await client.refundFile();
await client.refundFile(channelId);
const network: Network = file.network;
const later: [string, number, string] = [file.refundTx, file.refundHeight, file.howTo];
const txids: string[] = await client.refund();
// @ts-expect-error close() resolves what the settlement pays, not a refund
closed.refundTx;

// --- The rest ---------------------------------------------------------------------------

const terms: '/.well-known/payment-channel' = TERMS_PATH;
const tip: number = await client.chain.tip();
const json: string = client.policy;

// The deposit's QR code.
const svg: string = qrSvg(uri);
qrSvg(uri, { ecc: 'M', scale: 4, margin: 4, dark: '#000', light: '#fff' });
const matrix: QrMatrix = qrMatrix(uri, { ecc: 'H' });
const dark: boolean = matrix.modules[0][0];
const side: number = matrix.size;
// @ts-expect-error the levels are L, M, Q and H
qrSvg(uri, { ecc: 'X' });
// @ts-expect-error qrSvg's options have no `size`
qrSvg(uri, { size: 200 });

// --- The declarations against the code --------------------------------------------------
// `code/…` is paychan.js and qr.js themselves (tsconfig.json's `paths`), their types inferred
// from their statements and JSDoc; `../js/….js` is the declarations. The names must be the
// same both ways (a method added to paychan.js and not declared fails here), and every type
// the code states must fit the declared one. The code's `any` (parameters without JSDoc)
// fits anything: only the names are checked there.

type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
/** The public members: not `_private`, not EventTarget's. */
type Public<T> = Exclude<keyof T, `_${string}` | keyof EventTarget>;

const sameExports: Same<keyof typeof code, keyof typeof declared> = true;
const sameMembers: Same<Public<code.PaychanClient>, Public<declared.PaychanClient>> = true;
const sameQrExports: Same<keyof typeof codeQr, keyof typeof declaredQr> = true;

// Every export but connect's client (below) is what the code makes.
const exports: Omit<typeof declared, 'connect' | 'PaychanClient'> = code;
const connectTakes: (...args: Parameters<typeof declared.connect>) => Promise<code.PaychanClient> = code.connect;
// The client: `deposit` is set before connect() resolves (the code assigns it after the
// constructor, so its inferred type has `| undefined`).
declare const made: code.PaychanClient;
const members: Omit<declared.PaychanClient, 'deposit'> = made;
const deposit: declared.Deposit = made.deposit!;
const listed: Same<Awaited<ReturnType<code.PaychanClient['channels']>>, ChannelInfo[]> = true;
// qr.js's JSDoc says `ecc: string`; it is the level asked for.
const qrSvgIs: typeof declaredQr.qrSvg = codeQr.qrSvg;
const qrMatrixIs: (text: string, options?: declaredQr.QrMatrixOptions) => Omit<QrMatrix, 'ecc'> & { ecc: string } =
  codeQr.qrMatrix;
