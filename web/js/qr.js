// QR codes for the deposit's BIP21 URI, with no dependencies.
//
//   import { qrSvg, qrMatrix } from './qr.js';
//   element.innerHTML = qrSvg(client.bip21(50_000));          // an SVG string
//   qrMatrix('bitcoin:bc1q…', { ecc: 'M' });                   // { size, version, ecc, mask, modules }
//
// Written from the QR code specification (ISO/IEC 18004): the text is encoded as UTF-8 in
// byte mode, in the smallest version (1 to 40) that holds it at the error correction level
// asked for (L, M, Q or H; M by default), with Reed-Solomon blocks as the specification's
// tables give them, the data mask of lowest penalty (the four rules of the specification),
// the format information (BCH 15,5, masked with 0x5412) and, from version 7, the version
// information (BCH 18,6). Text that does not fit version 40 throws a RangeError.
//
// What it does not do: numeric, alphanumeric and kanji modes, mixed segments, ECI, Micro QR,
// structured append. Byte mode is enough for BIP21: a URI such as
// `bitcoin:bc1q…?amount=0.00050000&label=paychan` has lower-case letters, `?`, `=` and `&`,
// which only byte mode holds; it is ASCII (BIP21 percent-encodes the rest), so the bytes are
// the same in UTF-8 and in ISO-8859-1 and every reader reads them alike. An upper-case
// `BITCOIN:BC1Q…` with no query would fit a smaller code in alphanumeric mode; in byte mode it
// costs about one version (4 modules a side), which a phone's camera does not notice. Other
// UTF-8 text is encoded without an ECI header: most readers recognise UTF-8, some may not.
//
// web/tests/qr.mjs decodes what this module draws with an independent decoder (jsQR).

const ECC_LEVELS = ['L', 'M', 'Q', 'H'];
// The two bits of the format information for each level (the specification's order is
// M, L, H, Q for 00, 01, 10, 11).
const ECC_FORMAT_BITS = { L: 1, M: 0, Q: 3, H: 2 };

// Per version (index 1 to 40) and level: the error correction codewords in each block, and
// the number of blocks. The data codewords follow: the symbol's codewords less these; they
// are shared out with the shorter blocks first (ISO/IEC 18004, table 9).
const EC_PER_BLOCK = {
  L: [0, 7, 10, 15, 20, 26, 18, 20, 24, 30, 18, 20, 24, 26, 30, 22, 24, 28, 30, 28, 28,
    28, 28, 30, 30, 26, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30],
  M: [0, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26, 26,
    26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28],
  Q: [0, 13, 22, 18, 26, 18, 24, 18, 22, 20, 24, 28, 26, 24, 20, 30, 24, 28, 28, 26, 30,
    28, 30, 30, 30, 30, 28, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30],
  H: [0, 17, 28, 22, 16, 22, 28, 26, 26, 24, 28, 24, 28, 22, 24, 24, 30, 28, 28, 26, 28,
    30, 24, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30],
};
const BLOCKS = {
  L: [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8,
    8, 9, 9, 10, 12, 12, 12, 13, 14, 15, 16, 17, 18, 19, 19, 20, 21, 22, 24, 25],
  M: [0, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16,
    17, 17, 18, 20, 21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49],
  Q: [0, 1, 1, 2, 2, 4, 4, 6, 6, 8, 8, 8, 10, 12, 16, 12, 17, 16, 18, 21, 20,
    23, 23, 25, 27, 29, 34, 34, 35, 38, 40, 43, 45, 48, 51, 53, 56, 59, 62, 65, 68],
  H: [0, 1, 1, 2, 4, 4, 4, 5, 6, 8, 8, 11, 11, 16, 16, 18, 16, 19, 21, 25, 25,
    25, 34, 30, 32, 35, 37, 40, 42, 45, 48, 51, 54, 57, 60, 63, 66, 70, 74, 77, 81],
};

const MODE_BYTE = 0b0100;
const PAD_BYTES = [0xec, 0x11];
const FORMAT_MASK = 0x5412;
const FORMAT_GENERATOR = 0x537; // x^10 + x^8 + x^5 + x^4 + x^2 + x + 1
const VERSION_GENERATOR = 0x1f25; // x^12 + x^11 + x^10 + x^9 + x^8 + x^5 + x^2 + 1

