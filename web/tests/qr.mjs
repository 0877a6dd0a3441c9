// web/js/qr.js checked by an independent decoder: every code it draws is rendered to pixels
// and read back with jsQR (a devDependency); the text, the bytes and the version must come
// back. Run from the repository root after `cd web && npm ci`:
//
//   node web/tests/qr.mjs
//
// Cases: BIP21 URIs (the demo's, upper case, mainnet, testnet and regtest addresses, P2WSH and
// P2TR lengths), every error correction level, texts exactly at the byte capacity of versions
// 1 to 10, 14, 20, 25, 30 and 40 (from the specification's table, not from qr.js) and one
// byte over (the next version), a 1000-byte text, UTF-8, too long a text (RangeError),
// determinism, the eight masks forced, the SVG drawn back to pixels; the longest text of
// every version at every level; on every code, the format and version bits against the
// specification's tables; the alignment patterns where Annex E puts them. Prints one line;
// exits 1 on any failure.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { qrMatrix, qrSvg } from '../js/qr.js';

// jsQR 1.4.0 places version 23's fourth alignment pattern at 74 instead of 78 (ISO/IEC
// 18004, Annex E; cozmo/jsQR#251, open): it reads every version-23 code wrong, and only the
// error correction of M, Q and H hides it. The test loads jsQR with that one number fixed.
const jsqrFile = createRequire(import.meta.url).resolve('jsqr');
const jsqrWrong = 'alignmentPatternCenters: [6, 30, 54, 74, 102]';
const jsqrSource = readFileSync(jsqrFile, 'utf8');
const jsqrPatched = jsqrSource.split(jsqrWrong).length === 2;
const jsqrModule = { exports: {} };
new Function('module', 'exports', jsqrSource.replace(jsqrWrong, 'alignmentPatternCenters: [6, 30, 54, 78, 102]'))(
  jsqrModule, jsqrModule.exports);
const jsQR = jsqrModule.exports.default ?? jsqrModule.exports;

const LEVELS = ['L', 'M', 'Q', 'H'];

// Byte-mode capacity (ISO/IEC 18004, table 7) by version: L, M, Q, H.
const CAPACITY = {
  1: [17, 14, 11, 7], 2: [32, 26, 20, 14], 3: [53, 42, 32, 24], 4: [78, 62, 46, 34],
  5: [106, 84, 60, 44], 6: [134, 106, 74, 58], 7: [154, 122, 86, 64], 8: [192, 152, 108, 84],
  9: [230, 180, 130, 98], 10: [271, 213, 151, 119], 14: [458, 362, 258, 194],
  20: [858, 666, 482, 382], 25: [1273, 997, 715, 535], 30: [1732, 1370, 982, 742],
  40: [2953, 2331, 1663, 1273],
};

// The 15 format bits by level and mask (Annex C, table C.1), and the 18 version bits from
// version 7 (Annex D, table D.1). jsQR forgives a few wrong bits in both; these do not.
const FORMAT = {
  L: [0x77c4, 0x72f3, 0x7daa, 0x789d, 0x662f, 0x6318, 0x6c41, 0x6976],
  M: [0x5412, 0x5125, 0x5e7c, 0x5b4b, 0x45f9, 0x40ce, 0x4f97, 0x4aa0],
  Q: [0x355f, 0x3068, 0x3f31, 0x3a06, 0x24b4, 0x2183, 0x2eda, 0x2bed],
  H: [0x1689, 0x13be, 0x1ce7, 0x19d0, 0x0762, 0x0255, 0x0d0c, 0x083b],
};
const VERSION_INFO = [, , , , , , , 0x07c94, 0x085bc, 0x09a99, 0x0a4d3, 0x0bbf6, 0x0c762, 0x0d847,
  0x0e60d, 0x0f928, 0x10b78, 0x1145d, 0x12a17, 0x13532, 0x149a6, 0x15683, 0x168c9, 0x177ec,
  0x18ec4, 0x191e1, 0x1afab, 0x1b08e, 0x1cc1a, 0x1d33f, 0x1ed75, 0x1f250, 0x209d5, 0x216f0,
  0x228ba, 0x2379f, 0x24b0b, 0x2542e, 0x26a64, 0x27541, 0x28c69];

