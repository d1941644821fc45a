/**
 * A route's rewriting keys (`prefix`, `suffix`, `add_tags`, `strip_tags`,
 * `rewrite_events`), checked and turned into a {@linkcode RewriteRule};
 * `src/routing/rewrite.ts` applies the rule to the bytes.
 *
 * @module
 */

import { plainName } from "../diagnostics/errors.ts";
import { boolean, InvalidValue } from "./values.ts";

/** A rewrite rule, as a route's configuration gives it. */
export interface RewriteRule {
  /** Bytes put before the routing key. */
  prefix?: string;
  /** Bytes put after the routing key. */
  suffix?: string;
  /**
   * DogStatsD tags added to every line, `k:v` or `k`; each replaces a tag of
   * the same key already there.
   */
  addTags?: string[];
  /** Tag keys whose tags are removed (`env` removes `env:dev` and `env`). */
  stripTags?: string[];
  /**
   * Whether DogStatsD events (`_e{`) and service checks (`_sc|`) are
   * rewritten too. Defaults to false: they pass unchanged.
   */
  events?: boolean;
}

/** The config keys of a route's rewriting, as the INI file gives them. */
export interface RewriteKeys {
  /** `prefix`: put before every metric's name. */
  prefix?: string;
  /** `suffix`: put after every metric's name. */
  suffix?: string;
  /** `add_tags`: comma-separated tags, `k:v` or `k`. */
  add_tags?: string;
  /** `strip_tags`: comma-separated tag keys. */
  strip_tags?: string;
  /** `rewrite_events`: whether events and service checks are rewritten (true, false, yes, no, 1, 0). */
  rewrite_events?: string;
}

/** A key of {@linkcode RewriteKeys}. */
export type RewriteKey = keyof RewriteKeys;

/**
 * A rewrite key's value is wrong. The message is one line, `KEY: problem`;
 * {@linkcode RewriteKeyError.key} says which key, so that the caller can
 * name its line.
 *
 * @example Usage
 * ```ts
 * import { parseRewriteKeys, RewriteKeyError } from "./rewrite_settings.ts";
 *
 * try {
 *   parseRewriteKeys({ prefix: "edge.", add_tags: "a|b" });
 * } catch (error) {
 *   if (error instanceof RewriteKeyError) console.log(error.key); // "add_tags"
 * }
 * ```
 */
export class RewriteKeyError extends RangeError {
  /** The key whose value is wrong. */
  readonly key: RewriteKey;

  /**
   * Constructs a new instance.
   *
   * @param key The key whose value is wrong.
   * @param problem What is wrong, in one line, without the key.
   */
  constructor(key: RewriteKey, problem: string) {
    super(`${key}: ${problem}`);
    this.name = "RewriteKeyError";
    this.key = key;
  }
}

/**
 * Reads a route's rewrite keys into a {@linkcode RewriteRule}; undefined
 * when none is set.
 *
 * - `prefix`, `suffix`: not empty, no `:`, `|`, `@`, `#`, blanks or control
 *   characters (they would change how the line reads).
 * - `add_tags`: comma-separated (blanks around the commas are ignored) tags
 *   `k:v` or `k`, with a non-empty key, no `|`, blanks or control
 *   characters, and no key twice.
 * - `strip_tags`: comma-separated tag keys, as tags, without `:`.
 * - `rewrite_events`: `true`, `false`, `yes`, `no`, `1` or `0`; it needs one
 *   of the others.
 *
 * @throws {RewriteKeyError} A one-line problem, naming the key.
 */
export function parseRewriteKeys(keys: RewriteKeys): RewriteRule | undefined {
  const rule: RewriteRule = {};
  if (keys.prefix !== undefined) rule.prefix = checkAffix("prefix", keys.prefix);
  if (keys.suffix !== undefined) rule.suffix = checkAffix("suffix", keys.suffix);
  if (keys.add_tags !== undefined) {
    const tags = list("add_tags", keys.add_tags);
    checkAddTags(tags);
    rule.addTags = tags;
  }
  if (keys.strip_tags !== undefined) {
    const tags = list("strip_tags", keys.strip_tags);
    checkStripTags(tags);
    rule.stripTags = [...new Set(tags)];
  }
  const any = Object.keys(rule).length > 0;
  if (keys.rewrite_events !== undefined) {
    try {
      rule.events = boolean(keys.rewrite_events.trim());
    } catch (err) {
      if (!(err instanceof InvalidValue)) throw err;
      throw new RewriteKeyError(
        "rewrite_events",
        `${err.message}, got ${plainName(keys.rewrite_events) ?? "another value"}`,
      );
    }
    if (!any) {
      throw new RewriteKeyError(
        "rewrite_events",
        "needs prefix, suffix, add_tags or strip_tags to rewrite with",
      );
    }
  }
  return any ? rule : undefined;
}