/**
 * The QR code of `text` (UTF-8, byte mode) as a matrix of modules.
 *
 * @param {string} text
 * @param {{ ecc?: 'L' | 'M' | 'Q' | 'H' }} [options]
 * @returns {{ size: number, version: number, ecc: string, mask: number, modules: boolean[][] }}
 *   `modules[y][x]` is true for a dark module; `size` is 17 + 4 × version.
 * @throws {RangeError} when the text does not fit version 40 at that level.
 */
export function qrMatrix(text, options = {}) {
  // `mask` (0 to 7) forces a data mask instead of the best one: for tests only.
  const { ecc = 'M', mask: forcedMask } = options;
  if (typeof text !== 'string') throw new TypeError('qrMatrix: text must be a string');
  if (!ECC_LEVELS.includes(ecc)) throw new RangeError(`qrMatrix: ecc must be L, M, Q or H, not ${ecc}`);
  if (forcedMask !== undefined && !(Number.isInteger(forcedMask) && forcedMask >= 0 && forcedMask <= 7)) {
    throw new RangeError(`qrMatrix: mask must be an integer from 0 to 7, not ${forcedMask}`);
  }
  const bytes = new TextEncoder().encode(text);

  let version = 1;
  while (byteCapacity(version, ecc) < bytes.length) {
    if (++version > 40) {
      throw new RangeError(`qrMatrix: ${bytes.length} bytes do not fit a QR code at level ${ecc} ` +
        `(version 40 holds ${byteCapacity(40, ecc)})`);
    }
  }

  const codewords = addErrorCorrection(dataCodewords(bytes, version, ecc), version, ecc);
  const symbol = new Grid(version);
  symbol.drawFunctionPatterns();
  symbol.placeCodewords(codewords);

  let mask = forcedMask;
  if (mask === undefined) {
    let best = Infinity;
    for (let m = 0; m < 8; m++) {
      symbol.applyMask(m);
      symbol.drawFormat(ecc, m);
      const score = penalty(symbol.dark, symbol.size);
      if (score < best) [best, mask] = [score, m];
      symbol.applyMask(m); // masking twice undoes it
    }
  }
  symbol.applyMask(mask);
  symbol.drawFormat(ecc, mask);

  const modules = [];
  for (let y = 0; y < symbol.size; y++) {
    modules.push(Array.from(symbol.dark.subarray(y * symbol.size, (y + 1) * symbol.size), Boolean));
  }
  return { size: symbol.size, version, ecc, mask, modules };
}

/**
 * The QR code of `text` as an SVG document: a light square with the quiet zone (`margin`
 * modules, 4 by the specification) and one path for the dark modules, `scale` pixels each.
 *
 * @param {string} text
 * @param {{ ecc?: 'L' | 'M' | 'Q' | 'H', scale?: number, margin?: number, dark?: string, light?: string }} [options]
 * @returns {string}
 */
export function qrSvg(text, { ecc = 'M', scale = 4, margin = 4, dark = '#000', light = '#fff' } = {}) {
  const { size, modules } = qrMatrix(text, { ecc });
  const side = size + 2 * margin;
  let path = '';
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      if (!modules[y][x]) continue;
      let run = 1;
      while (x + run < size && modules[y][x + run]) run++;
      path += `M${x + margin} ${y + margin}h${run}v1h-${run}z`;
      x += run;
    }
  }
  return `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ${side} ${side}" ` +
    `width="${side * scale}" height="${side * scale}" shape-rendering="crispEdges">` +
    `<rect width="${side}" height="${side}" fill="${attribute(light)}"/>` +
    `<path d="${path}" fill="${attribute(dark)}"/></svg>`;
}

const attribute = (value) => String(value).replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;');

// --- Sizes ------------------------------------------------------------------------------

const sizeOf = (version) => 17 + 4 * version;

/** The centres of the alignment patterns on each axis (version 2 and up; Annex E). */
function alignmentCentres(version) {
  if (version === 1) return [];
  const count = Math.floor(version / 7) + 2;
  const last = sizeOf(version) - 7;
  // Evenly spaced from the last one back, an even step; the first is always 6. Version 32
  // is the one exception to the rounding (26, not 28).
  const step = version === 32 ? 26 : 2 * Math.ceil((last - 6) / (2 * (count - 1)));
  const centres = [6];
  for (let i = count - 2; i >= 0; i--) centres.push(last - i * step);
  return centres;
}