/** Reads modules (x, y) as bits, the first pair the most significant. */
const readBits = (modules, cells) => cells.reduce((bits, [x, y]) => bits * 2 + (modules[y][x] ? 1 : 0), 0);

/** Both copies of the format bits, and from version 7 both copies of the version bits, as
 * the specification places them (bit 14, or 17, first). */
function checkFormatAndVersion(m) {
  const n = m.size;
  const first = [[0, 8], [1, 8], [2, 8], [3, 8], [4, 8], [5, 8], [7, 8], [8, 8], [8, 7],
    [8, 5], [8, 4], [8, 3], [8, 2], [8, 1], [8, 0]];
  const second = [];
  for (let y = n - 1; y >= n - 7; y--) second.push([8, y]);
  for (let x = n - 8; x < n; x++) second.push([x, 8]);
  const want = FORMAT[m.ecc][m.mask];
  check(readBits(m.modules, first) === want, `format bits near the top-left finder (${m.ecc}, mask ${m.mask})`);
  check(readBits(m.modules, second) === want, `format bits of the copy (${m.ecc}, mask ${m.mask})`);
  if (m.version < 7) return;
  const topRight = [];
  const bottomLeft = [];
  for (let i = 17; i >= 0; i--) {
    const a = n - 11 + (i % 3);
    const b = Math.floor(i / 3);
    topRight.push([a, b]);
    bottomLeft.push([b, a]);
  }
  check(readBits(m.modules, topRight) === VERSION_INFO[m.version], `version bits above the top-right finder (${m.version})`);
  check(readBits(m.modules, bottomLeft) === VERSION_INFO[m.version], `version bits left of the bottom-left finder (${m.version})`);
}

let checks = 0;
const failures = [];
const masksChosen = new Map(); // mask → how many codes chose it
const versionsSeen = new Set();
let decodes = 0;

function test(name, fn) {
  try {
    fn();
  } catch (e) {
    failures.push(`${name}: ${e.message}`);
  }
}
function check(ok, what) {
  checks++;
  if (!ok) throw new Error(what);
}

/** The modules as RGBA pixels, `px` pixels a module, with a light quiet zone of `quiet`. */
function raster(modules, px = 3, quiet = 4) {
  const side = (modules.length + 2 * quiet) * px;
  const data = new Uint8ClampedArray(side * side * 4).fill(255);
  modules.forEach((row, y) => row.forEach((dark, x) => {
    if (!dark) return;
    for (let dy = 0; dy < px; dy++) {
      for (let dx = 0; dx < px; dx++) {
        const at = (((y + quiet) * px + dy) * side + (x + quiet) * px + dx) * 4;
        data[at] = data[at + 1] = data[at + 2] = 0;
      }
    }
  }));
  return { data, side };
}

function decode(modules) {
  const { data, side } = raster(modules);
  decodes++;
  return jsQR(data, side, side, { inversionAttempts: 'dontInvert' });
}

const utf8 = (text) => Array.from(new TextEncoder().encode(text));

/** Encodes `text`, checks the matrix's shape, decodes it and compares; returns the matrix. */
function roundTrip(text, options = {}, expectVersion) {
  const m = qrMatrix(text, options);
  check(m.ecc === (options.ecc ?? 'M'), `ecc ${m.ecc}, asked ${options.ecc ?? 'M (default)'}`);
  check(m.size === 17 + 4 * m.version, `size ${m.size} for version ${m.version}`);
  check(m.modules.length === m.size && m.modules.every((r) => r.length === m.size && r.every((b) => typeof b === 'boolean')),
    'modules: size rows of size booleans');
  check(Number.isInteger(m.mask) && m.mask >= 0 && m.mask <= 7, `mask ${m.mask}`);
  check(m.modules[m.size - 8][8] === true, 'the dark module');
  checkFormatAndVersion(m);
  if (expectVersion !== undefined) check(m.version === expectVersion, `version ${m.version}, expected ${expectVersion}`);
  const code = decode(m.modules);
  check(code !== null, `jsQR found no code (version ${m.version}-${m.ecc}, mask ${m.mask})`);
  check(code.data === text, `decoded ${JSON.stringify(code.data.slice(0, 80))}, expected ${JSON.stringify(text.slice(0, 80))}`);
  check(JSON.stringify(code.binaryData) === JSON.stringify(utf8(text)), 'decoded bytes differ from the UTF-8 bytes');
  check(code.version === m.version, `jsQR read version ${code.version}, qr.js says ${m.version}`);
  if (options.mask === undefined) masksChosen.set(m.mask, (masksChosen.get(m.mask) ?? 0) + 1);
  versionsSeen.add(m.version);
  return m;
}

