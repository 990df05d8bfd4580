// What the SDK scripts share: the client's settings, `env`, `check`, `show`,
// and the runner that prints `ok <scenario>` per scenario and `all ok` at
// the end (exit code 1 on the first failure).

import { VERSION } from 'openai/version';

export const CLIENT_KEY = 'sk-client-placeholder';
export const TIMEOUT_MS = 20_000;
export const EXPECTED_TEXT = 'Hello from the mock upstream.';

export function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`environment variable ${name} is not set`);
  }
  return value;
}

export function check(cond, what) {
  if (!cond) {
    throw new Error(`assertion failed: ${what}`);
  }
}

export const show = (v) => JSON.stringify(v);

async function runAll(scenarios, client) {
  console.log(`openai node SDK ${VERSION} on node ${process.version}`);
  for (const [name, fn] of scenarios) {
    try {
      await fn(client);
    } catch (e) {
      console.log(`FAIL ${name}: ${e?.constructor?.name ?? 'Error'}: ${e?.message ?? e}`);
      if (e?.stack) console.error(e.stack);
      return 1;
    }
    console.log(`ok ${name}`);
  }
  console.log('all ok');
  return 0;
}

/** Runs `scenarios` against the client `makeClient` gives for SLUICE_BASE_URL. */
export function run(scenarios, makeClient) {
  Promise.resolve()
    .then(() => runAll(scenarios, makeClient(env('SLUICE_BASE_URL'))))
    .then(
      (code) => {
        process.exitCode = code;
      },
      (e) => {
        console.log(`FAIL: ${e?.stack ?? e}`);
        process.exitCode = 1;
      },
    );
}
