// Usage injection (SPEC §10) seen through the official `openai` Node SDK.
//
// Run by the Rust integration test after it has started the OpenAI mock and
// sluice with `[routes.usage] inject = "always"`. From the environment:
//
//   SLUICE_BASE_URL  e.g. http://127.0.0.1:41234/v1  (routed to the mock)
//
// Each scenario sends one chat request whose user message is the scenario's
// name, so the test can find what the upstream received for it. sluice asks
// the upstream for usage on a streamed request whose client did not, and
// must then hide the usage-only chunk (`"choices": []`) it caused: a client
// that indexes `choices[0]` on every chunk, as many do, must not crash.
//
// The raw bytes of every response are kept too (a teeing `fetch`), to check
// that the stream still ends with `data: [DONE]`.
//
// Prints `ok <scenario>` per scenario and `all ok` at the end; exits 1 on the
// first failure.

import OpenAI from 'openai';
import { CLIENT_KEY, EXPECTED_TEXT, TIMEOUT_MS, check, env, run, show } from './common.mjs';

const MODEL = 'mock-model';
const DONE = 'data: [DONE]\n\n';

// The raw body of each response, in order (promises of its text).
const RAW = [];

/** `fetch`, keeping a copy of every response body. */
async function teeFetch(input, init) {
  const res = await fetch(input, init);
  if (!res.body) return res;
  const [sdk, mine] = res.body.tee();
  RAW.push(new Response(mine).text());
  return new Response(sdk, { status: res.status, statusText: res.statusText, headers: res.headers });
}

function makeClient(baseURL) {
  return new OpenAI({
    apiKey: CLIENT_KEY,
    baseURL,
    maxRetries: 0,
    timeout: TIMEOUT_MS,
    fetch: teeFetch,
  });
}

const messages = (name) => [{ role: 'user', content: name }];

/** The bytes the client got: events ending in `[DONE]`, and a
 * `"choices":[]` event only when the client asked for usage. */
function checkRawStream(raw, usageChunk) {
  check(raw.endsWith(DONE), `stream does not end with data: [DONE]: ${show(raw.slice(-200))}`);
  if (process.env.SLUICE_KEEPALIVE === '1') {
    check(raw.includes(': keep-alive\n'), `keepalive is on, yet no comment came: ${show(raw)}`);
  }
  // Keep-alive comment lines go before an event; the SDK skips them.
  const events = raw
    .split('\n\n')
    .map((e) => e.split('\n').filter((l) => !l.startsWith(':')).join('\n'))
    .filter((e) => e.trim() !== '');
  const empty = [];
  for (const event of events.slice(0, -1)) {
    check(event.startsWith('data: '), `not a data event: ${show(event)}`);
    const chunk = JSON.parse(event.slice('data: '.length));
    if (Array.isArray(chunk.choices) && chunk.choices.length === 0) empty.push(chunk);
  }
  const want = usageChunk ? 1 : 0;
  check(
    empty.length === want,
    `${empty.length} events with "choices": [] reached the client, expected ${want}: ${show(empty)}`,
  );
}

/** A stream whose client did not ask for usage: every chunk has a choice,
 * none has usage, and the text is whole. */
async function streamWithoutUsage(client, name, extra = {}) {
  RAW.length = 0;
  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: messages(name),
    stream: true,
    ...extra,
  });
  const parts = [];
  let i = 0;
  for await (const chunk of stream) {
    check(
      Array.isArray(chunk.choices) && chunk.choices.length > 0,
      `chunk ${i} has "choices": ${show(chunk.choices)} (usage ${show(chunk.usage)}): ` +
        'sluice leaked the usage-only chunk it asked the upstream for',
    );
    check(chunk.usage == null, `chunk ${i} carries usage ${show(chunk.usage)}`);
    const piece = chunk.choices[0].delta?.content;
    if (piece) parts.push(piece);
    i += 1;
  }
  const text = parts.join('');
  check(text === EXPECTED_TEXT, `streamed text was ${show(text)}, expected ${show(EXPECTED_TEXT)}`);
  check(RAW.length === 1, `${RAW.length} responses recorded, expected 1`);
  checkRawStream(await RAW[0], false);
}

async function injected(client) {
  await streamWithoutUsage(client, 'injected');
}

async function askedFalse(client) {
  await streamWithoutUsage(client, 'asked_false', { stream_options: { include_usage: false } });
}

async function asked(client) {
  RAW.length = 0;
  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: messages('asked'),
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  check(chunks.length >= 2, `only ${chunks.length} chunks`);
  const last = chunks[chunks.length - 1];
  check(show(last.choices) === '[]', `last chunk has choices ${show(last.choices)}, expected []`);
  check(last.usage != null, 'last chunk has no usage');
  check(last.usage.prompt_tokens === 11, `prompt_tokens was ${show(last.usage.prompt_tokens)}, expected 11`);
  check(
    last.usage.completion_tokens === 5,
    `completion_tokens was ${show(last.usage.completion_tokens)}, expected 5`,
  );
  const rest = chunks.slice(0, -1);
  rest.forEach((c, i) => check(c.choices?.length > 0, `chunk ${i} (not the last) has no choices`));
  const text = rest.map((c) => c.choices[0].delta?.content ?? '').join('');
  check(text === EXPECTED_TEXT, `streamed text was ${show(text)}, expected ${show(EXPECTED_TEXT)}`);
  checkRawStream(await RAW[0], true);
}

async function notStreamed(client) {
  const resp = await client.chat.completions.create({
    model: MODEL,
    messages: messages('not_streamed'),
    stream: false,
  });
  const content = resp.choices[0].message.content;
  check(content === EXPECTED_TEXT, `content was ${show(content)}, expected ${show(EXPECTED_TEXT)}`);
  check(resp.usage != null, 'no usage in the completion');
  check(resp.usage.prompt_tokens === 1, `prompt_tokens was ${show(resp.usage.prompt_tokens)}, expected 1`);
  check(
    resp.usage.completion_tokens === 6,
    `completion_tokens was ${show(resp.usage.completion_tokens)}, expected 6`,
  );
}

const SCENARIOS = [
  ['injected', injected],
  ['asked', asked],
  ['asked_false', askedFalse],
  ['not_streamed', notStreamed],
];

run(SCENARIOS, makeClient);