/** A deterministic ASCII text of `n` bytes (URI characters), varied by `seed`. */
function filler(n, seed) {
  const chars = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:/?&=.%-_';
  let s = seed * 2654435761 >>> 0;
  let out = '';
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    out += chars[(s >>> 16) % chars.length];
  }
  return out;
}

// BIP21 URIs: the demo's (regtest P2WPKH, amount and label), upper case, every network and
// address length.
const ADDRESSES = {
  'regtest P2WPKH': 'bcrt1q6rhpng9evdsfnn833a4f4vej0asu6dk5srld6x',
  'regtest P2TR': 'bcrt1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr',
  'mainnet P2WPKH': 'bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4',
  'mainnet P2WSH': 'bc1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qccfmv3',
  'mainnet P2TR': 'bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0',
  'mainnet P2PKH': '1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa',
  'testnet P2WPKH': 'tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx',
  'testnet P2WSH': 'tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7',
};
const uris = [
  'bitcoin:bcrt1q6rhpng9evdsfnn833a4f4vej0asu6dk5srld6x?amount=0.00100000&label=paychan',
  'bitcoin:bcrt1q6rhpng9evdsfnn833a4f4vej0asu6dk5srld6x?amount=0.00200000',
  'bitcoin:BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4',
  'BITCOIN:BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4?amount=0.00050000',
  'bitcoin:1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa?amount=50&label=Satoshi%20Nakamoto&message=Genesis',
];
for (const address of Object.values(ADDRESSES)) {
  uris.push(`bitcoin:${address}`, `bitcoin:${address}?amount=0.00050000&label=paychan`);
}
for (const uri of uris) {
  for (const ecc of LEVELS) test(`${uri} at ${ecc}`, () => roundTrip(uri, { ecc }));
}
test('the default level is M', () => roundTrip(uris[0]));

// At exactly a version's capacity, that version; one byte more, a bigger one (the next one
// where the table has it).
const versions = Object.keys(CAPACITY).map(Number);
for (const v of versions) {
  LEVELS.forEach((ecc, l) => {
    const cap = CAPACITY[v][l];
    test(`${cap} bytes at ${ecc} is version ${v}`, () => roundTrip(filler(cap, v * 4 + l), { ecc }, v));
    if (v === 40) return;
    test(`${cap + 1} bytes at ${ecc} is past version ${v}`, () => {
      const m = roundTrip(filler(cap + 1, v * 4 + l + 1000), { ecc });
      check(CAPACITY[v + 1] ? m.version === v + 1 : m.version > v, `version ${m.version} after ${v}`);
    });
  });
}

// Every version at every level, full: the longest text qr.js puts in that version (found by
// bisection) must decode, so every block table entry is read back by jsQR's own tables.
// Where the specification's table above has the version, the lengths must agree.
const longest = { L: [], M: [], Q: [], H: [] }; // bytes, by level and version
LEVELS.forEach((ecc, l) => test(`versions 1 to 40 at ${ecc}, full`, () => {
  const versionOf = (n) => { // mask forced: fast; past version 40, 41
    try { return qrMatrix('x'.repeat(n), { ecc, mask: 0 }).version; } catch { return 41; }
  };
  let previous = 0;
  for (let v = 1; v <= 40; v++) {
    let lo = previous + 1; // in version v or beyond
    let hi = previous + 200; // past version v (no version adds 200 bytes)
    check(versionOf(lo) === v, `${lo} bytes at ${ecc} is version ${versionOf(lo)}, not ${v}`);
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (versionOf(mid) === v) lo = mid; else hi = mid;
    }
    if (CAPACITY[v]) check(lo === CAPACITY[v][l], `version ${v}-${ecc} holds ${lo} bytes, the table says ${CAPACITY[v][l]}`);
    roundTrip(filler(lo, 7 * v + l), { ecc }, v);
    longest[ecc][v] = previous = lo;
  }
}));

