/**
 * statsite-proxy: a sharding proxy for statsite and statsd metrics.
 *
 * The entry point: parses the command line and runs a command. Errors the
 * user can fix print one line and exit 2 (usage, configuration) or 1 (a port
 * in use); never a stack trace.
 *
 * @module
 */

import { checkSummary } from "./src/commands/check_command.ts";
import { invokingFolder, parseCli, USAGE } from "./src/commands/cli.ts";
import { loadConfig } from "./src/config/config.ts";
import { ConfigError, ListenError, TakeoverError, UsageError } from "./src/diagnostics/errors.ts";
import { PidFileError } from "./src/commands/pid_file.ts";
import { runRoute } from "./src/commands/route_command.ts";
import { runProxy } from "./src/commands/run_command.ts";
import { routingPlan } from "./src/routing/destinations.ts";
import { VERSION } from "./src/version.ts";

async function main(args: string[]): Promise<number> {
  const cli = parseCli(args, { base: invokingFolder() });
  if (cli.help) {
    console.log(USAGE);
    return 0;
  }
  if (cli.version) {
    console.log(`statsite-proxy ${VERSION}`);
    return 0;
  }
  const config = await loadConfig({ file: cli.configFile, overrides: cli.overrides });
  if (cli.takeover && config.pidFile === undefined) {
    throw new UsageError(
      "--takeover needs a pid file (pid_file or --pid-file): it finds the running proxy through it",
    );
  }
  switch (cli.command) {
    case "check":
      await Deno.stdout.write(new TextEncoder().encode(checkSummary(config)));
      return 0;
    case "route":
      await runRoute({
        plan: routingPlan(config),
        // Only the pool "default" and no routes: today's KEY<TAB>ADDRESS.
        pooled: config.pools !== undefined &&
          (config.pools.length > 1 || (config.routes?.length ?? 0) > 0),
        keys: cli.rest,
        input: Deno.stdin.readable,
        output: Deno.stdout.writable,
      });
      return 0;
    case "run":
      return await runProxy({ config, overrides: cli.overrides, takeover: cli.takeover });
  }
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`statsite-proxy: ${err.message}\n\n${USAGE}`);
      code = 2;
    } else if (err instanceof ConfigError || err instanceof TakeoverError) {
      console.error(`statsite-proxy: ${err.message}`);
      code = 2;
    } else if (err instanceof ListenError || err instanceof PidFileError) {
      console.error(`statsite-proxy: ${err.message}`);
      code = 1;
    } else {
      const message = err instanceof Error ? err.message : String(err);
      console.error(`statsite-proxy: internal error: ${message.split("\n")[0]}`);
      code = 1;
    }
  }
  Deno.exit(code);
}