/** The modules left for data once the function patterns are drawn. */
function dataModules(version) {
  const size = sizeOf(version);
  const align = alignmentCentres(version).length;
  let n = size * size;
  n -= 3 * 64; // three finders with their separators
  n -= 2 * (size - 16); // the timing patterns between them
  if (align > 0) {
    n -= 25 * (align * align - 3); // the alignment patterns but the three over the finders
    n += 2 * 5 * (align - 2); // those crossing the timing patterns were counted twice
  }
  n -= 2 * 15 + 1; // two copies of the format information, and the dark module
  if (version >= 7) n -= 2 * 18; // two copies of the version information
  return n;
}

const totalCodewords = (version) => Math.floor(dataModules(version) / 8);
const dataCodewordCount = (version, ecc) =>
  totalCodewords(version) - EC_PER_BLOCK[ecc][version] * BLOCKS[ecc][version];
const countBits = (version) => (version < 10 ? 8 : 16);

/** The most bytes that fit `version` at `ecc` in byte mode (mode and count included). */
function byteCapacity(version, ecc) {
  return Math.floor((dataCodewordCount(version, ecc) * 8 - 4 - countBits(version)) / 8);
}

// --- Data and error correction --------------------------------------------------------

/** Mode, count, bytes, terminator, then pad codewords up to the version's data capacity. */
function dataCodewords(bytes, version, ecc) {
  const capacity = dataCodewordCount(version, ecc);
  const out = [];
  let acc = 0;
  let accBits = 0;
  const put = (value, bits) => {
    for (let i = bits - 1; i >= 0; i--) {
      acc = (acc << 1) | ((value >>> i) & 1);
      if (++accBits === 8) {
        out.push(acc);
        acc = 0;
        accBits = 0;
      }
    }
  };
  put(MODE_BYTE, 4);
  put(bytes.length, countBits(version));
  for (const b of bytes) put(b, 8);
  // The terminator (up to four zero bits), then zeros to the codeword's end.
  const room = capacity * 8 - (out.length * 8 + accBits);
  put(0, Math.min(4, room));
  if (accBits > 0) put(0, 8 - accBits);
  for (let i = 0; out.length < capacity; i++) out.push(PAD_BYTES[i % 2]);
  return out;
}

// GF(256) with the primitive polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator α = 2.
const EXP = new Uint8Array(512);
const LOG = new Uint8Array(256);
{
  let v = 1;
  for (let i = 0; i < 255; i++) {
    EXP[i] = v;
    LOG[v] = i;
    v <<= 1;
    if (v & 0x100) v ^= 0x11d;
  }
  for (let i = 255; i < 512; i++) EXP[i] = EXP[i - 255];
}
const gfMul = (a, b) => (a === 0 || b === 0 ? 0 : EXP[LOG[a] + LOG[b]]);

const generators = new Map();
/** The generator polynomial (x - α^0)(x - α^1)…(x - α^(n-1)), highest degree first, monic. */
function generator(n) {
  let g = generators.get(n);
  if (g) return g;
  g = [1];
  for (let i = 0; i < n; i++) {
    const next = new Array(g.length + 1).fill(0);
    for (let j = 0; j < g.length; j++) {
      next[j] ^= g[j]; // × x
      next[j + 1] ^= gfMul(g[j], EXP[i]); // × α^i (minus is plus in GF(2^8))
    }
    g = next;
  }
  generators.set(n, g);
  return g;
}

/** The remainder of data × x^n divided by the generator: the n error correction codewords. */
function reedSolomon(data, n) {
  const g = generator(n);
  const rem = new Array(n).fill(0);
  for (const d of data) {
    const factor = d ^ rem[0];
    rem.shift();
    rem.push(0);
    if (factor !== 0) for (let i = 0; i < n; i++) rem[i] ^= gfMul(g[i + 1], factor);
  }
  return rem;
}

/** Splits the data into blocks, adds each block's error correction, interleaves them all. */
function addErrorCorrection(data, version, ecc) {
  const blocks = BLOCKS[ecc][version];
  const ecLen = EC_PER_BLOCK[ecc][version];
  const shortLen = Math.floor(data.length / blocks);
  const longOnes = data.length % blocks; // the last ones hold one codeword more
  const dataBlocks = [];
  const ecBlocks = [];
  let at = 0;
  for (let b = 0; b < blocks; b++) {
    const len = shortLen + (b >= blocks - longOnes ? 1 : 0);
    const block = data.slice(at, at + len);
    at += len;
    dataBlocks.push(block);
    ecBlocks.push(reedSolomon(block, ecLen));
  }
  const out = [];
  for (let i = 0; i <= shortLen; i++) for (const block of dataBlocks) if (i < block.length) out.push(block[i]);
  for (let i = 0; i < ecLen; i++) for (const block of ecBlocks) out.push(block[i]);
  return out;
}

