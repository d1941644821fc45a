/**
 * The scenarios of `deno task bench`: which transport and wire format the
 * load generator uses, and how many metrics each sends by default.
 *
 * @module
 */

/** Wire format of a scenario's metrics. */
export type BenchFormat = "ascii" | "binary" | "mixed";

/** How a UDP scenario packs metrics into datagrams. */
export type DatagramPacking = "batched" | "single";

/** One benchmark scenario. */
export interface Scenario {
  /** Name, as given to `--scenarios`. */
  readonly name: string;
  /** One line saying what is sent. */
  readonly description: string;
  /** Transport to the proxy. */
  readonly transport: "tcp" | "udp";
  /** Wire format. */
  readonly format: BenchFormat;
  /** For UDP: many lines per datagram, or one. */
  readonly packing?: DatagramPacking;
  /**
   * For batched UDP: exactly this many lines per datagram; without it,
   * datagrams are filled up to 1400 bytes.
   */
  readonly linesPerDatagram?: number;
  /** Metrics sent by default. */
  readonly count: number;
  /** Pace (metrics/s) unless `--rate` is given; without it, as fast as possible. */
  readonly rate?: number;
  /** Metrics sent with `--quick`. */
  readonly quickCount: number;
  /**
   * Pace (metrics/s) with `--quick` unless `--rate` is given: a tiny UDP run
   * on a busy two-core machine must not lose datagrams, or the smoke test
   * would be flaky.
   */
  readonly quickRate?: number;
  /**
   * Route sections for our proxy's configuration (rewriting, limits):
   * scenarios that measure what routes cost against `tcp-ascii`.
   */
  readonly routes?: string;
  /** More main-section settings for our proxy (e.g. `client_rate_limit`). */
  readonly settings?: Readonly<Record<string, string | number>>;
}

/** Every scenario, in the order they run. */
export const SCENARIOS: readonly Scenario[] = [
  {
    name: "tcp-ascii",
    description: "ascii lines, 128 KiB writes over 4 connections",
    transport: "tcp",
    format: "ascii",
    count: 70_000_000,
    quickCount: 4_000,
  },
  {
    name: "udp-batched",
    description: "ascii lines in datagrams of up to 1400 bytes (about 35 lines)",
    transport: "udp",
    format: "ascii",
    packing: "batched",
    count: 10_000_000,
    quickCount: 4_000,
    quickRate: 20_000,
  },
  {
    name: "udp-single",
    description: "one ascii line per datagram",
    transport: "udp",
    format: "ascii",
    packing: "single",
    count: 2_000_000,
    quickCount: 2_000,
    quickRate: 10_000,
  },
  {
    name: "udp-20",
    description: "20 ascii lines per datagram, paced at 1,000,000 lines/s",
    transport: "udp",
    format: "ascii",
    packing: "batched",
    linesPerDatagram: 20,
    count: 10_000_000,
    rate: 1_000_000,
    quickCount: 4_000,
    quickRate: 20_000,
  },
  {
    name: "udp-1",
    description: "one ascii line per datagram, paced at 150,000 datagrams/s",
    transport: "udp",
    format: "ascii",
    packing: "single",
    count: 1_500_000,
    rate: 150_000,
    quickCount: 2_000,
    quickRate: 10_000,
  },
  {
    name: "tcp-binary",
    description: "statsite binary frames (counter, timer, gauge), 128 KiB writes",
    transport: "tcp",
    format: "binary",
    count: 70_000_000,
    quickCount: 4_000,
  },
  {
    name: "tcp-mixed",
    description: "ascii lines and binary frames interleaved on the same connections",
    transport: "tcp",
    format: "mixed",
    count: 70_000_000,
    quickCount: 4_000,
  },
  {
    name: "tcp-route",
    description: "as tcp-ascii, through a catch-all route without rules",
    transport: "tcp",
    format: "ascii",
    count: 20_000_000,
    quickCount: 4_000,
    routes: "[route:all]\nmatch = .\npools = default\n",
  },
  {
    name: "tcp-rewrite",
    description: "as tcp-ascii, through a route with suffix and add_tags",
    transport: "tcp",
    format: "ascii",
    count: 20_000_000,
    quickCount: 4_000,
    routes: "[route:all]\nmatch = .\npools = default\nsuffix = .v2\nadd_tags = env:prod\n",
  },
  {
    name: "tcp-cardinality",
    description: "as tcp-ascii, through a route with a cardinality limit every name is within",
    transport: "tcp",
    format: "ascii",
    count: 20_000_000,
    quickCount: 4_000,
    routes: "[route:all]\nmatch = .\npools = default\ncardinality_limit = 1000000\n",
  },
  {
    name: "tcp-ratelimit",
    description: "as tcp-ascii, with a client_rate_limit no connection reaches",
    transport: "tcp",
    format: "ascii",
    count: 20_000_000,
    quickCount: 4_000,
    settings: { client_rate_limit: 1_000_000_000 },
  },
];

/** The scenario named `name`, or undefined. */
export function findScenario(name: string): Scenario | undefined {
  return SCENARIOS.find((s) => s.name === name);
}
