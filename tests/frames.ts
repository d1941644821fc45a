/**
 * Test helpers for wire frames: building statsite binary frames, joining
 * bytes, and turning a decoder's batch into plain values for assertions.
 *
 * @module
 */

import type { FrameBatch } from "../src/ingest/frame_batch.ts";

const utf8 = new TextDecoder();
const encoder = new TextEncoder();

/** UTF-8 bytes of `text`. */
export const enc = (text: string): Uint8Array => encoder.encode(text);

/** Bytes from hex pairs separated by spaces. */
export const hex = (s: string): Uint8Array =>
  new Uint8Array(s.split(" ").map((h) => parseInt(h, 16)));

/** `buf[start, end)` as a latin1 string (one char per byte). */
export function latin1(buf: Uint8Array, start = 0, end = buf.length): string {
  let s = "";
  for (let i = start; i < end; i++) s += String.fromCharCode(buf[i]);
  return s;
}

/** Joins byte arrays and strings (UTF-8 encoded). */
export function concat(...parts: (Uint8Array | string)[]): Uint8Array {
  const bufs = parts.map((p) => typeof p === "string" ? enc(p) : p);
  const out = new Uint8Array(bufs.reduce((n, b) => n + b.length, 0));
  let at = 0;
  for (const b of bufs) {
    out.set(b, at);
    at += b.length;
  }
  return out;
}

/** A statsite binary frame of type 1, 2, 3, 5 or 6 (anything but a set). */
export function binary(type: number, key: string, value: number): Uint8Array {
  const k = enc(key);
  const out = new Uint8Array(12 + k.length + 1);
  const view = new DataView(out.buffer);
  out[0] = 0xaa;
  out[1] = type;
  view.setUint16(2, k.length + 1, true);
  view.setFloat64(4, value, true);
  out.set(k, 12);
  return out;
}

/** A statsite binary set frame (type 4). */
export function binarySet(key: string, member: string): Uint8Array {
  const k = enc(key);
  const m = enc(member);
  const out = new Uint8Array(6 + k.length + 1 + m.length + 1);
  const view = new DataView(out.buffer);
  out[0] = 0xaa;
  out[1] = 4;
  view.setUint16(2, k.length + 1, true);
  view.setUint16(4, m.length + 1, true);
  out.set(k, 6);
  out.set(m, 6 + k.length + 1);
  return out;
}

/** A decoded frame as plain values that outlive the batch. */
export interface Frame {
  /** The frame's bytes as a latin1 string. */
  frame: string;
  /** The routing key, decoded as UTF-8. */
  key: string;
  /** An ascii line (true) or a binary frame. */
  ascii: boolean;
}

/** Turns a batch into plain values that outlive it. */
export function framesOf(batch: FrameBatch): Frame[] {
  const out: Frame[] = [];
  for (let i = 0; i < batch.count; i++) {
    out.push({
      frame: latin1(batch.buf, batch.start[i], batch.end[i]),
      key: utf8.decode(batch.buf.subarray(batch.keyStart[i], batch.keyEnd[i])),
      ascii: batch.ascii[i] === 1,
    });
  }
  return out;
}