// --- The symbol --------------------------------------------------------------------------

class Grid {
  constructor(version) {
    this.version = version;
    this.size = sizeOf(version);
    this.dark = new Uint8Array(this.size * this.size);
    this.reserved = new Uint8Array(this.size * this.size); // function patterns, format, version
  }

  set(x, y, dark) {
    const i = y * this.size + x;
    this.dark[i] = dark ? 1 : 0;
    this.reserved[i] = 1;
  }

  drawFunctionPatterns() {
    const { size, version } = this;
    // Timing patterns first: the finders and alignment patterns overwrite their ends.
    for (let i = 0; i < size; i++) {
      this.set(6, i, i % 2 === 0);
      this.set(i, 6, i % 2 === 0);
    }
    this.finder(3, 3);
    this.finder(size - 4, 3);
    this.finder(3, size - 4);
    const centres = alignmentCentres(version);
    for (const cy of centres) {
      for (const cx of centres) {
        const overFinder = (cx === 6 && cy === 6) || (cx === 6 && cy === size - 7) || (cx === size - 7 && cy === 6);
        if (!overFinder) this.alignment(cx, cy);
      }
    }
    // Reserve the format areas (drawn once the mask is known) and the dark module.
    this.drawFormat('M', 0);
    this.set(8, size - 8, true);
    if (version >= 7) this.drawVersion();
  }

  /** A 7×7 finder pattern centred on (cx, cy), with its light separator. */
  finder(cx, cy) {
    for (let dy = -4; dy <= 4; dy++) {
      for (let dx = -4; dx <= 4; dx++) {
        const x = cx + dx;
        const y = cy + dy;
        if (x < 0 || y < 0 || x >= this.size || y >= this.size) continue;
        const ring = Math.max(Math.abs(dx), Math.abs(dy));
        this.set(x, y, ring !== 2 && ring !== 4);
      }
    }
  }

  /** A 5×5 alignment pattern centred on (cx, cy). */
  alignment(cx, cy) {
    for (let dy = -2; dy <= 2; dy++) {
      for (let dx = -2; dx <= 2; dx++) this.set(cx + dx, cy + dy, Math.max(Math.abs(dx), Math.abs(dy)) !== 1);
    }
  }

  /** The 15 format bits: the level and the mask, their BCH(15,5) code, masked. */
  drawFormat(ecc, mask) {
    const bits = bch((ECC_FORMAT_BITS[ecc] << 3) | mask, 5, FORMAT_GENERATOR, 10) ^ FORMAT_MASK;
    const bit = (i) => ((bits >>> i) & 1) === 1;
    const { size } = this;
    // Around the top-left finder: bits 0 to 7 up column 8 (skipping the timing pattern),
    // bits 8 to 14 along row 8 to the left (bit 14 at the edge).
    for (let i = 0; i <= 5; i++) this.set(8, i, bit(i));
    this.set(8, 7, bit(6));
    this.set(8, 8, bit(7));
    this.set(7, 8, bit(8));
    for (let i = 9; i < 15; i++) this.set(14 - i, 8, bit(i));
    // The copy: bits 0 to 7 along row 8 from the right edge, bits 8 to 14 down column 8
    // under the bottom-left finder (bit 14 at the edge).
    for (let i = 0; i < 8; i++) this.set(size - 1 - i, 8, bit(i));
    for (let i = 8; i < 15; i++) this.set(8, size - 15 + i, bit(i));
  }

  /** The 18 version bits (version 7 and up): the version and its BCH(18,6) code, twice. */
  drawVersion() {
    const bits = bch(this.version, 6, VERSION_GENERATOR, 12);
    for (let i = 0; i < 18; i++) {
      const dark = ((bits >>> i) & 1) === 1;
      const a = this.size - 11 + (i % 3);
      const b = Math.floor(i / 3);
      this.set(a, b, dark); // above the top-right finder
      this.set(b, a, dark); // left of the bottom-left finder
    }
  }

