/**
 * Handing a socket to another process: its file descriptor is sent with
 * `SCM_RIGHTS` over a Unix datagram socket (Linux, through libc FFI), so the
 * receiver reads the very same kernel socket, with its queue. Deno cannot
 * pass descriptors itself.
 *
 * The receiver ({@linkcode FdReceiver}) binds a socket in the abstract
 * namespace under a random name and tells the sender the name over a channel
 * it trusts (the proxy's control socket). Abstract sockets have no file
 * permissions, so the receiver also asks the kernel for each sender's
 * credentials (`SO_PASSCRED`) and keeps only a descriptor sent by the
 * process it expects; anything else is closed.
 *
 * Sending ({@linkcode sendFd}) is one synchronous `sendmsg`: when it returns,
 * the message is queued on the receiver's socket, so the receiver can take it
 * without waiting once the sender has said it was sent.
 *
 * @module
 */

import { ERRNO, errnoError, LAYOUT, type Libc, LINUX, openLibc } from "./libc.ts";

/** Room for the control messages of one received message: credentials, and up to 8 fds. */
const CONTROL_BYTES = 32 + 48;
/** The payload of a message: one byte, which says nothing. */
const PAYLOAD_BYTES = 8;

/** Offsets in the one buffer a message's parts live in (off the V8 heap, never moving). */
const AT = {
  msghdr: 0,
  iovec: LAYOUT.MSGHDR_SIZE,
  control: LAYOUT.MSGHDR_SIZE + LAYOUT.IOVEC_SIZE,
  payload: LAYOUT.MSGHDR_SIZE + LAYOUT.IOVEC_SIZE + CONTROL_BYTES,
  name: LAYOUT.MSGHDR_SIZE + LAYOUT.IOVEC_SIZE + CONTROL_BYTES + PAYLOAD_BYTES,
  size: LAYOUT.MSGHDR_SIZE + LAYOUT.IOVEC_SIZE + CONTROL_BYTES + PAYLOAD_BYTES + 112,
} as const;

/** One message's memory: the msghdr, its iovec, control area, payload and peer name. */
class MessageBuffer {
  readonly buffer: ArrayBuffer = new ArrayBuffer(AT.size);
  readonly view: DataView = new DataView(this.buffer);
  readonly bytes: Uint8Array = new Uint8Array(this.buffer);
  readonly base: bigint = BigInt(
    Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(this.buffer))),
  );

  /** Fills the msghdr: payload, control area of `controlBytes`, and the peer name when given. */
  prepare(controlBytes: number, nameLength: number): void {
    const v = this.view;
    this.bytes.fill(0, 0, AT.payload);
    v.setBigUint64(
      AT.msghdr + LAYOUT.MSG_NAME,
      nameLength > 0 ? this.base + BigInt(AT.name) : 0n,
      true,
    );
    v.setUint32(AT.msghdr + LAYOUT.MSG_NAMELEN, nameLength, true);
    v.setBigUint64(AT.msghdr + LAYOUT.MSG_IOV, this.base + BigInt(AT.iovec), true);
    v.setBigUint64(AT.msghdr + LAYOUT.MSG_IOVLEN, 1n, true);
    v.setBigUint64(AT.msghdr + LAYOUT.MSG_CONTROL, this.base + BigInt(AT.control), true);
    v.setBigUint64(AT.msghdr + LAYOUT.MSG_CONTROLLEN, BigInt(controlBytes), true);
    v.setBigUint64(AT.iovec + LAYOUT.IOV_BASE, this.base + BigInt(AT.payload), true);
    v.setBigUint64(AT.iovec + LAYOUT.IOV_LEN, 1n, true);
  }

  /** The msghdr, as the `buffer` argument of sendmsg/recvmsg. */
  get msghdr(): Uint8Array {
    return this.bytes.subarray(AT.msghdr, AT.msghdr + LAYOUT.MSGHDR_SIZE);
  }
}

/** A `sockaddr_un` for the abstract name `name`, in `into` at `at`; returns its length. */
function writeAbstractName(into: Uint8Array, at: number, name: string): number {
  const text = new TextEncoder().encode(name);
  if (text.length + 1 > LAYOUT.SOCKADDR_UN_PATH_MAX) throw new RangeError("name too long");
  new DataView(into.buffer, into.byteOffset).setUint16(at, LINUX.AF_UNIX, true);
  into[at + LAYOUT.SOCKADDR_UN_PATH] = 0;
  into.set(text, at + LAYOUT.SOCKADDR_UN_PATH + 1);
  return LAYOUT.SOCKADDR_UN_PATH + 1 + text.length;
}

function unixDatagramSocket(libc: Libc): number {
  const fd = libc.symbols.socket(
    LINUX.AF_UNIX,
    LINUX.SOCK_DGRAM | LINUX.SOCK_NONBLOCK | LINUX.SOCK_CLOEXEC,
    0,
  );
  if (fd < 0) throw errnoError(libc, "socket(AF_UNIX)", libc.errno());
  return fd;
}

/**
 * Waits for descriptors handed over by another process (see the module
 * doc). Linux only, with `--allow-ffi`; {@linkcode FdReceiver.open} throws
 * `NativeUdpUnavailable` otherwise.
 *
 * @example Usage
 * ```ts ignore
 * const receiver = FdReceiver.open();
 * // ... tell the sender receiver.name, wait until it says it sent ...
 * const fd = receiver.receive(senderPid);
 * receiver.close();
 * ```
 */
