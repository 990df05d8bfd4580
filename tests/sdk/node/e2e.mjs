// End-to-end check of the official `openai` Node SDK against sluice.
//
// Run by the Rust integration test after it has started a mock upstream and
// sluice. Everything comes from the environment:
//
//   SLUICE_BASE_URL           e.g. http://127.0.0.1:41234/v1  (routed to the mock)
//   SLUICE_UNROUTED_BASE_URL  e.g. http://127.0.0.1:41234/nothing-here/v1  (404)
//   SLUICE_CHAT_MODEL, SLUICE_EMBED_MODEL, SLUICE_MODEL_IDS  (optional) the
//       names the client sends and the list it expects, when the route
//       routes by model aliases; the mock always answers as the model it was sent
//
// The client sends a placeholder key; the mock upstream only accepts the real
// key, so every successful call proves sluice injected the upstream key.
//
// Prints `ok <scenario>` per scenario and `all ok` at the end; exits 1 on the
// first failure.

import OpenAI from 'openai';
import { CLIENT_KEY, EXPECTED_TEXT, TIMEOUT_MS, check, env, run, show } from './common.mjs';

const MESSAGES = [{ role: 'user', content: 'hi' }];
const CHAT_MODEL = process.env.SLUICE_CHAT_MODEL ?? 'mock-model';
const EMBED_MODEL = process.env.SLUICE_EMBED_MODEL ?? 'mock-embed';
const MODEL_IDS = (process.env.SLUICE_MODEL_IDS ?? 'mock-model,mock-embed').split(',');

function makeClient(baseURL) {
  return new OpenAI({
    apiKey: CLIENT_KEY,
    baseURL,
    maxRetries: 0,
    timeout: TIMEOUT_MS,
  });
}


async function chatNonStreaming(client) {
  const resp = await client.chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES });
  const content = resp.choices[0].message.content;
  check(content === EXPECTED_TEXT, `content was ${show(content)}, expected ${show(EXPECTED_TEXT)}`);
  check(resp.model === 'mock-model', `model was ${show(resp.model)}, expected "mock-model"`);
}

async function chatStreaming(client) {
  const stream = await client.chat.completions.create({
    model: CHAT_MODEL,
    messages: MESSAGES,
    stream: true,
  });
  const parts = [];
  for await (const chunk of stream) {
    if (!chunk.choices || chunk.choices.length === 0) continue;
    const piece = chunk.choices[0].delta?.content;
    if (piece) parts.push(piece);
  }
  const text = parts.join('');
  check(text === EXPECTED_TEXT, `streamed text was ${show(text)}, expected ${show(EXPECTED_TEXT)}`);
  check(
    parts.length >= 5,
    `only ${parts.length} content-bearing chunks (${show(parts)}); expected at least 5`,
  );
}

async function embeddings(client) {
  // The Node SDK asks for base64 unless told otherwise; ask for floats explicitly.
  const resp = await client.embeddings.create({
    model: EMBED_MODEL,
    input: 'hello',
    encoding_format: 'float',
  });
  const vec = Array.from(resp.data[0].embedding);
  check(show(vec) === show([0.25, -0.5, 0.125]), `embedding was ${show(vec)}, expected [0.25,-0.5,0.125]`);
}

async function modelsList(client) {
  const ids = [];
  for await (const model of client.models.list()) {
    ids.push(model.id);
  }
  check(show(ids) === show(MODEL_IDS), `model ids were ${show(ids)}, expected ${show(MODEL_IDS)}`);
}

async function unrouted404(_client) {
  const unrouted = makeClient(env('SLUICE_UNROUTED_BASE_URL'));
  let err;
  try {
    await unrouted.chat.completions.create({ model: 'mock-model', messages: MESSAGES });
  } catch (e) {
    err = e;
  }
  check(err !== undefined, 'expected NotFoundError, but the request succeeded');
  check(
    err instanceof OpenAI.NotFoundError,
    `expected NotFoundError, got ${err?.constructor?.name} (status ${err?.status}): ${err?.message}`,
  );
  check(err.status === 404, `status was ${show(err.status)}, expected 404`);
  check(
    typeof err.message === 'string' && err.message.includes('no route matches'),
    `error message ${show(err.message)} does not contain "no route matches"`,
  );
  check(err.code === 'route_not_found', `error code was ${show(err.code)}, expected "route_not_found"`);
}

const SCENARIOS = [
  ['chat_non_streaming', chatNonStreaming],
  ['chat_streaming', chatStreaming],
  ['embeddings', embeddings],
  ['models_list', modelsList],
  ['unrouted_404', unrouted404],
];

run(SCENARIOS, makeClient);