  /** Codewords bit by bit, most significant first, in two-module columns from the bottom
   * right, up then down, over every module that is not reserved; the rest stays light. */
  placeCodewords(codewords) {
    const { size } = this;
    let i = 0;
    const total = codewords.length * 8;
    let upward = true;
    for (let right = size - 1; right >= 1; right -= 2) {
      if (right === 6) right = 5; // the vertical timing pattern is not part of any column
      for (let step = 0; step < size; step++) {
        const y = upward ? size - 1 - step : step;
        for (const x of [right, right - 1]) {
          const at = y * size + x;
          if (this.reserved[at]) continue;
          if (i < total) this.dark[at] = (codewords[i >>> 3] >>> (7 - (i & 7))) & 1;
          i++;
        }
      }
      upward = !upward;
    }
  }

  /** Flips the data modules where mask `m` says so (its own inverse). */
  applyMask(m) {
    const { size } = this;
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const at = y * size + x;
        if (!this.reserved[at] && maskBit(m, y, x)) this.dark[at] ^= 1;
      }
    }
  }
}

/** The eight data masks (i the row, j the column): true where the module is flipped. */
function maskBit(m, i, j) {
  switch (m) {
    case 0: return (i + j) % 2 === 0;
    case 1: return i % 2 === 0;
    case 2: return j % 3 === 0;
    case 3: return (i + j) % 3 === 0;
    case 4: return (Math.floor(i / 2) + Math.floor(j / 3)) % 2 === 0;
    case 5: return ((i * j) % 2) + ((i * j) % 3) === 0;
    case 6: return (((i * j) % 2) + ((i * j) % 3)) % 2 === 0;
    default: return (((i + j) % 2) + ((i * j) % 3)) % 2 === 0;
  }
}

/** `value` (dataBits long) followed by the remainder of its division by `generator`. */
function bch(value, dataBits, generatorPoly, checkBits) {
  let rem = value << checkBits;
  for (let bit = dataBits + checkBits - 1; bit >= checkBits; bit--) {
    if ((rem >>> bit) & 1) rem ^= generatorPoly << (bit - checkBits);
  }
  return (value << checkBits) | rem;
}

// --- Mask penalty (ISO/IEC 18004, 7.8.3) ------------------------------------------------

const N1 = 3;
const N2 = 3;
const N3 = 40;
const N4 = 10;

/** The penalty of a finished symbol: lower is better. */
function penalty(dark, size) {
  let score = 0;
  const at = (x, y) => dark[y * size + x];

  // Rules 1 and 3 on every row and every column alike.
  for (let horizontal = 0; horizontal < 2; horizontal++) {
    for (let a = 0; a < size; a++) {
      const line = new Uint8Array(size);
      for (let b = 0; b < size; b++) line[b] = horizontal ? at(b, a) : at(a, b);
      score += runPenalty(line) + finderLikePenalty(line);
    }
  }

  // Rule 2: each 2×2 block of one colour (overlapping blocks count each).
  for (let y = 0; y < size - 1; y++) {
    for (let x = 0; x < size - 1; x++) {
      const c = at(x, y);
      if (c === at(x + 1, y) && c === at(x, y + 1) && c === at(x + 1, y + 1)) score += N2;
    }
  }

  // Rule 4: 10 points for each full 5 % the dark modules stray from half.
  let darkCount = 0;
  for (const d of dark) darkCount += d;
  const total = size * size;
  score += N4 * Math.floor(Math.abs(20 * darkCount - 10 * total) / total);
  return score;
}

/** Rule 1: a run of five or more modules of one colour costs 3, plus 1 per module beyond 5. */
function runPenalty(line) {
  let score = 0;
  let run = 1;
  for (let i = 1; i <= line.length; i++) {
    if (i < line.length && line[i] === line[i - 1]) {
      run++;
    } else {
      if (run >= 5) score += N1 + (run - 5);
      run = 1;
    }
  }
  return score;
}

/** Rule 3: dark-light-dark-dark-dark-light-dark (1:1:3:1:1) with four light modules before
 * or after it; the quiet zone outside the symbol counts as light. */
function finderLikePenalty(line) {
  const n = line.length;
  const get = (i) => (i < 0 || i >= n ? 0 : line[i]);
  const core = [1, 0, 1, 1, 1, 0, 1];
  let score = 0;
  for (let start = 0; start + 7 <= n; start++) {
    let match = true;
    for (let k = 0; k < 7 && match; k++) match = line[start + k] === core[k];
    if (!match) continue;
    let lightBefore = true;
    let lightAfter = true;
    for (let k = 1; k <= 4; k++) {
      if (get(start - k)) lightBefore = false;
      if (get(start + 6 + k)) lightAfter = false;
    }
    if (lightBefore || lightAfter) score += N3;
  }
  return score;
}