export class FdReceiver {
  /** The abstract name to send to (without its leading NUL). */
  readonly name: string;
  readonly #libc: Libc;
  readonly #fd: number;
  readonly #message = new MessageBuffer();
  #closed = false;

  private constructor(libc: Libc, fd: number, name: string) {
    this.#libc = libc;
    this.#fd = fd;
    this.name = name;
  }

  /** Binds a receiving socket under a new random abstract name. */
  static open(): FdReceiver {
    const libc = openLibc();
    let fd = -1;
    try {
      fd = unixDatagramSocket(libc);
      const on = new Uint8Array(new Int32Array([1]).buffer);
      if (libc.symbols.setsockopt(fd, LINUX.SOL_SOCKET, LINUX.SO_PASSCRED, on, 4) !== 0) {
        throw errnoError(libc, "setsockopt(SO_PASSCRED)", libc.errno());
      }
      const random = crypto.getRandomValues(new Uint8Array(16));
      const name = `statsite-proxy/${Deno.pid}/${
        Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("")
      }`;
      const address = new Uint8Array(LAYOUT.SOCKADDR_UN_PATH_MAX + 2);
      const length = writeAbstractName(address, 0, name);
      if (libc.symbols.bind(fd, address, length) !== 0) {
        throw errnoError(libc, "bind(AF_UNIX)", libc.errno());
      }
      return new FdReceiver(libc, fd, name);
    } catch (err) {
      if (fd >= 0) libc.symbols.close(fd);
      libc.close();
      throw err;
    }
  }

  /**
   * Takes the one descriptor process `fromPid` sent, without waiting.
   * Messages from any other process, or with other than one descriptor, are
   * discarded (their descriptors closed).
   *
   * @throws {Error} Nothing from `fromPid` is queued.
   */
  receive(fromPid: number): number {
    if (this.#closed) throw new Error("the receiver is closed");
    const libc = this.#libc;
    const m = this.#message;
    while (true) {
      m.prepare(CONTROL_BYTES, 0);
      const n = libc.symbols.recvmsg(
        this.#fd,
        m.msghdr,
        LINUX.MSG_DONTWAIT | LINUX.MSG_CMSG_CLOEXEC,
      );
      if (n < 0) {
        const errno = libc.errno();
        if (errno === ERRNO.EINTR) continue;
        if (errno === ERRNO.EAGAIN) throw new Error("no socket was handed over");
        throw errnoError(libc, "recvmsg", errno);
      }
      const { pid, fds } = this.#parseControl();
      if (pid === fromPid && fds.length === 1) return fds[0];
      for (const fd of fds) libc.symbols.close(fd);
    }
  }

  /** The sender's pid and the descriptors of the message just received. */
  #parseControl(): { pid: number; fds: number[] } {
    const v = this.#message.view;
    const controlLength = Number(v.getBigUint64(AT.msghdr + LAYOUT.MSG_CONTROLLEN, true));
    let pid = -1;
    const fds: number[] = [];
    let at = 0;
    while (at + LAYOUT.CMSGHDR_SIZE <= controlLength) {
      const length = Number(v.getBigUint64(AT.control + at, true));
      if (length < LAYOUT.CMSGHDR_SIZE || at + length > controlLength) break;
      const level = v.getInt32(AT.control + at + 8, true);
      const type = v.getInt32(AT.control + at + 12, true);
      const data = AT.control + at + LAYOUT.CMSGHDR_SIZE;
      if (level === LINUX.SOL_SOCKET && type === LINUX.SCM_CREDENTIALS) {
        pid = v.getInt32(data, true);
      } else if (level === LINUX.SOL_SOCKET && type === LINUX.SCM_RIGHTS) {
        for (let i = 0; i + 4 <= length - LAYOUT.CMSGHDR_SIZE; i += 4) {
          fds.push(v.getInt32(data + i, true));
        }
      }
      at += (length + 7) & ~7;
    }
    return { pid, fds };
  }

  /** Closes the receiving socket. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#libc.symbols.close(this.#fd);
    this.#libc.close();
  }
}

/**
 * Sends descriptor `fd` (which stays open here too) to the
 * {@linkcode FdReceiver} bound under the abstract name `name`.
 *
 * @throws {NativeUdpUnavailable} No FFI, or not Linux.
 * @throws {Error} The send failed (e.g. no receiver under that name).
 */
export function sendFd(name: string, fd: number): void {
  const libc = openLibc();
  let socket = -1;
  try {
    socket = unixDatagramSocket(libc);
    const m = new MessageBuffer();
    const nameLength = writeAbstractName(m.bytes, AT.name, name);
    const controlBytes = LAYOUT.CMSGHDR_SIZE + 8; // CMSG_SPACE(sizeof(int))
    m.prepare(controlBytes, nameLength);
    m.view.setBigUint64(AT.control, BigInt(LAYOUT.CMSGHDR_SIZE + 4), true); // CMSG_LEN(4)
    m.view.setInt32(AT.control + 8, LINUX.SOL_SOCKET, true);
    m.view.setInt32(AT.control + 12, LINUX.SCM_RIGHTS, true);
    m.view.setInt32(AT.control + LAYOUT.CMSGHDR_SIZE, fd, true);
    m.bytes[AT.payload] = 0x21;
    while (libc.symbols.sendmsg(socket, m.msghdr, 0) < 0) {
      const errno = libc.errno();
      if (errno !== ERRNO.EINTR) throw errnoError(libc, "sendmsg", errno);
    }
  } finally {
    if (socket >= 0) libc.symbols.close(socket);
    libc.close();
  }
}