/** A comma-separated list, each item trimmed; no item may be empty. */
function list(name: RewriteKey, text: string): string[] {
  const items = text.split(",").map((s) => s.trim());
  if (items.some((s) => s === "")) {
    throw new RewriteKeyError(name, text.trim() === "" ? "is empty" : "an empty item in the list");
  }
  return items;
}

// deno-lint-ignore no-control-regex
const CONTROL = /[\u0000-\u001f\u007f]/;
const BLANK = /\s/;

/** Checks a prefix or suffix; returns it. */
export function checkAffix(name: "prefix" | "suffix", text: string): string {
  if (text === "") throw new RewriteKeyError(name, "is empty");
  const bad = /[:|@#]/.exec(text);
  if (bad !== null) {
    throw new RewriteKeyError(name, `${shown(text)}holds '${bad[0]}'${AFFIX_RULE}`);
  }
  if (BLANK.test(text)) {
    throw new RewriteKeyError(name, `${shown(text)}holds a blank${AFFIX_RULE}`);
  }
  if (CONTROL.test(text)) {
    throw new RewriteKeyError(name, `${shown(text)}holds a control character${AFFIX_RULE}`);
  }
  if (!text.isWellFormed()) throw new RewriteKeyError(name, `${shown(text)}is not Unicode`);
  return text;
}

const AFFIX_RULE = " (a prefix or suffix may not hold ':', '|', '@', '#', blanks or controls)";

/** Checks a tag (`add_tags`) or a tag key (`strip_tags`). */
function checkTag(name: "add_tags" | "strip_tags", tag: string): void {
  if (tag === "") throw new RewriteKeyError(name, "an empty tag");
  const bad = /[,|]/.exec(tag);
  if (bad !== null) {
    throw new RewriteKeyError(name, `${shown(tag)}holds '${bad[0]}'${TAG_RULE}`);
  }
  if (BLANK.test(tag)) {
    throw new RewriteKeyError(name, `${shown(tag)}holds a blank${TAG_RULE}`);
  }
  if (CONTROL.test(tag)) {
    throw new RewriteKeyError(name, `${shown(tag)}holds a control character${TAG_RULE}`);
  }
  if (!tag.isWellFormed()) throw new RewriteKeyError(name, `${shown(tag)}is not Unicode`);
  if (tag.startsWith(":")) {
    throw new RewriteKeyError(name, `${shown(tag)}has an empty tag key`);
  }
}

const TAG_RULE = " (a tag may not hold ',', '|', blanks or controls)";

/** Checks `add_tags`' tags; returns their keys. */
export function checkAddTags(tags: readonly string[]): string[] {
  const keys: string[] = [];
  for (const tag of tags) {
    checkTag("add_tags", tag);
    const colon = tag.indexOf(":");
    const key = colon < 0 ? tag : tag.slice(0, colon);
    if (keys.includes(key)) {
      const quoted = plainName(key);
      throw new RewriteKeyError(
        "add_tags",
        `${quoted === undefined ? "a tag key" : `the tag key ${quoted}`} is added twice`,
      );
    }
    keys.push(key);
  }
  return keys;
}

/** Checks `strip_tags`' tag keys. */
export function checkStripTags(keys: readonly string[]): void {
  for (const key of keys) {
    checkTag("strip_tags", key);
    if (key.includes(":")) {
      throw new RewriteKeyError("strip_tags", `${shown(key)}holds ':' (strip_tags lists tag keys)`);
    }
  }
}

/** `"VALUE" ` when it is a plain name, else `the value `: a file's values are never echoed. */
function shown(value: string): string {
  const quoted = plainName(value);
  return quoted === undefined ? "the value " : `${quoted} `;
}