// The alignment patterns where Annex E puts them (centres on each axis), checked on the
// modules: a dark centre, a light ring, a dark ring; none over the finders.
const ALIGNMENT = {
  1: [], 2: [6, 18], 6: [6, 34], 7: [6, 22, 38], 14: [6, 26, 46, 66], 22: [6, 26, 50, 74, 98],
  23: [6, 30, 54, 78, 102], 24: [6, 28, 54, 80, 106], 32: [6, 34, 60, 86, 112, 138],
  36: [6, 24, 50, 76, 102, 128, 154], 40: [6, 30, 58, 86, 114, 142, 170],
};
for (const [v, centres] of Object.entries(ALIGNMENT)) {
  test(`alignment patterns of version ${v}`, () => {
    check(longest.L[v] !== undefined, `no text known to fill version ${v}`);
    const s = qrMatrix(filler(longest.L[v], Number(v)), { ecc: 'L' });
    check(s.version === Number(v), `the text is version ${s.version}, not ${v}`);
    const last = s.size - 7;
    for (const cy of centres) {
      for (const cx of centres) {
        if ((cx === 6 && cy === 6) || (cx === 6 && cy === last) || (cx === last && cy === 6)) continue;
        for (let dy = -2; dy <= 2; dy++) {
          for (let dx = -2; dx <= 2; dx++) {
            const ring = Math.max(Math.abs(dx), Math.abs(dy));
            check(s.modules[cy + dy][cx + dx] === (ring !== 1), `version ${v}: no alignment pattern at (${cx}, ${cy})`);
          }
        }
      }
    }
  });
}

// A ~1000-byte text at every level (versions 22 to 36).
const longStart = `bitcoin:${ADDRESSES['mainnet P2TR']}?amount=0.00050000&message=`;
const long = longStart + filler(1000 - longStart.length, 7);
test('the long text is 1000 bytes', () => check(utf8(long).length === 1000, `${utf8(long).length} bytes`));
for (const ecc of LEVELS) test(`1000 bytes at ${ecc}`, () => roundTrip(long, { ecc }));

// UTF-8 beyond ASCII: the capacity counts bytes, not characters.
const unicode = 'Zahlung für Kaffee ☕ — 東京の喫茶店 — 🙂 paychan';
for (const ecc of LEVELS) test(`UTF-8 at ${ecc}`, () => roundTrip(unicode, { ecc }));
test('UTF-8 at the capacity of 7-M, in bytes', () => {
  const text = '€'.repeat(40) + 'ab'; // 122 bytes, 42 characters
  check(utf8(text).length === 122, 'the text is 122 bytes');
  roundTrip(text, { ecc: 'M' }, 7);
  roundTrip(text + 'c', { ecc: 'M' }, 8);
});

// Too long for version 40, and bad options.
const throws = (fn, type, pattern) => {
  try {
    fn();
  } catch (e) {
    check(e instanceof type, `threw ${e.constructor.name}, not ${type.name}`);
    check(pattern.test(e.message), `message "${e.message}"`);
    return;
  }
  check(false, `did not throw ${type.name}`);
};
LEVELS.forEach((ecc, l) => test(`${CAPACITY[40][l] + 1} bytes at ${ecc}: RangeError`, () =>
  throws(() => qrMatrix('x'.repeat(CAPACITY[40][l] + 1), { ecc }), RangeError, /do not fit/)));
test('2332 bytes at the default level: RangeError', () => throws(() => qrSvg('x'.repeat(2332)), RangeError, /do not fit/));
test('UTF-8 over the capacity in bytes: RangeError', () =>
  throws(() => qrMatrix('€'.repeat(778)), RangeError, /2334 bytes/));
test('an unknown level: RangeError', () => throws(() => qrMatrix('x', { ecc: 'X' }), RangeError, /ecc/));
test('not a string: TypeError', () => throws(() => qrMatrix(42), TypeError, /string/));

