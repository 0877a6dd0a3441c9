// The types of qr.js: the deposit's QR code. docs/BROWSER.md says more.

/** An error correction level: L (7 % of the code can be lost), M (15 %), Q (25 %), H (30 %). */
export type QrEcc = 'L' | 'M' | 'Q' | 'H';

/** What `qrMatrix` takes besides the text. */
export interface QrMatrixOptions {
  /** The error correction level (default M). */
  ecc?: QrEcc;
}

/** What `qrSvg` takes besides the text. */
export interface QrSvgOptions extends QrMatrixOptions {
  /** Pixels per module (default 4). */
  scale?: number;
  /** The quiet zone, in modules (default 4, as the standard asks). */
  margin?: number;
  /** The dark modules' colour (default `#000`). */
  dark?: string;
  /** The background's colour (default `#fff`). */
  light?: string;
}

/** A QR code as a matrix of modules. */
export interface QrMatrix {
  /** Modules a side: 17 + 4 × version. */
  size: number;
  /** The version, 1 to 40: the smallest that holds the text. */
  version: number;
  /** The error correction level. */
  ecc: QrEcc;
  /** The data mask used, 0 to 7. */
  mask: number;
  /** `modules[y][x]` is true for a dark module. */
  modules: boolean[][];
}

/**
 * The QR code of `text` (UTF-8, byte mode) as a matrix of modules. Throws a `RangeError`
 * when the text does not fit version 40 at that level.
 */
export function qrMatrix(text: string, options?: QrMatrixOptions): QrMatrix;

/**
 * The QR code of `text` as an SVG string: a light square with the quiet zone and one path
 * for the dark modules. Throws a `RangeError` when the text does not fit version 40.
 */
export function qrSvg(text: string, options?: QrSvgOptions): string;