// The same text gives the same code.
test('determinism', () => {
  for (const text of [uris[0], long, unicode]) {
    check(JSON.stringify(qrMatrix(text)) === JSON.stringify(qrMatrix(text)), 'two matrices of one text differ');
    check(qrSvg(text) === qrSvg(text), 'two SVGs of one text differ');
  }
});

// The eight masks, forced (an option for tests), each decodes and each gives another matrix.
for (const [text, version] of [[uris[0], undefined], [filler(CAPACITY[7][1], 99), 7]]) {
  test(`eight masks forced on version ${version ?? 'auto'}`, () => {
    const seen = new Set();
    for (let mask = 0; mask < 8; mask++) {
      const m = roundTrip(text, { ecc: 'M', mask }, version);
      check(m.mask === mask, `mask ${m.mask}, forced ${mask}`);
      seen.add(JSON.stringify(m.modules));
    }
    check(seen.size === 8, `${seen.size} distinct matrices for 8 masks`);
  });
}
test('a bad mask: RangeError', () => throws(() => qrMatrix('x', { mask: 8 }), RangeError, /mask/));

// The SVG: one path, crisp edges, the quiet zone in the view box; drawn back to modules, it
// is the matrix, and jsQR reads it.
test('SVG', () => {
  for (const [text, ecc] of [[uris[0], 'M'], [long, 'H']]) {
    const m = qrMatrix(text, { ecc });
    const svg = qrSvg(text, { ecc, scale: 2, dark: '#123', light: '#fed' });
    const side = m.size + 8;
    check(svg.startsWith('<svg xmlns="http://www.w3.org/2000/svg"') && svg.endsWith('</svg>'), 'an SVG element');
    check(svg.includes(`viewBox="0 0 ${side} ${side}"`), 'a view box with the 4-module quiet zone');
    check(svg.includes(`width="${2 * side}" height="${2 * side}"`), 'width and height at scale 2');
    check(svg.includes('shape-rendering="crispEdges"'), 'crisp edges');
    check(svg.split('<path').length === 2, 'exactly one path');
    check(svg.includes('fill="#123"') && svg.includes('fill="#fed"'), 'the colours');
    const d = svg.match(/<path d="([^"]*)"/)[1];
    const drawn = Array.from({ length: m.size }, () => new Array(m.size).fill(false));
    for (const [, x, y, w] of d.matchAll(/M(\d+) (\d+)h(\d+)v1h-\3z/g)) {
      for (let i = 0; i < Number(w); i++) drawn[Number(y) - 4][Number(x) - 4 + i] = true;
    }
    check(d.replace(/M(\d+) (\d+)h(\d+)v1h-\3z/g, '') === '', 'the path is only unit-high runs');
    check(JSON.stringify(drawn) === JSON.stringify(m.modules), 'the path draws the matrix');
    const code = decode(drawn);
    check(code?.data === text, 'jsQR reads the SVG');
  }
  const small = qrSvg('x', { margin: 2, scale: 1 });
  check(small.includes('viewBox="0 0 25 25"') && small.includes('width="25"'), 'margin and scale options');
});

// More than one mask was chosen by the penalty across the cases above.
const masks = [...masksChosen.entries()].sort((a, b) => a[0] - b[0]);
test('the penalty picks more than one mask', () => check(masks.length > 1, `only mask ${masks[0]?.[0]} was chosen`));

const vs = [...versionsSeen].sort((a, b) => a - b);
const summary = `${checks} checks, ${decodes} codes decoded by jsQR` +
  `${jsqrPatched ? ' (with its version-23 fix)' : ''}; ` +
  `${vs.length === 40 ? 'all 40 versions' : `versions ${vs.join(',')}`} at L, M, Q, H; ` +
  `masks chosen (mask×count) ${masks.map(([m, n]) => `${m}×${n}`).join(' ')}`;
if (failures.length > 0) {
  for (const f of failures) console.error(`FAIL ${f}`);
  console.error(`qr: ${failures.length} failed; ${summary}`);
  process.exit(1);
}
console.log(`qr: all passed; ${summary}`);
